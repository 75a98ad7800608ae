"""Ground-truth fidelity of a response on the synthetic colour-grid task, with no model judge.

Every synthetic row's ``meta`` holds the grid and the question (``data/synthetic.py``), so what a
response states can be checked claim by claim (docs/metrics.md describes every number):

* **perception** (the ``<caption>`` block): each checkable claim is one of
  a grid shape (``2x3``), a cell (``Row i: c1, c2, ...``: the j-th colour is a claim about cell
  (i, j)), a per-colour count (``2 red cells``) or a colour said to be present
  (``Coloured squares: red, green.``). ``precision`` = true claims / claims; a claim about a cell
  outside the grid, or a colour word that is not one of the task's colours, is *invented* (and
  false). ``coverage`` = the share of the grid's facts (its shape, every cell, the count of every
  colour present, blank included) that the caption states correctly.
* **reasoning** (the ``<think>`` block): each step is a stated count (``There are 2 red cells.``),
  an arithmetic step (``2 + 1 = 3.``, ``2 x 3 = 6.``), a comparison (``2 > 1, ...``), a parity
  (``3 is odd.``) or an arg-max statement (``The largest count is 3, for red.``). A step is
  *correct* when its quantities are the true ones for the question (the operands map onto the
  question's colours in order) and its arithmetic/relation holds; an equation with the wrong
  number of operands for the question is a wrong step. ``answer_follows``: the ``<answer>``
  equals the chain's own conclusion (the last final step's stated result, or the option its
  stated relation / parity / arg-max picks; with no final step, its last "The answer is X"; else
  the question solved on the counts it states). ``coverage``: the share of the counts the question needs that the chain states
  correctly.
* **accuracy**: the verifiable reward's accuracy (``rewards.verifiable.score_response``, format
  gated as in training).

Only format-valid responses (spec §2.2, ``rewards.response.split_segments``) are read for claims
and steps; an invalid one has none (coverage 0, and it is not in the precision means). Accuracy is
the reward's, math-verify fallback included, so it equals the held-out evaluator's.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

from prism_megatron.data.synthetic import BLANK, COLOURS, LETTERS, Question, solve
from prism_megatron.rewards.judge import judge_answer
from prism_megatron.rewards.response import parse_response, split_segments
from prism_megatron.rewards.verifiable import score_response

__all__ = ["FIDELITY_KEYS", "Fidelity", "eval_metrics", "heldout_metrics", "question_from_meta",
           "score_fidelity", "summarize_fidelity"]

_ALL_COLOURS = (*COLOURS, BLANK)
_COLOUR = "|".join(_ALL_COLOURS)
_SHAPE = re.compile(r"\b(\d+)\s*x\s*(\d+)\b")
_ROW = re.compile(r"\bRow\s+(\d+)\s*:\s*([^\n]*)")
_COUNT = re.compile(rf"\b(\d+)\s+({_COLOUR})\s+cells?\b")
_PRESENT = re.compile(r"Coloured squares:\s*([^\n.]*)")
_NUM = r"-?\d+"
_EQUATION = re.compile(rf"(?<![\w-])({_NUM}(?:\s*[-+x]\s*{_NUM})+)\s*=\s*({_NUM})")
_COMPARE = re.compile(rf"(?<![\w-])({_NUM})\s*([<>=])\s*({_NUM})(?!\s*[-+x\d])")
_PARITY = re.compile(rf"(?<![\w-])({_NUM})\s+is\s+(odd|even)\b")
_MOST = re.compile(rf"largest count is\s+({_NUM}),?\s+for\s+(\w+)")
_STATED = re.compile(r"\bthe answer is\s+\(?([^\s.,()]+)", re.IGNORECASE)

# Summary keys (``summarize_fidelity``), as held-out eval metrics ``eval/<file>/<key>``.
FIDELITY_KEYS = ("perception_precision", "perception_coverage", "perception_invented",
                 "reasoning_precision", "reasoning_coverage", "answer_follows")


def question_from_meta(meta: dict) -> tuple[tuple[tuple[str, ...], ...], Question]:
    """(grid, question) from a synthetic row's ``meta``."""
    q = meta["question"]
    grid = tuple(tuple(row) for row in meta["grid"])
    return grid, Question(q["kind"], tuple(q.get("colours", ())), int(q.get("k", 0)),
                          tuple(q.get("options", ())))


