"""Answer judging rules of the rule scorer (spec §5.2 step 3): pure string logic, no ``eval``.

``judge_answer(prediction, ground_truth)`` returns ``(accuracy, reason)``. Rules, in order:
multi-value split -> per value: coordinates (final) -> MCQ (final) -> exact -> numeric ->
normalised text -> unit-aware text -> math-verify fallback (``symbolic.py``).
"""

from __future__ import annotations

import re
from typing import Callable

from prism_megatron.rewards.units import split_unit

__all__ = [
    "judge_answer",
    "mcq_letter",
    "normalize_latex",
    "normalize_text",
    "parse_number",
    "simple_parse",
    "single_value_judge",
    "split_multi_value",
    "strip_delimiters",
]

# A symbolic judge: (prediction, ground_truth) -> (equal, reason). Raises nothing.
SymbolicJudge = Callable[[str, str], "tuple[bool, str]"]

# ---------------------------------------------------------------------------- multi-value split

_NUMBERED_MARKER = re.compile(r"\(\d+\)")


def split_multi_value(text: str) -> list[str]:
    """Splits a multi-value answer; the first rule giving >= 2 non-empty parts wins (spec §5.2).

    (i) numbered items ``(1) … (2) …`` (>= 2 markers, the first within the first 3 characters);
    (ii) ``;`` / ``；``; (iii) commas at bracket depth 0. Otherwise ``[text]``.
    """
    text = text.strip()
    markers = list(_NUMBERED_MARKER.finditer(text))
    if len(markers) >= 2 and markers[0].start() < 3:
        ends = [m.start() for m in markers[1:]] + [len(text)]
        parts = [text[m.end():end].strip().rstrip(",;，；").strip() for m, end in zip(markers, ends)]
        parts = [part for part in parts if part]
        if len(parts) >= 2:
            return parts
    parts = [part.strip() for part in re.split(r"[;；]", text) if part.strip()]
    if len(parts) >= 2:
        return parts
    parts, depth, start = [], 0, 0
    for position, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:position])
            start = position + 1
    parts.append(text[start:])
    parts = [part.strip() for part in parts if part.strip()]
    return parts if len(parts) >= 2 else [text]


# ---------------------------------------------------------------------------- simple_parse

_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def strip_delimiters(text: str) -> str:
    """Removes one layer of each math delimiter, in the spec's order, where it wraps the string."""
    text = text.strip()
    for left, right in _DELIMITERS:
        if len(text) >= len(left) + len(right) and text.startswith(left) and text.endswith(right):
            text = text[len(left):len(text) - len(right)].strip()
    return text


_TEXT_COMMAND = re.compile(r"\\(?:text|mathrm)\{([^{}]*)\}")
# \left / \right as sizing commands only (not the prefix of \leftarrow, \rightarrow, ...).
_SIZING = re.compile(r"\\(?:left|right)(?![A-Za-z])")


def normalize_latex(text: str) -> str:
    """\\dfrac/\\tfrac -> \\frac, \\text{X}/\\mathrm{X} -> X, no \\left/\\right, tidy spaces."""
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _TEXT_COMMAND.sub(r"\1", text)
    text = _SIZING.sub("", text)
    text = re.sub(r"\{\s+", "{", text)
    text = re.sub(r"\s+\}", "}", text)
    return re.sub(r"\s+", " ", text).strip()


_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")


def simple_parse(text: str) -> str:
    """Canonical form of one answer value (spec §5.2 ``simple_parse``).

    Removing commas between digits is deliberate parity: ``"(2,3)"`` becomes ``"(23)"``.
    """
    text = normalize_latex(strip_delimiters(text))
    text = _DIGIT_COMMA.sub("", text).replace("，", "")
    return text[:-1] if text.endswith(".") else text


# ---------------------------------------------------------------------------- single-value rules

_NUMBER = r"[+-]?\d+(?:\.\d+)?"
_COORDINATE = re.compile(rf"\(?\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)?")


def _coordinates(text: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in _COORDINATE.findall(text)]


_MCQ_GT = (
    re.compile(r"^([A-H])$"),
    re.compile(r"^\(([A-H])\)(?:\s.*)?$", re.DOTALL),
    re.compile(r"^([A-H])\.\s*[\d+\-−(\[{].*$", re.DOTALL),  # "B. 45°" yes, "B. Triangle" no
)
_WHOLE_LETTER = re.compile(r"^[(\[]?([A-Za-z])[)\]]?[.:]?$")
# (pattern, priority): the best candidate is the highest priority, then the earliest position.
_LETTER_CANDIDATES = (
    (re.compile(r"(?i:answer|option|choice)\s*(?:(?i:is)\s*:?|:)\s*[(\[]?([A-H])(?![A-Za-z])"), 10),
    (re.compile(r"(?:^|\s)\(([A-H])\)"), 8),
    (re.compile(r"(?:^|\s)([A-H])[.)]"), 6),
)


def _mcq_ground_truth(text: str) -> str | None:
    for pattern in _MCQ_GT:
        match = pattern.match(text)
        if match:
            return match.group(1)
    return None


