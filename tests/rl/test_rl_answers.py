"""Answer extraction and comparison (host side), through the public atlas_jax.rl.rewards names."""

import numpy as np
import pytest

from atlas_jax.rl.rewards import extract_answer, extract_teaching, is_correct, score_responses


@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("first \\boxed{1} then, correcting myself, \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1, \\{2\\}\\}} done", "\\{1, \\{2\\}\\}"),
    ("x = \\boxed{a^{2} + b_{i}}", "a^{2} + b_{i}"),
    ("The temperature dropped to -7 degrees.", "-7"),
    ("They raised $1,234,567 in total.", "1,234,567"),
    ("Half of it: 3/4 of the cake is left", "3/4"),
    ("The road is 12 km long.", "12"),
    ("It costs $3.50.", "3.50"),
    ("<solution>Try 3.</solution> no wait <solution>The answer is 7/8.</solution> ps 99", "7/8"),
    ("<solution>yes</solution>", "yes"),
    ("<solution>so \\boxed{5}</solution>", "5"),
    ("I could not finish \\boxed{12", "12"),  # cut off inside the box: fall back to the number
    ("no digits here at all", None),
    ("H2O and x2 are names, not answers", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_rejects_non_text():
    with pytest.raises(TypeError, match="expects a str"):
        extract_answer(None)


@pytest.mark.parametrize("prediction, truth", [
    ("42", "42"),
    ("1,234", "1234"),
    ("\\$1,234.00", "1234"),
    ("50\\%", "50"),
    ("7.", "7"),
    ("-0", "0"),
    ("5.00", "5"),
    ("1/2", "0.5"),
    ("\\frac{3}{4}", "0.75"),
    ("-\\dfrac{1}{2}", "-0.5"),
    ("12\\text{ cm}", "12"),
    ("12 km", "12"),
    ("x = 5", "5"),
    ("\\text{Yes}", "yes"),
    ("72", "Natalia sold 48 + 24 = 72 clips.\n#### 72"),  # GSM8K-style truth
    ("0.1 + 0.2", "0.1+0.2"),  # non-numeric strings: whitespace-insensitive equality
])
def test_is_correct_equivalent(prediction, truth):
    assert is_correct(prediction, truth)


@pytest.mark.parametrize("prediction, truth", [
    ("41", "42"),
    ("0.333", "1/3"),  # a rounded value is not the exact answer
    ("2x", "2"),
    ("-5", "5"),
    ("1234", "123.4"),
    ("1/0", "0"),
    (None, "1"),
    ("1", None),
    ("", ""),
])
def test_is_correct_different(prediction, truth):
    assert not is_correct(prediction, truth)


def test_extract_teaching():
    assert extract_teaching("thinking... <teaching>\n Check the sign. \n</teaching> bye") == "Check the sign."
    assert extract_teaching("<teaching>cut off mid-sentence") == "cut off mid-sentence"
    assert extract_teaching("  no tags at all  ") == "no tags at all"


def test_score_responses():
    out = score_responses(["\\boxed{3}", "it is 4", "none"], ["3", "5", "1"])
    np.testing.assert_array_equal(out, np.array([1.0, 0.0, 0.0], np.float32))
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        score_responses(["a", "b"], ["a"])
