"""The policy's response format: ``<caption>…</caption> <think>…</think> <answer>…</answer>``.

This module owns the format (spec §2): the system prompt that requests it, its tags, the one
regex (spec §2.2) that decides format validity everywhere it matters (the discriminator's format
score, its training mask, the RLVR reward gate) and the writer of the canonical layout.

The system prompt is the default of ``data.system_prompt``: a row that carries its own system
message keeps it, the default is added only to rows without one
(``prism_megatron.data.rows.apply_system_prompt``, the one place that applies the rule for every
stage, the warm-up pairs and evaluation), so SFT data, alignment rollouts and the discriminator
all see the same text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "FORMAT_PATTERN",
    "FORMAT_TAGS",
    "SYSTEM_PROMPT",
    "ParsedResponse",
    "Segments",
    "extract_answer",
    "extract_boxed",
    "format_response",
    "is_format_valid",
    "parse_response",
    "split_segments",
]

# Spec §2.1: helpful scientific assistant, answer from the image, strict XML format; caption = brief
# bullet description (style, objects, visible text), think = step-by-step reasoning, answer = final
# answer only. Our own wording of that instruction.
SYSTEM_PROMPT = (
    "You are a helpful scientific assistant. Answer the user's question based on the image. "
    "Strictly follow this XML format in your reply and write nothing outside the tags:\n"
    "<caption>a brief bullet-point description of the image: its style, the key objects and "
    "any visible text</caption>\n"
    "<think>your step-by-step reasoning</think>\n"
    "<answer>the final answer only</answer>"
)

# The three blocks, in order; every tag string below is derived from these names.
BLOCKS = ("caption", "think", "answer")
FORMAT_TAGS = tuple(tag for name in BLOCKS for tag in (f"<{name}>", f"</{name}>"))

# Spec §2.2: the WHOLE decoded response must match (DOTALL; tags exact and case-sensitive; only
# whitespace around and between the blocks). Group 1 = the caption block with its tags (the
# perception segment), group 2 = think + answer blocks (the reasoning segment, §2.3). The lazy
# groups plus the end anchor let regex backtracking tolerate duplicated/nested tags, like the
# reference.
FORMAT_PATTERN = re.compile(
    r"^\s*(<caption>.*?</caption>)\s*(<think>.*?</think>\s*<answer>.*?</answer>)\s*$",
    re.DOTALL,
)

_BLOCK_PATTERNS = {
    tag: re.compile(rf"<{tag}>(.*?)</{tag}>", re.DOTALL) for tag in BLOCKS
}


@dataclass(frozen=True)
class ParsedResponse:
    """Block contents of a response (stripped; ``None`` when the block is absent).

    Each field is the FIRST ``<tag>…</tag>`` occurrence in the text, which is how the reward
    extracts the answer (spec §5.2 step 2) even when the format check fails.
    """

    caption: str | None
    think: str | None
    answer: str | None
    format_ok: bool


@dataclass(frozen=True)
class Segments:
    """A response split for the discriminator (spec §2.3, at character level).

    ``caption`` is the ``<caption>…</caption>`` block including its tags, ``reasoning`` runs from
    ``<think>`` through ``</answer>``; ``caption_end`` is the character offset just past
    ``</caption>`` in the original text (the token-level boundary is the first token whose prefix
    decode covers it). For an invalid response ``valid`` is False and the split is the fallback
    halfway cut ``max(1, len // 2)`` that keeps every rank's forward count equal (§2.3 item 4).
    """

    caption: str
    reasoning: str
    caption_end: int
    valid: bool


def format_response(caption: str, think: str, answer: str) -> str:
    """Join the three segments in the canonical layout: one newline between blocks."""
    return f"<caption>{caption}</caption>\n<think>{think}</think>\n<answer>{answer}</answer>"


def is_format_valid(text: str) -> bool:
    """True iff the whole response matches the spec §2.2 format regex."""
    return FORMAT_PATTERN.match(text) is not None


def extract_answer(text: str) -> str | None:
    """Stripped content of the first ``<answer>…</answer>`` (non-greedy), or None (spec §5.2)."""
    match = _BLOCK_PATTERNS["answer"].search(text)
    return match.group(1).strip() if match else None


def parse_response(text: str) -> ParsedResponse:
    """Parses a decoded response (special tokens skipped) into its blocks (spec §2)."""
    blocks = {}
    for tag, pattern in _BLOCK_PATTERNS.items():
        match = pattern.search(text)
        blocks[tag] = match.group(1).strip() if match else None
    return ParsedResponse(format_ok=is_format_valid(text), **blocks)


def split_segments(text: str) -> Segments:
    """Splits a response into the perception and reasoning segments (spec §2.3 groups 1/2)."""
    match = FORMAT_PATTERN.match(text)
    if match is None:
        cut = max(1, len(text) // 2)
        return Segments(caption=text[:cut], reasoning=text[cut:], caption_end=cut, valid=False)
    return Segments(
        caption=match.group(1), reasoning=match.group(2), caption_end=match.end(1), valid=True
    )


def extract_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{…}`` in ``text`` (brace-balanced), or None.

    Not used by the reference scorer's default path (there ``\\boxed`` is only understood by the
    math-verify fallback); ``score_response(..., unwrap_boxed=True)`` opts into it.
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for position in range(begin - 1, len(text)):
        char = text[position]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[begin:position].strip()
    return None  # unbalanced: treat as no box
