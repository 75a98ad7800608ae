"""Rule-based verifiable reward for RLVR (spec §5): ``score = 0.8 * accuracy + 0.2 * format``.

Format gate (the §2.2 regex) -> answer extraction (first ``<answer>`` block) -> judge
(``judge.py``: multi-value, coordinates, MCQ, exact, numeric, text, units) -> math-verify
fallback (``symbolic.py``, under a hard deadline). Model output is never ``eval``-ed.

Decision (spec §9.7 "reproduce the reference scorer"): the literal §5.2 fallback would accept
§5.3 row 21 ("2 cm" vs "2 m": math-verify drops units and sees 2 == 2), but the reference gives
0.2. We therefore skip the fallback when either value carries a unit from the scorer's unit list;
such values are judged by the unit-aware rules only.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Sequence

from prism_megatron.rewards.judge import judge_answer
from prism_megatron.rewards.response import extract_answer, extract_boxed, is_format_valid
from prism_megatron.rewards.symbolic import make_symbolic_judge

__all__ = ["MAX_ANSWER_CHARS", "RewardResult", "score_response", "score_responses"]

MAX_ANSWER_CHARS = 1024  # answers this long or longer are not judged (spec §5.2 step 2)


@dataclass(frozen=True)
class RewardResult:
    """One response's reward: ``score`` in {0, format_weight, accuracy_weight + format_weight}."""

    score: float
    accuracy: float
    format_ok: bool
    reason: str
    answer: str | None = None


@lru_cache(maxsize=None)
def _symbolic_judge(timeout: float, isolation: str):
    return make_symbolic_judge(timeout=timeout, isolation=isolation)


def score_response(
    response: str,
    ground_truth: str,
    *,
    accuracy_weight: float = 0.8,
    format_weight: float = 0.2,
    use_math_verify: bool = True,
    math_verify_timeout: float = 5.0,
    isolation: str = "auto",
    unwrap_boxed: bool = False,
) -> RewardResult:
    """Scores a decoded response (special tokens skipped) against its ground truth (spec §5.2).

    ``math_verify_timeout`` bounds the symbolic fallback of each value pair (wall clock);
    ``isolation`` picks how (see ``deadline.call_with_deadline``). ``unwrap_boxed=True`` judges
    the content of a ``\\boxed{}`` inside the answer; it is off for parity with the reference,
    where only the math-verify fallback understands ``\\boxed``.
    """
    if not is_format_valid(response):
        return RewardResult(0.0, 0.0, False, "format_invalid", extract_answer(response))

    def result(accuracy: float, reason: str, answer: str) -> RewardResult:
        score = accuracy_weight * accuracy + format_weight * 1.0
        return RewardResult(score, accuracy, True, reason, answer)

    answer = extract_answer(response) or ""  # a valid response always has an answer block
    if unwrap_boxed:
        answer = extract_boxed(answer) or answer
    if not answer:
        return result(0.0, "empty_answer", answer)
    if len(answer) >= MAX_ANSWER_CHARS:
        return result(0.0, "answer_too_long", answer)
    ground_truth = str(ground_truth)
    symbolic = _symbolic_judge(float(math_verify_timeout), isolation) if use_math_verify else None
    accuracy, reason = judge_answer(answer, ground_truth, symbolic)
    return result(accuracy, reason, answer)


def _score_pair(pair: tuple[str, str], options: dict) -> RewardResult:
    return score_response(pair[0], pair[1], **options)


def score_responses(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    *,
    num_workers: int = 0,
    executor: Executor | None = None,
    chunksize: int | None = None,
    **options,
) -> list[RewardResult]:
    """Scores a batch; same results as calling :func:`score_response` on each pair.

    ``num_workers > 0`` uses a ``ProcessPoolExecutor`` (spawn context) of that size for this call;
    pass a long-lived ``executor`` instead to amortise worker start-up across steps. ``options``
    are forwarded to :func:`score_response`.
    """
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    pairs = list(zip(responses, ground_truths))
    work = partial(_score_pair, options=options)
    if executor is None and num_workers <= 0:
        return [work(pair) for pair in pairs]
    workers = num_workers if num_workers > 0 else 1
    if chunksize is None:
        chunksize = max(1, len(pairs) // (4 * workers))
    if executor is not None:
        return list(executor.map(work, pairs, chunksize=chunksize))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=num_workers, mp_context=context) as pool:
        return list(pool.map(work, pairs, chunksize=chunksize))
