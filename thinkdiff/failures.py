"""Batches where one bad item must not sink the others: run the batch; if it fails, run its items one by one and
keep each item's own error (`Failure`), so errors land on the item they belong to."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Failure:
    """The error one item ended with."""

    error: Exception

    @property
    def text(self) -> str:
        """`Type: message` and the last lines of the traceback, for records and logs."""
        err = self.error
        return f"{type(err).__name__}: {err}\n" + "".join(traceback.format_exception(err)[-3:])


def run_per_item(fn: Callable[[list[T]], Sequence[R]], items: Sequence[T], what: str = "batch") -> list[R | Failure]:
    """`fn(items)`, one result per item. When that raises (or returns another number of results), `fn([item])` for
    each item, and a `Failure` in place of each item that still raises."""
    items = list(items)
    if not items:
        return []
    try:
        results = list(fn(items))
        if len(results) == len(items):
            return results
        raise RuntimeError(f"{len(results)} results for {len(items)} items")
    except Exception as err:  # noqa: BLE001 - isolated below
        if len(items) == 1:
            return [Failure(err)]
        logger.warning("A %s of %d failed (%s: %s); running its items one by one.", what, len(items),
                       type(err).__name__, err)
    out: list[R | Failure] = []
    for item in items:
        try:
            (result,) = fn([item])
            out.append(result)
        except Exception as err:  # noqa: BLE001 - kept as this item's error
            out.append(Failure(err))
    return out