def mcq_letter(prediction: str) -> str | None:
    """The option letter a prediction names (upper-cased), or None (spec §5.2 MCQ rule)."""
    match = _WHOLE_LETTER.match(prediction.strip())
    if match:
        return match.group(1).upper()
    best: tuple[int, int, str] | None = None  # (-priority, position, letter)
    for pattern, priority in _LETTER_CANDIDATES:
        for match in pattern.finditer(prediction):
            candidate = (-priority, match.start(1), match.group(1))
            best = candidate if best is None or candidate < best else best
    return best[2] if best else None


def parse_number(text: str) -> float | None:
    """``float`` of a value with digit commas and ONE trailing unit removed; None if not numeric."""
    number, _ = split_unit(_DIGIT_COMMA.sub("", text).replace("，", ""))
    try:
        return float(number)
    except ValueError:
        return None


_PUNCTUATION = re.compile(r"[,;:!?'\"().\[\]{}，；：！？＇＂（）．［］｛｝。、“”‘’【】]")


def normalize_text(text: str) -> str:
    """Lowercase, no ``**`` bold markers, no ASCII/CJK punctuation, single spaces."""
    text = _PUNCTUATION.sub("", text.lower().replace("**", ""))
    return re.sub(r"\s+", " ", text).strip()


def _relax_exact_match(prediction: str, ground_truth: str) -> tuple[bool | None, str]:
    """MCQ (final either way), exact, numeric, normalised text, unit-aware text.

    Returns (True, reason) on a match, (False, reason) when the decision is final (MCQ), and
    (None, "") to let the caller continue with the symbolic fallback.
    """
    gt_letter = _mcq_ground_truth(ground_truth)
    if gt_letter is not None:
        return mcq_letter(prediction) == gt_letter, "mcq"
    if prediction.strip() == ground_truth.strip():
        return True, "exact"
    pred_number, gt_number = parse_number(prediction), parse_number(ground_truth)
    if pred_number is not None and gt_number is not None:
        # Units are deliberately not compared here (spec §5.3 row 20).
        if gt_number == 0:
            if pred_number == 0:
                return True, "numeric"
        elif abs(pred_number - gt_number) / abs(gt_number) < 1e-6:
            return True, "numeric"
    if normalize_text(prediction) == normalize_text(ground_truth):
        return True, "text"
    (pred_rest, pred_unit), (gt_rest, gt_unit) = split_unit(prediction), split_unit(ground_truth)
    if normalize_text(pred_rest) == normalize_text(gt_rest):
        same_unit = (pred_unit is None and gt_unit is None) or (
            pred_unit is not None and gt_unit is not None and pred_unit.lower() == gt_unit.lower()
        )
        if same_unit:
            return True, "unit_text"
    return None, ""


def single_value_judge(
    prediction: str, ground_truth: str, symbolic: SymbolicJudge | None = None
) -> tuple[bool, str]:
    """Judges one (already ``simple_parse``-d) value pair; the first positive rule wins."""
    pred_points, gt_points = _coordinates(prediction), _coordinates(ground_truth)
    if pred_points and gt_points:
        equal = len(pred_points) == len(gt_points) and all(
            abs(p[0] - g[0]) <= 1e-6 and abs(p[1] - g[1]) <= 1e-6
            for p, g in zip(pred_points, gt_points)
        )
        return equal, "coordinates"
    matched, reason = _relax_exact_match(prediction, ground_truth)
    if matched is not None:
        return matched, reason if matched else f"{reason}_mismatch"
    if symbolic is None:
        return False, "no_match"
    if len(split_multi_value(prediction)) > 1 or len(split_multi_value(ground_truth)) > 1:
        return False, "no_match"
    # Decision (see verifiable.py): math-verify drops units ("2 m" == "2 cm" == 2), so values with
    # a recognised unit are judged by the unit-aware rules above only (spec §5.3 row 21).
    if split_unit(prediction)[1] is not None or split_unit(ground_truth)[1] is not None:
        return False, "no_match"
    return symbolic(prediction, ground_truth)


def judge_answer(
    prediction: str, ground_truth: str, symbolic: SymbolicJudge | None = None
) -> tuple[float, str]:
    """Accuracy (0.0/1.0) and reason for an extracted answer against the ground truth (§5.2.3)."""
    pred_parts, gt_parts = split_multi_value(prediction), split_multi_value(ground_truth)
    if len(pred_parts) > 1 or len(gt_parts) > 1:
        if len(pred_parts) != len(gt_parts):
            return 0.0, "multi_value_count_mismatch"
        for index, (pred, gt) in enumerate(zip(pred_parts, gt_parts)):
            equal, reason = single_value_judge(simple_parse(pred), simple_parse(gt), symbolic)
            if not equal:
                return 0.0, f"multi_value_part{index}_{reason}"
        return 1.0, "multi_value"
    prediction, ground_truth = simple_parse(prediction), simple_parse(ground_truth)
    equal, reason = single_value_judge(prediction, ground_truth, symbolic)
    return float(equal), reason
