"""Group-normalised advantages: GRPO (spec §6.1) and PRISM mode 1 (spec §4)."""

import math
import random
import uuid

import pytest
import torch

from prism_megatron.algorithms.advantages import (
    broadcast_to_tokens,
    group_normalize,
    grpo_advantages,
    prism_advantages,
)

EPS = 1e-6


def test_spec_worked_example_4_4():
    caption = torch.tensor([2.0, 1.0, 0.0, 3.0])
    reasoning = torch.tensor([-1.0, 0.5, 0.0, 1.5])
    format_ok = torch.tensor([True, True, False, True])
    # Intermediate values of §4.4: c' = [2, 1, 0, 3], t' = [-1, 0.5, -2, 1.5].
    gn_c = group_normalize(torch.tensor([2.0, 1.0, 0.0, 3.0]), [0] * 4)
    gn_t = group_normalize(torch.tensor([-1.0, 0.5, -2.0, 1.5]), [0] * 4)
    assert gn_c.tolist() == pytest.approx([0.387, -0.387, -1.162, 1.162], abs=1e-3)
    assert gn_t.tolist() == pytest.approx([-0.482, 0.482, -1.126, 1.126], abs=1e-3)
    advantages = prism_advantages(caption, reasoning, format_ok, ["p"] * 4)
    assert advantages.tolist() == pytest.approx([-0.047, 0.047, -2.644, 1.144], abs=1e-3)


def test_grpo_hand_computed():
    scores = torch.tensor([1.0, 0.2, 0.0, 1.0, 0.0])
    advantages = grpo_advantages(scores, ["a", "a", "a", "b", "b"])
    std_a = math.sqrt((0.6**2 + 0.2**2 + 0.4**2) / 2)  # unbiased, mean 0.4
    std_b = math.sqrt(0.5**2 * 2 / 1)                  # mean 0.5
    expected = [0.6 / (std_a + EPS), -0.2 / (std_a + EPS), -0.4 / (std_a + EPS),
                0.5 / (std_b + EPS), -0.5 / (std_b + EPS)]
    assert advantages.tolist() == pytest.approx(expected, rel=1e-6)
    centred = grpo_advantages(scores, ["a", "a", "a", "b", "b"], norm_by_std=False)
    assert centred.tolist() == pytest.approx([0.6, -0.2, -0.4, 0.5, -0.5], abs=1e-7)


def test_singleton_and_constant_groups():
    scores = torch.tensor([0.7, 0.2, 0.2, 0.2, -3.0])
    advantages = grpo_advantages(scores, [1, 2, 2, 2, 3])
    assert advantages[0].item() == pytest.approx(0.7 / (1 + EPS), rel=1e-7)   # mean 0, std 1
    assert advantages[4].item() == pytest.approx(-3.0 / (1 + EPS), rel=1e-7)
    assert advantages[1:4].tolist() == [0.0, 0.0, 0.0]                         # exactly zero
    centred = grpo_advantages(scores, [1, 2, 2, 2, 3], norm_by_std=False)
    assert centred[0].item() == pytest.approx(0.7)


def test_eps_is_added_to_std():
    advantages = grpo_advantages(torch.tensor([0.0, 1e-6]), [0, 0])
    std = math.sqrt(2) * 0.5e-6
    assert advantages[1].item() == pytest.approx(0.5e-6 / (std + 1e-6), rel=1e-6)
    assert grpo_advantages(torch.tensor([0.0, 2.0]), [0, 0], eps=0.5)[1].item() == pytest.approx(
        1.0 / (math.sqrt(2) + 0.5)
    )


def test_group_ids_any_hashable_and_order():
    ids = [uuid.UUID(int=3), uuid.UUID(int=1), uuid.UUID(int=3), uuid.UUID(int=1)]
    scores = torch.tensor([1.0, 5.0, 0.0, 3.0])
    by_uuid = grpo_advantages(scores, ids)
    by_tensor = grpo_advantages(scores, torch.tensor([7, 9, 7, 9]))
    by_str = grpo_advantages(scores, ["x", "y", "x", "y"])
    assert torch.equal(by_uuid, by_tensor) and torch.equal(by_uuid, by_str)
    # group x = [1, 0]: mean 0.5, std sqrt(0.5); group y = [5, 3]: mean 4, std sqrt(2)
    x, y = 0.5 / (math.sqrt(0.5) + EPS), 1 / (math.sqrt(2) + EPS)
    assert by_uuid.tolist() == pytest.approx([x, y, -x, -y])


