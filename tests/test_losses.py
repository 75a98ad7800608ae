"""Aggregation, PPO/DAPO/GSPO policy losses, KL estimators, discriminator loss (spec §3.4, §6)."""

import math

import pytest
import torch

from prism_megatron.algorithms.losses import (
    AGG_MODES,
    aggregate,
    aggregation_denominator,
    discriminator_loss,
    kl_penalty,
    pairwise_accuracy,
    policy_loss,
    tis_weights,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------- aggregation

LOSS = torch.arange(1.0, 13.0).reshape(3, 4)   # [[1,2,3,4],[5,6,7,8],[9,10,11,12]]
MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]])  # third sequence empty
AGG_CASES = {
    # mode: (value, d value / d loss on the mask)
    "token-mean": (21 / 5, [[1 / 5] * 2, [1 / 5] * 3]),
    "seq-mean-token-sum": ((3 + 18) / 2, [[1 / 2] * 2, [1 / 2] * 3]),
    "seq-mean-token-mean": ((1.5 + 6) / 2, [[1 / 4] * 2, [1 / 6] * 3]),
    "seq-mean-token-sum-norm": (21 / 4, [[1 / 4] * 2, [1 / 4] * 3]),
    "token-mean-micro": (21 / 5, [[1 / 5] * 2, [1 / 5] * 3]),   # one micro-batch: token-mean
}


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_values_and_gradients(mode):
    value, grads = AGG_CASES[mode]
    loss = LOSS.clone().requires_grad_(True)
    out = aggregate(loss, MASK, mode)
    assert out.item() == pytest.approx(value)
    out.backward()
    expected = torch.zeros(3, 4)
    expected[0, :2] = torch.tensor(grads[0])
    expected[1, :3] = torch.tensor(grads[1])
    assert torch.allclose(loss.grad, expected)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_ignores_garbage_outside_the_mask(mode):
    loss = LOSS.clone()
    loss[0, 3], loss[2, 0] = float("nan"), float("inf")
    loss.requires_grad_(True)
    out = aggregate(loss, MASK.bool(), mode)
    assert out.item() == pytest.approx(AGG_CASES[mode][0])
    out.backward()
    assert torch.isfinite(loss.grad).all()


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batches_sum_to_the_whole_batch(mode):
    if mode == "token-mean-micro":
        pytest.skip("depends on the split by design (tests/test_loss_agg_micro.py)")
    generator = torch.Generator().manual_seed(0)
    loss = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    mask = (torch.rand(7, 5, generator=generator) > 0.4).long()
    mask[2] = 0  # an empty sequence
    whole_loss = loss.clone().requires_grad_(True)
    whole = aggregate(whole_loss, mask, mode)
    whole.backward()

    chunks = [(0, 4), (4, 5), (5, 7)]  # uneven, so naive averaging would be wrong
    if mode == "seq-mean-token-sum-norm":
        denominator = aggregation_denominator(mask, mode)  # the constant T, not summed
        assert denominator.item() == 5
    else:
        denominator = sum(aggregation_denominator(mask[a:b], mode) for a, b in chunks)
        assert denominator.item() == aggregation_denominator(mask, mode).item()
    pieces_loss = loss.clone().requires_grad_(True)
    total = sum(aggregate(pieces_loss[a:b], mask[a:b], mode, denominator=denominator)
                for a, b in chunks)
    total.backward()
    assert total.item() == pytest.approx(whole.item(), abs=1e-12)
    assert torch.allclose(pieces_loss.grad, whole_loss.grad)
    # ... whereas averaging the per-chunk means is NOT the whole-batch value in general.
    naive = sum(aggregate(loss[a:b], mask[a:b], mode) for a, b in chunks) / len(chunks)
    if mode != "seq-mean-token-sum-norm":
        assert naive.item() != pytest.approx(whole.item(), abs=1e-6)


def test_aggregate_empty_and_bad_mode():
    loss = torch.ones(2, 3, requires_grad=True)
    for mode in AGG_MODES:
        assert aggregate(loss, torch.zeros(2, 3), mode).item() == 0.0
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(loss, torch.ones(2, 3), "mean")


# ---------------------------------------------------------------------------- vanilla PPO / DAPO