def _counts(grid) -> dict[str, int]:
    return {c: sum(cell == c for row in grid for cell in row) for c in _ALL_COLOURS}


@dataclass(frozen=True)
class Fidelity:
    """One response's claims and steps (counts), checked against its row's grid and question."""

    format_ok: bool
    accuracy: float
    claims: int = 0                 # checkable caption claims
    claims_true: int = 0
    invented: int = 0               # claims about cells outside the grid / unknown colours
    facts: int = 0                  # the grid's facts (shape + cells + present colours' counts)
    facts_stated: int = 0           # of those, stated correctly by the caption
    steps: int = 0                  # checkable reasoning steps
    steps_correct: int = 0
    needed: int = 0                 # counts the question needs
    needed_stated: int = 0          # of those, stated correctly in the chain
    conclusion: str | None = None   # the answer the chain itself concludes
    answer_follows: bool | None = None  # None: the chain states too little to imply one

    @property
    def perception_precision(self) -> float | None:
        return self.claims_true / self.claims if self.claims else None

    @property
    def perception_coverage(self) -> float:
        return self.facts_stated / self.facts if self.facts else 0.0

    @property
    def perception_invented(self) -> float | None:
        return self.invented / self.claims if self.claims else None

    @property
    def reasoning_precision(self) -> float | None:
        return self.steps_correct / self.steps if self.steps else None

    @property
    def reasoning_coverage(self) -> float:
        return self.needed_stated / self.needed if self.needed else 0.0


# ------------------------------------------------------------------------------ perception

def _perception(caption: str, grid) -> dict:
    rows, cols = len(grid), len(grid[0])
    counts = _counts(grid)
    claims = true = invented = 0
    stated: set = set()                 # facts stated correctly
    for m in _SHAPE.finditer(caption):
        claims += 1
        if (int(m.group(1)), int(m.group(2))) == (rows, cols):
            true += 1
            stated.add(("shape",))
    for m in _ROW.finditer(caption):
        r = int(m.group(1)) - 1
        items = [w.strip().rstrip(".").strip().lower() for w in m.group(2).split(",")]
        for c, word in enumerate(w for w in items if w):
            claims += 1
            if not (0 <= r < rows and c < cols) or word not in _ALL_COLOURS:
                invented += 1
            elif grid[r][c] == word:
                true += 1
                stated.add(("cell", r, c))
    for m in _COUNT.finditer(caption):
        claims += 1
        colour = m.group(2)
        if counts[colour] == int(m.group(1)):
            true += 1
            stated.add(("count", colour))
    for m in _PRESENT.finditer(caption):
        words = [w.strip().lower() for w in m.group(1).split(",") if w.strip()]
        for word in words:
            claims += 1
            if word == "none":
                true += not any(counts[c] for c in COLOURS)
            elif word not in COLOURS:
                invented += 1
            elif counts[word]:
                true += 1
    facts = 1 + rows * cols + sum(1 for c in _ALL_COLOURS if counts[c])
    stated = {f for f in stated if f[0] != "count" or counts[f[1]]}   # "0 red cells": true, no fact
    return {"claims": claims, "claims_true": true, "invented": invented, "facts": facts,
            "facts_stated": len(stated)}


# ------------------------------------------------------------------------------- reasoning

def _needed(question: Question) -> list[str]:
    """The colours whose counts the question needs."""
    return list(COLOURS) if question.kind in ("coloured", "most") else list(question.colours)


