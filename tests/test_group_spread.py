"""Within-group score spread and flat groups (``algorithms.advantages.group_spread``)."""

import math

import pytest
import torch

from prism_megatron.algorithms.advantages import group_spread, prism_advantages


def test_hand_computed_spread_and_flat_groups():
    # g0: all valid; g1: one invalid member (left out of the spread); g2: all invalid;
    # g3: two valid members with identical scores.
    caption = torch.tensor([1.0, 2.0, 4.0, 5.0, 9.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0])
    reasoning = torch.tensor([0.0, 0.0, 3.0, 1.0, 1.0, 7.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    valid = torch.tensor([True, True, True, True, True, False, False, False, False, True, True])
    group = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    advantages = prism_advantages(caption, reasoning, valid, group)
    out = group_spread(caption, reasoning, valid, group, advantages)
    # g0 caption: mean 7/3, squared deviations 42/9, / (3 - 1) -> sqrt(7/3); reasoning sqrt(3)
    # g1 caption [5, 9]: sqrt(8); reasoning [1, 1]: 0; g2: no valid member (left out); g3: 0, 0
    assert out["caption"] == pytest.approx((math.sqrt(7 / 3) + math.sqrt(8) + 0.0) / 3, rel=1e-12)
    assert out["reasoning"] == pytest.approx((math.sqrt(3) + 0.0 + 0.0) / 3, rel=1e-12)
    # g2 (all invalid: every advantage -1.5) and g3 (identical scores: 0) are flat; g1 is not
    # (its caption scores differ, and its invalid member is ranked last)
    assert advantages[6:9].tolist() == [-1.5] * 3 and advantages[9:].tolist() == [0.0, 0.0]
    assert out["flat_groups"] == 0.5


def test_no_group_with_two_valid_members():
    caption, reasoning = torch.tensor([3.0, 0.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 0.0])
    valid = torch.tensor([True, False, False, False])
    group = ["a", "a", "b", "b"]
    out = group_spread(caption, reasoning, valid, group,
                       prism_advantages(caption, reasoning, valid, group))
    # group a: one valid member (no spread) but ranked above its invalid one; b: all invalid
    assert out == {"caption": 0.0, "reasoning": 0.0, "flat_groups": 0.5}


def test_lengths_must_agree():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="differ in length"):
        group_spread(x, x, torch.ones(3, dtype=torch.bool), [0, 0], x)
