import pytest

from thinkdiff.grpo.verifiers import get_verifier


@pytest.mark.parametrize("completion, answer, expected", [
    ("so x = 4. The answer is 12", "12", 1.0),
    ("\\boxed{3/4} but 7 later", "0.75", 1.0),
    ("1,000 apples", "1000", 1.0),
    ("The answer is 12.0004", "12", 1.0),
    ("answer: 13", "12", 0.0),
    ("no number at all", "3", 0.0),
    ("-5 is it", "-5", 1.0),
])
def test_numeric(completion, answer, expected):
    assert get_verifier("numeric")(completion, answer) == expected


@pytest.mark.parametrize("completion, answer, expected", [
    ("I think (B) is wrong, the answer is (C).", "C", 1.0),
    ("Answer: d", "D", 0.0),
    ("A cat. Final answer: B", "B", 1.0),
    ("None of them", "A", 0.0),
])
def test_multiple_choice(completion, answer, expected):
    assert get_verifier("multiple_choice")(completion, answer) == expected


def test_exact_and_unknown():
    assert get_verifier("exact")("The answer is  Paris.", "paris") == 1.0
    assert get_verifier("exact")("London", "paris") == 0.0
    with pytest.raises(ValueError, match="Unknown verifier"):
        get_verifier("fuzzy")