def _arith(text: str) -> tuple[list[int], list[str]]:
    """``"2 - -1"`` -> ([2, -1], ["-"]) (the equation regex only admits such text)."""
    first = re.match(rf"\s*({_NUM})", text)
    numbers, ops = [int(first.group(1))], []
    for m in re.finditer(rf"\s*([-+x])\s*({_NUM})", text[first.end():]):
        ops.append(m.group(1))
        numbers.append(int(m.group(2)))
    return numbers, ops


def _evaluate(numbers: list[int], ops: list[str]) -> int:
    """Left to right with ``x`` before ``+``/``-`` (the chains only ever use one kind)."""
    terms, signs = [numbers[0]], []
    for op, n in zip(ops, numbers[1:]):
        if op == "x":
            terms[-1] *= n
        else:
            terms.append(n)
            signs.append(op)
    value = terms[0]
    for sign, term in zip(signs, terms[1:]):
        value = value + term if sign == "+" else value - term
    return value


def _option(question: Question, choice: str) -> str | None:
    return LETTERS[question.options.index(choice)] if choice in question.options else None


def _reasoning(think: str, answer: str | None, grid, question: Question) -> dict:
    """Steps checked against the true counts; the chain's conclusion is its last final step's
    (the stated result, the option a stated relation/parity/arg-max picks), else its last "The
    answer is X", else the question solved on the counts it states."""
    counts = _counts(grid)
    truth = {**counts, "k": question.k}
    steps = correct = 0
    used: dict = {}                  # quantity -> value the final step uses (the last one wins)
    stated: dict = {}                # colour -> count of its first count sentence
    conclusion: str | None = None
    for m in _COUNT.finditer(think):
        steps += 1
        colour, n = m.group(2), int(m.group(1))
        correct += counts[colour] == n
        stated.setdefault(colour, n)
    kind = question.kind
    if kind in ("sum", "diff", "times", "coloured"):
        operands = [question.colours[0], "k"] if kind == "times" else _needed(question)
        for m in _EQUATION.finditer(think):
            numbers, ops = _arith(m.group(1))
            steps += 1
            if len(numbers) != len(operands):       # not this question's step: wrong
                continue
            result = int(m.group(2))
            grounded = all(truth[q] == n for q, n in zip(operands, numbers))
            correct += grounded and _evaluate(numbers, ops) == result
            used.update(zip(operands, numbers))
            conclusion = str(result)
    elif kind == "compare":
        a, b = question.colours
        for m in _COMPARE.finditer(think):
            steps += 1
            x, rel, y = int(m.group(1)), m.group(2), int(m.group(3))
            holds = {"<": x < y, ">": x > y, "=": x == y}[rel]
            correct += holds and (counts[a], counts[b]) == (x, y)
            used.update({a: x, b: y})
            conclusion = _option(question, {">": a, "<": b, "=": "equal"}[rel])
    elif kind == "parity":
        a = question.colours[0]
        for m in _PARITY.finditer(think):
            steps += 1
            n, word = int(m.group(1)), m.group(2)
            correct += counts[a] == n and (n % 2 == 1) == (word == "odd")
            used[a] = n
            conclusion = _option(question, word)
    else:   # most
        best = max(COLOURS, key=lambda c: counts[c])
        for m in _MOST.finditer(think):
            steps += 1
            n, colour = int(m.group(1)), m.group(2).lower()
            correct += colour == best and counts[best] == n
            conclusion = _option(question, colour)
    needed = _needed(question)
    if conclusion is None:              # no final step: "The answer is X." concludes
        said = [m.group(1) for m in _STATED.finditer(think)]
        if said:
            conclusion = _option(question, said[-1].lower()) or said[-1]
    if conclusion is None and needed and all(c in stated for c in needed):
        known = {**{c: 0 for c in COLOURS}, **stated}
        conclusion = (str(known[needed[0]] * question.k) if kind == "times"
                      else solve(question, known))
    follows = None
    if conclusion is not None:
        follows = bool(answer) and judge_answer(answer, conclusion)[0] == 1.0
    needed_stated = sum(1 for c in needed if used.get(c, stated.get(c)) == counts[c])
    return {"steps": steps, "steps_correct": int(correct), "needed": len(needed),
            "needed_stated": needed_stated, "conclusion": conclusion,
            "answer_follows": follows}