def test_dtype_no_grad_and_errors():
    scores = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    out = grpo_advantages(scores, [0, 0, 0])
    assert out.dtype == torch.float64 and not out.requires_grad
    assert grpo_advantages(torch.tensor([1, 0]), [0, 0]).dtype == torch.float32
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(3), [0, 0])
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(2, 2), [0, 0])


def _random_batch(rng: random.Random, num_groups: int):
    sizes = [rng.randint(1, 6) for _ in range(num_groups)]
    ids = [g for g, size in enumerate(sizes) for _ in range(size)]
    rng.shuffle(ids)
    scores = torch.tensor([rng.choice([0.0, 0.2, 1.0, rng.uniform(-5, 5)]) for _ in ids])
    return scores, ids


def test_properties_randomized():
    rng = random.Random(1234)
    for _ in range(200):
        scores, ids = _random_batch(rng, rng.randint(1, 5))
        advantages = grpo_advantages(scores, ids)
        shift = {g: rng.uniform(-10, 10) for g in set(ids)}
        shifted = scores + torch.tensor([shift[g] for g in ids])
        ids_t = torch.tensor(ids)
        for g in set(ids):
            members = ids_t == g
            if members.sum() > 1:
                assert advantages[members].mean().item() == pytest.approx(0.0, abs=1e-5)
                # shift invariance (not for singletons, which are not centred)
                assert torch.allclose(grpo_advantages(shifted, ids)[members], advantages[members],
                                      atol=1e-4)
        # permutation equivariance
        perm = list(range(len(ids)))
        rng.shuffle(perm)
        permuted = grpo_advantages(scores[perm], [ids[i] for i in perm])
        assert torch.allclose(permuted, advantages[perm], atol=1e-6)


def test_prism_all_invalid_group_gets_minus_penalty():
    caption = torch.tensor([3.0, -2.0, 0.0, 1.0, 2.0])
    reasoning = torch.tensor([1.0, 9.0, 0.0, 1.0, 0.5])
    format_ok = torch.tensor([False, False, False, True, True])
    advantages = prism_advantages(caption, reasoning, format_ok, [0, 0, 0, 1, 1],
                                  format_penalty=1.5)
    assert advantages[:3].tolist() == [-1.5, -1.5, -1.5]
    # A singleton invalid group is not "all zeros": c' = t' = -1 -> -1/(1+eps) - p (formula parity).
    single = prism_advantages(torch.tensor([4.0]), torch.tensor([4.0]), torch.tensor([False]), [0])
    assert single.item() == pytest.approx(-1 / (1 + EPS) - 1.5, rel=1e-7)


def test_prism_invalid_rescoring_and_penalty():
    caption = torch.tensor([2.0, 5.0, 100.0])
    reasoning = torch.tensor([1.0, 3.0, -100.0])
    format_ok = torch.tensor([1.0, 1.0, 0.0])  # numeric format scores: <= 0 is invalid
    advantages = prism_advantages(caption, reasoning, format_ok, [0, 0, 0], caption_weight=0.3,
                                  reasoning_weight=0.7, format_penalty=2.0)
    c_prime = torch.tensor([2.0, 5.0, 1.0])   # invalid -> valid min (2) - 1, its own 100 ignored
    t_prime = torch.tensor([1.0, 3.0, 0.0])
    expected = (0.3 * group_normalize(c_prime, [0] * 3) + 0.7 * group_normalize(t_prime, [0] * 3)
                - 2.0 * torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(advantages, expected, atol=1e-6)
    # The invalid member keeps its normalised alignment term (code, not docstring; spec §9.1).
    assert advantages[2].item() < -2.0


def test_prism_properties_randomized():
    rng = random.Random(7)
    for _ in range(200):
        caption, ids = _random_batch(rng, rng.randint(1, 4))
        reasoning = torch.tensor([rng.uniform(-10, 10) for _ in ids])
        format_ok = torch.tensor([rng.random() < 0.7 for _ in ids])
        advantages = prism_advantages(caption, reasoning, format_ok, ids)
        penalty = 1.5 * (~format_ok).float()
        shift = {g: rng.uniform(-5, 5) for g in set(ids)}
        shift_t = torch.tensor([shift[g] for g in ids])
        shifted = prism_advantages(caption + shift_t, reasoning - shift_t, format_ok, ids)
        ids_t = torch.tensor(ids)
        for g in set(ids):
            members = ids_t == g
            if members.sum() > 1:
                align = advantages[members] + penalty[members]
                assert align.mean().item() == pytest.approx(0.0, abs=1e-5)
                assert torch.allclose(shifted[members], advantages[members], atol=1e-4)
                if not format_ok[members].any():
                    assert torch.allclose(advantages[members], torch.full_like(align, -1.5))


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    assert out.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]
