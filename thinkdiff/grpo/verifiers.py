"""Answer checks for verifiable problems: reward 1.0 for a correct final answer, else 0.0.

The final answer is taken from `\\boxed{...}` if present, else from "answer is/answer:" , else the last candidate
(number or choice letter) in the text. Add your own with `@register("name")` on a `(completion, answer) -> float`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..errors import ConfigError

VERIFIERS: dict[str, Callable[[str, str], float]] = {}

_NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def register(name: str):
    def wrap(fn):
        VERIFIERS[name] = fn
        return fn
    return wrap


def get_verifier(name: str) -> Callable[[str, str], float]:
    if name not in VERIFIERS:
        raise ConfigError(f"Unknown verifier {name!r}; choose one of {', '.join(sorted(VERIFIERS))}.")
    return VERIFIERS[name]


def final_answer_span(text: str) -> str:
    """The part of `text` that holds the final answer."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return boxed[-1]
    said = re.split(r"(?i)(?:final answer|answer)\s*(?:is|:)", text)
    return said[-1] if len(said) > 1 else text


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip(".").strip()).lower()


def _to_number(token: str) -> float | None:
    token = token.replace(",", "")
    try:
        if "/" in token:
            num, den = token.split("/")
            return float(num) / float(den)
        return float(token)
    except (ValueError, ZeroDivisionError):
        return None


@register("exact")
def exact(completion: str, answer: str) -> float:
    """Case- and whitespace-insensitive equality of the final answer."""
    return float(_normalise(final_answer_span(completion)) == _normalise(answer))


@register("numeric")
def numeric(completion: str, answer: str, rel_tol: float = 1e-3) -> float:
    """The last number of the final-answer span equals `answer` within a relative tolerance of 1e-3."""
    found = _NUMBER.findall(final_answer_span(completion))
    target = _to_number(answer.strip())
    if not found or target is None:
        return 0.0
    value = _to_number(found[-1])
    return float(value is not None and abs(value - target) <= rel_tol * max(1.0, abs(target)))


@register("multiple_choice")
def multiple_choice(completion: str, answer: str) -> float:
    """The last standalone choice letter (A-E, optionally in parentheses) equals `answer`."""
    letters = re.findall(r"(?<![A-Za-z])\(?([A-E])\)?(?![A-Za-z])", final_answer_span(completion))
    return float(bool(letters) and letters[-1] == answer.strip().strip("()").upper())