# ----------------------------------------------------------------------------------- entry

def score_fidelity(text: str, meta: dict, answer: str | None = None) -> Fidelity:
    """Checks one decoded response against its row's ``meta`` (and ``answer``: the ground truth,
    default: solved from the meta)."""
    grid, question = question_from_meta(meta)
    truth = answer if answer is not None else solve(question, _counts(grid))
    reward = score_response(text, str(truth))
    segments = split_segments(text)
    counts = _counts(grid)
    facts = 1 + len(grid) * len(grid[0]) + sum(1 for c in _ALL_COLOURS if counts[c])
    if not segments.valid:
        return Fidelity(False, reward.accuracy, facts=facts, needed=len(_needed(question)))
    caption = parse_response(segments.caption).caption or ""
    reasoning = parse_response(segments.reasoning)
    return Fidelity(True, reward.accuracy, **_perception(caption, grid),
                    **_reasoning(reasoning.think or "", reasoning.answer, grid, question))


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def summarize_fidelity(scores: Sequence[Fidelity]) -> dict[str, float | None]:
    """Per-response means (``None``: no response had anything to measure). Precisions and the
    invented share average over responses with at least one claim/step; coverages over all."""
    return {
        "accuracy": _mean(s.accuracy for s in scores),
        "format_rate": _mean(float(s.format_ok) for s in scores),
        "perception_precision": _mean(s.perception_precision for s in scores),
        "perception_coverage": _mean(s.perception_coverage for s in scores),
        "perception_invented": _mean(s.perception_invented for s in scores),
        "reasoning_precision": _mean(s.reasoning_precision for s in scores),
        "reasoning_coverage": _mean(s.reasoning_coverage for s in scores),
        "answer_follows": _mean(None if s.answer_follows is None else float(s.answer_follows)
                                for s in scores),
        "responses": float(len(scores)),
    }


def eval_metrics(name: str, texts: Sequence[str], metas: Sequence[dict | None],
                 answers: Sequence[str | None] | None = None) -> dict[str, float]:
    """``eval/<name>/<key>`` for the held-out generations of one file: the call the held-out
    evaluator makes with its generated texts and the rows' ``meta`` (rows without a synthetic
    ``meta`` are left out; nothing is returned when no row has one)."""
    answers = answers if answers is not None else [None] * len(texts)
    if not (len(texts) == len(metas) == len(answers)):
        raise ValueError(f"{len(texts)} texts, {len(metas)} metas, {len(answers)} answers")
    scores = [score_fidelity(t, m, a) for t, m, a in zip(texts, metas, answers)
              if isinstance(m, dict) and "grid" in m and "question" in m]
    if not scores:
        return {}
    summary = summarize_fidelity(scores)
    return {f"eval/{name}/{k}": v for k in FIDELITY_KEYS if (v := summary[k]) is not None}


def heldout_metrics(name: str, scored: Sequence[Sequence], metas: Sequence[dict | None],
                    answers: Sequence[str | None] | None = None) -> dict[str, float]:
    """:func:`eval_metrics` of ``eval.heldout.generate_and_score``'s output: ``scored[i]`` are the
    samples (anything with ``.text``) of prompt i, ``metas[i]`` / ``answers[i]`` its row's meta and
    ground truth; every sample counts once."""
    if len(scored) != len(metas):
        raise ValueError(f"{len(scored)} prompts but {len(metas)} metas")
    answers = answers if answers is not None else [None] * len(scored)
    flat = [(s.text, meta, answer) for group, meta, answer in zip(scored, metas, answers)
            for s in group]
    return eval_metrics(name, [t for t, _, _ in flat], [m for _, m, _ in flat],
                        [a for _, _, a in flat])