def test_ratio_one_gives_minus_mean_advantage():
    log_probs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], requires_grad=True)
    advantages = torch.tensor([[0.5, 0.5, 0.5], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, metrics = policy_loss(log_probs, log_probs.detach().clone(), advantages, mask)
    assert loss.item() == pytest.approx(-(0.5 * 3 - 2.0 * 2) / 5)
    loss.backward()
    assert torch.allclose(log_probs.grad, -advantages * mask / 5)  # d rho / d logp = rho = 1
    assert metrics["clip_frac"].item() == 0 and metrics["approx_kl"].item() == 0
    assert metrics["ratio_mean"].item() == 1 and metrics["ratio_max"].item() == 1


# (A, ratio) -> (per-token loss with dual clip 3, its d/d logp, clipped?, dual-clipped?)
CLIP_ROWS = [
    (+1.0, 1.5, -1.2, 0.0, True, False),   # A>0 above 1+eps: clipped, no gradient
    (+1.0, 0.5, -0.5, -0.5, False, False),  # A>0 below 1-eps: pessimistic max keeps rho
    (-1.0, 0.5, 0.8, 0.0, True, False),    # A<0 below 1-eps: clipped
    (-1.0, 1.5, 1.5, 1.5, False, False),   # A<0 above: unclipped, below the dual bound 3
    (-1.0, 5.0, 3.0, 0.0, False, True),    # A<0 far above: dual clip caps at -A*3
    (+2.0, 5.0, -2.4, 0.0, True, False),   # A>0 far above: NO dual clip for A>0
]


def _clip_batch():
    advantages = torch.tensor([[row[0]] for row in CLIP_ROWS])
    old_log_probs = torch.zeros(len(CLIP_ROWS), 1)
    log_probs = torch.log(torch.tensor([[row[1]] for row in CLIP_ROWS])).requires_grad_(True)
    return log_probs, old_log_probs, advantages, torch.ones(len(CLIP_ROWS), 1)


def test_vanilla_clip_and_dual_clip():
    log_probs, old, advantages, mask = _clip_batch()
    loss, metrics = policy_loss(log_probs, old, advantages, mask, clip_low=0.2, clip_high=0.2,
                                dual_clip=3.0)
    n = len(CLIP_ROWS)
    assert loss.item() == pytest.approx(sum(row[2] for row in CLIP_ROWS) / n)
    loss.backward()
    assert log_probs.grad.flatten().tolist() == pytest.approx([row[3] / n for row in CLIP_ROWS])
    assert metrics["clip_frac"].item() == pytest.approx(sum(row[4] for row in CLIP_ROWS) / n)
    assert metrics["clip_frac_dual"].item() == pytest.approx(1 / n)
    ratios = [row[1] for row in CLIP_ROWS]
    approx_kl = -sum(math.log(r) for r in ratios) / n  # k1 on the log-ratio
    assert metrics["approx_kl"].item() == pytest.approx(approx_kl, rel=1e-6)
    assert metrics["ratio_mean"].item() == pytest.approx(sum(ratios) / n)
    assert metrics["ratio_max"].item() == pytest.approx(5.0)


def test_dual_clip_disabled_and_validated():
    log_probs, old, advantages, mask = _clip_batch()
    loss, metrics = policy_loss(log_probs, old, advantages, mask, dual_clip=None)
    per_token = [row[2] for row in CLIP_ROWS]
    per_token[4] = 5.0  # A=-1, rho=5 is no longer capped
    assert loss.item() == pytest.approx(sum(per_token) / len(CLIP_ROWS))
    loss.backward()
    assert log_probs.grad[4].item() == pytest.approx(5.0 / len(CLIP_ROWS))
    assert metrics["clip_frac_dual"].item() == 0
    with pytest.raises(ValueError):
        policy_loss(log_probs, old, advantages, mask, dual_clip=1.0)


def test_clip_higher_asymmetric():
    # DAPO: eps_low 0.2, eps_high 0.28 -> A>0 tokens are clipped at 1.28 instead of 1.2.
    log_probs = torch.log(torch.tensor([[1.25, 1.35]]))
    loss, _ = policy_loss(log_probs, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2),
                          clip_low=0.2, clip_high=0.28, dual_clip=10.0)
    assert loss.item() == pytest.approx(-(1.25 + 1.28) / 2)


def test_token_log_ratio_is_clamped_at_20():
    log_probs = torch.tensor([[30.0, -30.0]], requires_grad=True)
    loss, metrics = policy_loss(log_probs, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2),
                                clip_low=0.999, clip_high=1e12, dual_clip=None)
    assert metrics["ratio_max"].item() == pytest.approx(math.exp(20), rel=1e-5)
    assert loss.item() == pytest.approx((-math.exp(20) - math.exp(-20)) / 2, rel=1e-5)
    loss.backward()
    assert log_probs.grad.abs().sum().item() == 0  # outside the clamp: no gradient


