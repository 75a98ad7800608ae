"""DAPO dynamic sampling and overlong shaping (spec §6.3)."""

import random

import pytest
import torch

from prism_megatron.algorithms.sampling import keep_informative_groups, overlong_penalty


def test_keep_informative_groups():
    accuracy = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    ids = ["a", "a", "b", "b", "c", "c", "d", "e", "e", "e"]
    kept = keep_informative_groups(accuracy, ids)
    # a all correct, b all wrong -> dropped; c mixed, d singleton -> kept; e all 1 -> dropped
    assert kept.tolist() == [False, False, False, False, True, True, True, False, False, False]
    assert kept.dtype == torch.bool


def test_keep_informative_groups_uses_exact_equality():
    # 0.1 three times has a float64 population std of ~1e-17 on some paths; it must still drop.
    metric = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1000001], dtype=torch.float64)
    assert keep_informative_groups(metric, [0, 0, 0, 1, 1]).tolist() == [False] * 3 + [True] * 2


def test_keep_informative_groups_matches_population_std_rule():
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(6) for _ in range(rng.randint(1, 20))]
        metric = torch.tensor([float(rng.random() < 0.5) for _ in ids])
        kept = keep_informative_groups(metric, torch.tensor(ids))
        for g in set(ids):
            members = [i for i, gid in enumerate(ids) if gid == g]
            values = metric[members]
            expected = len(members) == 1 or values.std(unbiased=False).item() > 0
            assert all(kept[i].item() == expected for i in members)


def test_keep_informative_groups_length_mismatch():
    with pytest.raises(ValueError):
        keep_informative_groups(torch.zeros(3), [0, 0])


def test_overlong_penalty_dapo_settings():
    lengths = torch.tensor([0, 100, 4096, 5120, 6144, 8192])
    penalty = overlong_penalty(lengths, max_response_length=8192, buffer_length=4096)
    assert penalty.tolist() == pytest.approx([0.0, 0.0, 0.0, -0.25, -0.5, -1.0])
    half = overlong_penalty(lengths, 8192, 4096, penalty_factor=0.5)
    assert half.tolist() == pytest.approx([0.0, 0.0, 0.0, -0.125, -0.25, -0.5])
    assert overlong_penalty(lengths, 8192, 0).tolist() == [0.0] * 6  # disabled (GSPO script)
