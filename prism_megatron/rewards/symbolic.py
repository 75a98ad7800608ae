"""math-verify fallback for symbolic equality (spec §5.2, last rule), under a hard deadline.

The variants of each side are {raw, delimiter-stripped, latex-normalised}; every (gold variant,
prediction variant) pair is tried with math-verify's default extraction and the first
``verify(gold, prediction)`` that holds wins. A pair whose parsing or comparison raises fails
alone. One deadline covers the whole fallback of one value pair; on expiry the answer is judged
wrong with reason ``math_verify_timeout``.
"""

from __future__ import annotations

import importlib.util
import logging

from prism_megatron.rewards.deadline import DeadlineExceeded, SandboxError, call_with_deadline
from prism_megatron.rewards.judge import normalize_latex, strip_delimiters

__all__ = ["MATH_VERIFY_AVAILABLE", "make_symbolic_judge", "math_verify_equal", "variants"]

MATH_VERIFY_AVAILABLE = importlib.util.find_spec("math_verify") is not None


class _DropDisabledTimeoutWarning(logging.Filter):
    """math-verify warns once that its timeouts are off; ours (deadline.py) replace them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropDisabledTimeoutWarning())


def variants(text: str) -> list[str]:
    """Distinct {raw, delimiter-stripped, latex-normalised} forms, in that order."""
    stripped = strip_delimiters(text)
    forms = (text, stripped, normalize_latex(stripped))
    return [form for index, form in enumerate(forms) if form and form not in forms[:index]]


def math_verify_equal(prediction: str, ground_truth: str) -> bool:
    """True if math-verify proves any gold/prediction variant pair equal. No timeout of its own.

    Module-level so it can run in the sandbox process. Each distinct string is parsed once
    (parsing is deterministic, so this equals trying every pair).
    """
    from math_verify import parse, verify

    def parsed(text: str) -> list:
        try:
            return parse(text, parsing_timeout=None)
        except Exception:  # a string that cannot be parsed simply fails its pairs
            return []

    gold_forms = [parsed(form) for form in variants(ground_truth)]
    pred_forms = [parsed(form) for form in variants(prediction)]
    for gold in gold_forms:
        for pred in pred_forms:
            if not gold or not pred:
                continue
            try:
                if verify(gold, pred, timeout_seconds=None):
                    return True
            except Exception:
                continue
    return False


_warmed_up = False


def _warm_up() -> None:
    """Imports math-verify and builds its parsers once, OUTSIDE any deadline: a first import can
    take a second, and an import interrupted by the alarm would leave half-imported modules."""
    global _warmed_up
    if not _warmed_up:
        from math_verify import parse, verify

        gold, prediction = parse("1", parsing_timeout=None), parse("$1$", parsing_timeout=None)
        verify(gold, prediction, timeout_seconds=None)
        _warmed_up = True


def make_symbolic_judge(timeout: float = 5.0, isolation: str = "auto"):
    """A ``(prediction, ground_truth) -> (equal, reason)`` judge, or None without math-verify."""
    if not MATH_VERIFY_AVAILABLE:
        return None

    def judge(prediction: str, ground_truth: str) -> tuple[bool, str]:
        if isolation != "process":
            _warm_up()  # the sandbox process warms up through its preload instead
        try:
            equal = call_with_deadline(
                math_verify_equal,
                (prediction, ground_truth),
                timeout=timeout,
                isolation=isolation,
                preload=(f"{__name__}:_warm_up",),
            )
        except DeadlineExceeded:
            return False, "math_verify_timeout"
        except SandboxError:
            return False, "math_verify_error"
        return bool(equal), "math_verify" if equal else "no_match"

    return judge
