"""Response format (spec §2.2) and segment split (spec §2.3)."""

import pytest

from prism_megatron.rewards.response import (
    extract_answer,
    extract_boxed,
    is_format_valid,
    parse_response,
    split_segments,
)

VALID = "<caption>a cat</caption>\n<think>count legs</think>\n<answer>4</answer>"


@pytest.mark.parametrize("text,valid", [
    (VALID, True),
    ("  \n" + VALID + "\n\n ", True),                                        # outer whitespace ok
    ("<caption></caption><think></think><answer></answer>", True),         # empty blocks ok
    ("<caption>x</caption>  <think>y</think>\t<answer>z</answer>", True),
    ("<caption>a\nb</caption><think>multi\nline</think><answer>1\n2</answer>", True),  # DOTALL
    (VALID + " done", False),                                               # text after </answer>
    ("Sure! " + VALID, False),                                              # text before <caption>
    ("<think>r</think><answer>A</answer>", False),                          # no caption
    ("<caption>x</caption><answer>z</answer><think>y</think>", False),      # wrong order
    ("<caption>x</caption>text<think>y</think><answer>z</answer>", False),  # non-space between
    ("<Caption>x</Caption><think>y</think><answer>z</answer>", False),      # case-sensitive
    ('<caption id="1">x</caption><think>y</think><answer>z</answer>', False),  # no attributes
    ("<caption>x</caption><think>y</think><answer>truncated", False),      # hit max length
    # Lazy groups + end anchor: a stray <answer> inside <think> is tolerated.
    ("<caption>x</caption><think>y <answer>1</answer> z</think><answer>2</answer>", True),
    ("<caption>x</caption><think>y</think><answer>1</answer><answer>2</answer>", True),
])
def test_format_regex(text, valid):
    assert is_format_valid(text) is valid
    assert parse_response(text).format_ok is valid


def test_parse_response_fields():
    parsed = parse_response(
        "<caption> a cat </caption>\n<think>\ncount legs\n</think><answer> 4 </answer>"
    )
    assert (parsed.caption, parsed.think, parsed.answer) == ("a cat", "count legs", "4")
    assert parsed.format_ok
    missing = parse_response("no tags here")
    assert (missing.caption, missing.think, missing.answer) == (None, None, None)
    assert not missing.format_ok
    # Invalid format still exposes the first answer block (used by evaluation).
    assert parse_response("<answer>B</answer> trailing").answer == "B"


def test_extract_answer_takes_the_first_block():
    text = "<caption>x</caption><think>y <answer>1</answer></think><answer>2</answer>"
    assert extract_answer(text) == "1"
    assert extract_answer("<answer>\n  7 \n</answer>") == "7"
    assert extract_answer("nothing") is None


def test_split_segments_valid():
    text = "<caption>a cat</caption>\n<think>r</think>\n<answer>4</answer>\n"
    seg = split_segments(text)
    assert seg.valid
    assert seg.caption == "<caption>a cat</caption>"
    assert seg.reasoning == "<think>r</think>\n<answer>4</answer>"
    assert text[:seg.caption_end] == "<caption>a cat</caption>"
    # The whitespace after </caption> belongs to the reasoning side of the boundary (§2.3).
    assert text[seg.caption_end:].startswith("\n<think>")


def test_split_segments_invalid_uses_halfway_fallback():
    seg = split_segments("abcdefgh")
    assert not seg.valid and seg.caption_end == 4
    assert (seg.caption, seg.reasoning) == ("abcd", "efgh")
    assert split_segments("a").caption_end == 1  # max(1, len // 2)


@pytest.mark.parametrize("text,boxed", [
    (r"\boxed{3}", "3"),
    (r"so \boxed{\frac{1}{2}} done", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{ 2 }", "2"),
    (r"\boxed{unbalanced", None),
    ("plain", None),
])
def test_extract_boxed(text, boxed):
    assert extract_boxed(text) == boxed
