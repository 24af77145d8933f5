"""Host-side answer checking: pull the final answer out of a response, compare it to the truth.

Runs on Python strings between generation and the (jitted) reward, so it is plain Python.

Extraction order (`extract_answer`): the last `\\boxed{...}` (nested braces allowed), else the
last closed `<solution>...</solution>` block (the last number inside it, or its whole text when
it holds none), else the last number anywhere in the text, else None.

Comparison (`is_correct`): both sides are normalised (LaTeX wrappers, thousands commas,
currency and percent signs, trailing periods, whitespace, case); when both then read as a
number (an integer, a decimal or a simple fraction, optionally followed by a unit word such as
"12 cm"), they are compared with a relative tolerance, so "-0" == "0", "5.00" == "5",
"1/2" == "0.5"; otherwise the normalised strings must match exactly.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import numpy as np

# A signed integer or decimal, with optional thousands separators ("1,234.5"), or a fraction
# ("3/4"); not preceded by a letter so "x2" or "H2O" do not count as numbers.
_NUMBER_RE = re.compile(
    r"(?<![\w.])-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+(?:\.\d+)?)?"
)
_SOLUTION_RE = re.compile(r"<solution>(.*?)</solution>", re.DOTALL | re.IGNORECASE)
_TEACHING_RE = re.compile(r"<teaching>(.*?)(?:</teaching>|$)", re.DOTALL | re.IGNORECASE)
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_FRAC_RE = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_NUMERIC_RE = re.compile(r"^(-?(?:\d+(?:\.\d+)?|\.\d+))(?:/(-?\d+(?:\.\d+)?))?((?:\s+[a-z][a-z/]*)*)$")
_REL_TOL = 1e-6


def _last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}), matching braces by depth."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None  # unbalanced: the response was cut off inside the box


def _last_number(text: str) -> Optional[str]:
    matches = _NUMBER_RE.findall(text)
    return re.sub(r"\s+", "", matches[-1]) if matches else None


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a response (see module docstring), or None when it has none."""
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects a str, got {type(text).__name__}")
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    solutions = _SOLUTION_RE.findall(text)
    if solutions:
        inner = solutions[-1]
        return _last_boxed(inner) or _last_number(inner) or (inner.strip() or None)
    return _last_number(text)


def extract_teaching(text: str) -> str:
    """The guidance inside the first <teaching>...</teaching> (to the end if unclosed); else all."""
    match = _TEACHING_RE.search(text)
    return (match.group(1) if match else text).strip()


def _normalize(answer: str) -> str:
    s = answer.strip()
    if "####" in s:  # GSM8K-style ground truth: the answer follows the marker
        s = s.rsplit("####", 1)[1]
    s = _last_boxed(s) or s
    s = _TEXT_RE.sub(r" \1", s)
    s = _FRAC_RE.sub(r"(\1)/(\2)", s)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\$", "\\%", "^\\circ", "^{\\circ}", "°"):
        s = s.replace(token, " " if token in ("\\,", "\\;") else "")
    s = s.replace("$", "").replace("%", "").replace("€", "").replace("£", "").replace("¥", "")
    s = _THOUSANDS_RE.sub("", s)
    s = re.sub(r"\((-?[\d.]+)\)/\((-?[\d.]+)\)", r"\1/\2", s)  # (3)/(4) -> 3/4
    s = re.sub(r"\s*/\s*", "/", s)
    s = s.strip().rstrip(".").strip().lower()
    s = re.sub(r"^[a-z]\s*=\s*", "", s)  # "x = 5" -> "5"
    return re.sub(r"\s+", " ", s)


def _as_number(normalized: str) -> Optional[float]:
    """The value of an integer/decimal/fraction, optionally followed by unit words; else None."""
    match = _NUMERIC_RE.match(normalized)
    if match is None:
        return None
    value = float(match.group(1))
    if match.group(2) is not None:
        denominator = float(match.group(2))
        if denominator == 0:
            return None
        value /= denominator
    return value


def is_correct(prediction: Optional[str], ground_truth: Optional[str]) -> bool:
    """True when the prediction equals the ground truth after normalisation (numbers: tolerance)."""
    if prediction is None or ground_truth is None:
        return False
    pred, truth = _normalize(str(prediction)), _normalize(str(ground_truth))
    if not pred or not truth:
        return False
    pred_value, truth_value = _as_number(pred), _as_number(truth)
    if pred_value is not None and truth_value is not None:
        return math.isclose(pred_value, truth_value, rel_tol=_REL_TOL, abs_tol=1e-9)
    return pred.replace(" ", "") == truth.replace(" ", "")


def score_responses(responses: Sequence[str], ground_truths: Sequence[Optional[str]]) -> np.ndarray:
    """Per-response correctness as float32 [B]: extract each answer, compare to its truth."""
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    return np.asarray(
        [is_correct(extract_answer(r), t) for r, t in zip(responses, ground_truths)], np.float32
    )