def test_tis_weights_multiply_the_loss():
    old = torch.tensor([[-1.0, -1.0, -2.0]])
    rollout = torch.tensor([[-1.5, -0.5, -2.0 - math.log(10.0)]], requires_grad=True)
    weights = tis_weights(old, rollout, cap=2.0)
    assert not weights.requires_grad
    assert weights.tolist()[0] == pytest.approx([math.exp(0.5), math.exp(-0.5), 2.0])
    log_probs = old.clone().requires_grad_(True)
    advantages = torch.tensor([[1.0, -2.0, 0.5]])
    loss, _ = policy_loss(log_probs, old, advantages, torch.ones(1, 3), rollout_is_weights=weights)
    expected = -(1.0 * math.exp(0.5) - 2.0 * math.exp(-0.5) + 0.5 * 2.0) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.allclose(log_probs.grad, -advantages * weights / 3)


def test_policy_loss_micro_batches_sum_to_whole():
    generator = torch.Generator().manual_seed(3)
    log_probs = -torch.rand(6, 5, generator=generator, dtype=torch.float64)
    old = log_probs + 0.3 * torch.randn(6, 5, generator=generator, dtype=torch.float64)
    advantages = torch.randn(6, 1, generator=generator, dtype=torch.float64).expand(6, 5)
    mask = (torch.rand(6, 5, generator=generator) > 0.3).long()
    for level, mode in (("token", "token-mean"), ("sequence", "seq-mean-token-mean")):
        whole, _ = policy_loss(log_probs, old, advantages, mask, ratio_level=level, agg=mode)
        chunks = ((0, 2), (2, 6))
        denominator = sum(aggregation_denominator(mask[a:b], mode) for a, b in chunks)
        parts = [policy_loss(log_probs[a:b], old[a:b], advantages[a:b], mask[a:b],
                             ratio_level=level, agg=mode, denominator=denominator)[0]
                 for a, b in chunks]
        assert sum(parts).item() == pytest.approx(whole.item(), abs=1e-12)


# ---------------------------------------------------------------------------- GSPO

