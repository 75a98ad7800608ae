"""Rewards: the response format (spec §2) and the rule-based verifiable reward (spec §5)."""

from prism_megatron.rewards.response import (
    FORMAT_PATTERN,
    ParsedResponse,
    Segments,
    is_format_valid,
    parse_response,
    split_segments,
)
from prism_megatron.rewards.verifiable import RewardResult, score_response, score_responses

__all__ = [
    "FORMAT_PATTERN",
    "ParsedResponse",
    "RewardResult",
    "Segments",
    "is_format_valid",
    "parse_response",
    "score_response",
    "score_responses",
    "split_segments",
]