def _gspo_batch(deltas):
    """Two sequences (3 and 2 tokens) with per-token log-ratio ``deltas``."""
    log_probs = torch.tensor([[-0.5, -1.0, -1.5], [-0.2, -0.4, -7.0]], dtype=torch.float64)
    old = log_probs - torch.tensor(deltas, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return log_probs.clone().requires_grad_(True), old, mask


def test_gspo_value_and_sequence_level_gradient():
    log_probs, old, mask = _gspo_batch([[0.1, -0.05, 0.25], [-0.2, 0.1, 99.0]])  # 99: padding
    advantages = torch.tensor([[1.5] * 3, [-0.7] * 3], dtype=torch.float64)
    s = torch.tensor([math.exp(0.3 / 3), math.exp(-0.1 / 2)], dtype=torch.float64)
    loss, metrics = policy_loss(log_probs, old, advantages, mask, ratio_level="sequence",
                                clip_low=0.5, clip_high=0.5)  # wide band: nothing clipped
    assert loss.item() == pytest.approx(-(1.5 * s[0] - 0.7 * s[1]).item() / 2)
    loss.backward()
    # Sequence-level form: grad = -(1/B) * A_i * s_i * grad(mean_t logp_it).
    reference_lp = log_probs.detach().clone().requires_grad_(True)
    lengths = mask.sum(-1)
    mean_lp = (reference_lp * mask).sum(-1) / lengths
    (-(advantages[:, 0] * s * mean_lp).mean()).backward()
    assert torch.allclose(log_probs.grad, reference_lp.grad)
    assert log_probs.grad[0, 0].item() == pytest.approx(-1.5 * s[0].item() / 3 / 2)
    assert metrics["clip_frac"].item() == 0
    assert metrics["ratio_max"].item() == pytest.approx(s[0].item())


def test_gspo_clipping_and_no_dual_clip():
    # seq 0: s = e^0.01 > 1 + 4e-4 with A > 0 -> clipped, no gradient;
    # seq 1: s = e^-0.01 < 1 - 3e-4 with A > 0 -> the unclipped branch is the max, gradient flows.
    log_probs, old, mask = _gspo_batch([[0.01] * 3, [-0.01, -0.01, 0.0]])
    advantages = torch.ones(2, 3, dtype=torch.float64)
    loss, metrics = policy_loss(log_probs, old, advantages, mask, ratio_level="sequence",
                                clip_low=3e-4, clip_high=4e-4, dual_clip=3.0)
    s1 = math.exp(-0.01)
    assert loss.item() == pytest.approx((-(1 + 4e-4) - s1) / 2)
    loss.backward()
    assert log_probs.grad[0].abs().sum().item() == 0
    assert log_probs.grad[1, :2].tolist() == pytest.approx([-s1 / 2 / 2] * 2)
    assert metrics["clip_frac"].item() == pytest.approx(3 / 5)
    # A < 0 with a huge sequence ratio: GSPO has no dual clip, the loss is -A * s.
    log_probs, old, mask = _gspo_batch([[5.0] * 3, [5.0, 5.0, 0.0]])
    negative = -torch.ones(2, 3, dtype=torch.float64)
    loss, metrics = policy_loss(log_probs, old, negative, mask, ratio_level="sequence",
                                clip_low=3e-4, clip_high=4e-4, dual_clip=3.0)
    assert loss.item() == pytest.approx(math.exp(5.0))
    assert metrics["clip_frac_dual"].item() == 0


def test_gspo_log_ratio_clamped_above_at_10():
    log_probs, old, mask = _gspo_batch([[12.0] * 3, [-12.0, -12.0, 0.0]])
    loss, metrics = policy_loss(log_probs, old, -torch.ones(2, 3, dtype=torch.float64), mask,
                                ratio_level="sequence", clip_low=0.2, clip_high=0.2)
    assert metrics["ratio_max"].item() == pytest.approx(math.exp(10.0))
    assert loss.item() == pytest.approx((math.exp(10.0) + 0.8) / 2)  # seq 1 clipped at 1 - 0.2
    loss.backward()
    assert log_probs.grad.abs().sum().item() == 0  # clamped / clipped everywhere


def test_gspo_default_aggregation_and_warning():
    log_probs, old, mask = _gspo_batch([[0.0] * 3, [0.0] * 3])
    advantages = torch.tensor([[1.0] * 3, [4.0] * 3], dtype=torch.float64)
    loss, _ = policy_loss(log_probs, old, advantages, mask, ratio_level="sequence")
    assert loss.item() == pytest.approx(-(1.0 + 4.0) / 2)      # seq-mean-token-mean
    with pytest.warns(UserWarning, match="seq-mean-token-mean"):
        loss, _ = policy_loss(log_probs, old, advantages, mask, ratio_level="sequence",
                              agg="token-mean")
    assert loss.item() == pytest.approx(-(3 * 1.0 + 2 * 4.0) / 5)
    with pytest.raises(ValueError):
        policy_loss(log_probs, old, advantages, mask, ratio_level="tokens")


# ---------------------------------------------------------------------------- KL

def test_kl_penalty_kinds():
    log_probs, ref = torch.tensor([[0.0, -1.0]]), torch.tensor([[-1.0, 0.0]])
    assert kl_penalty(log_probs, ref, "kl").tolist() == [[1.0, -1.0]]
    assert kl_penalty(log_probs, ref, "k1").tolist() == [[1.0, -1.0]]
    assert kl_penalty(log_probs, ref, "abs").tolist() == [[1.0, 1.0]]
    assert kl_penalty(log_probs, ref, "mse").tolist() == [[0.5, 0.5]]
    k3 = kl_penalty(log_probs, ref)  # default low_var_kl: exp(d) - d - 1, d = ref - logp
    assert k3.tolist()[0] == pytest.approx([math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1])
    assert kl_penalty(log_probs, ref, "k3").tolist() == k3.tolist()
    assert kl_penalty(torch.tensor([-30.0]), torch.tensor([0.0])).item() == 10.0  # clamped
    assert kl_penalty(torch.tensor([-2.0]), torch.tensor([-2.0])).item() == 0.0
    with pytest.raises(ValueError):
        kl_penalty(log_probs, ref, "full")


# ---------------------------------------------------------------------------- discriminator

def _disc_inputs():
    tensors = [torch.tensor(v, requires_grad=True) for v in
               ([1.0, 2.0, 0.0], [0.0, 3.0, 0.0], [2.0, 0.0, 1.0], [1.0, 1.0, 1.0])]
    return tensors, torch.tensor([True, True, False])


def test_discriminator_loss_pairwise_and_gradients():
    (tc, sc, tr, sr), valid = _disc_inputs()
    loss = discriminator_loss(tc, sc, tr, sr, valid, score_reg=0.001)
    pair = 2 * (softplus(-1) + softplus(1))  # two valid pairs, caption and reasoning passes
    regulariser = ((0 + 9 + 0) / 3 + (1 + 1 + 1) / 3 + (1 + 4 + 0) / 3 + (4 + 0 + 1) / 3) / 4
    assert loss.item() == pytest.approx(pair / 2 + 0.001 * regulariser, rel=1e-6)
    loss.backward()
    reg_grad = lambda x: 0.001 * 2 * x / 3 / 4  # d/dx of score_reg * mean(x^2) / 4
    assert tc.grad[0].item() == pytest.approx(-sigmoid(-1) / 2 + reg_grad(1.0), rel=1e-6)
    assert sc.grad[1].item() == pytest.approx(sigmoid(1) / 2 + reg_grad(3.0), rel=1e-6)
    # the invalid sample only enters the regulariser
    assert tr.grad[2].item() == pytest.approx(reg_grad(1.0), rel=1e-6)
    assert sc.grad[2].item() == pytest.approx(0.0)


def test_discriminator_loss_fallback_and_global_count():
    (tc, sc, tr, sr), _ = _disc_inputs()
    none_valid = torch.tensor([False, False, False])
    regulariser = 0.001 * 11 / 6
    fallback = 0.01 * (softplus(-1.0) + softplus(-1.0))  # means of tc and tr are both 1
    loss = discriminator_loss(tc, sc, tr, sr, none_valid)
    assert loss.item() == pytest.approx(fallback + regulariser)
    # Other ranks have valid pairs: this rank takes the (empty) pairwise branch -> only R.
    loss = discriminator_loss(tc, sc, tr, sr, none_valid, valid_global=5)
    assert loss.item() == pytest.approx(regulariser)
    # Branch chosen from the global count even if this rank has valid pairs.
    some_valid = torch.tensor([True, False, False])
    assert discriminator_loss(tc, sc, tr, sr, some_valid, valid_global=0).item() == pytest.approx(
        fallback + regulariser)


def test_discriminator_scores_clamped_and_cleaned():
    tc = torch.tensor([50.0, float("nan")], requires_grad=True)
    sc = torch.tensor([-50.0, 0.0])
    zero = torch.zeros(2)
    valid = torch.tensor([True, True])
    loss = discriminator_loss(tc, sc, zero, zero, valid, score_reg=0.0)
    expected = (softplus(-20.0) + softplus(0.0) + 2 * softplus(0.0)) / 2  # clamp to ±10, nan -> 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert tc.grad[0].item() == 0.0  # clamped score: no gradient
    loss = discriminator_loss(tc, sc, zero, zero, valid, score_reg=1.0, score_clip=5.0)
    # clip 5: tc = [5, 0], sc = [-5, 0]; R = (12.5 + 0 + 12.5 + 0) / 4
    expected = (softplus(-10.0) + 3 * softplus(0.0)) / 2 + (25 / 2 + 25 / 2) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pairwise_accuracy():
    teacher, student = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 3.0, 5.0])
    assert pairwise_accuracy(teacher, student, torch.tensor([True, True, False])).item() == 0.5
    assert math.isnan(pairwise_accuracy(teacher, student, torch.zeros(3, dtype=torch.bool)).item())
    assert pairwise_accuracy(teacher, student, torch.zeros(3, dtype=torch.bool),
                             empty_value=0.92).item() == pytest.approx(0.92)
