"""algorithm.entropy_coef: the policy loss gains verl's entropy bonus ``- c * agg(H)``."""

from __future__ import annotations

import pytest
import torch

from prism_megatron.rl import logprobs as rl
from prism_megatron.rl.batch import place


@pytest.fixture()
def one_process():
    from prism_megatron.distributed import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=1, seed=0)
    yield
    destroy_distributed()


def _batch():
    # Two rows, 5 positions; row 0 has 3 loss tokens, row 1 has 2 (positions 1.. are responses).
    loss_mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    labels = torch.tensor([[0, 3, 1, 4, 0], [0, 0, 2, 5, 0]])
    return {"loss_mask": loss_mask, "labels": labels, "index": torch.tensor([0, 1])}


def _loss(monkeypatch, logits, coef, vocab_size, agg="token-mean"):
    batch = _batch()
    old = {0: torch.tensor([-1.5, -2.0, -1.0]), 1: torch.tensor([-1.2, -2.2])}
    adv = {0: 1.0, 1: -0.5}
    batch["old_log_probs"], batch["advantages"] = place(batch, old), place(batch, adv)
    settings = rl.LossSettings(entropy_coef=coef, agg=agg, dual_clip=None)
    forward = rl.make_loss_forward(settings, vocab_size, stats=rl.StepStats())
    monkeypatch.setattr(rl, "policy_forward", lambda b, m: logits)   # the "model" is the logits
    _, loss_fn = forward(batch, None)
    loss, count, _ = loss_fn(logits)
    return loss, int(count), batch


def test_token_entropy_matches_categorical_and_its_gradient(one_process):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, dtype=torch.float64).float().requires_grad_()
    h = rl.token_entropy(logits, vocab_size=6, temperature=0.7, grad=True)   # 2 padded columns
    ref_logits = logits[..., :6] / 0.7
    expected = torch.distributions.Categorical(logits=ref_logits).entropy()
    assert torch.allclose(h, expected, atol=1e-6)
    (g,) = torch.autograd.grad(h.sum(), logits)
    (g_ref,) = torch.autograd.grad(expected.sum(), logits)
    assert torch.allclose(g, g_ref, atol=1e-6)
    assert torch.all(g[..., 6:] == 0)
    assert not rl.token_entropy(logits, 6, 0.7).requires_grad     # the logging path: no graph


def test_entropy_bonus_is_subtracted_from_the_policy_loss(one_process, monkeypatch):
    torch.manual_seed(1)
    base = torch.randn(2, 5, 6)
    plain, count, batch = _loss(monkeypatch, base.clone().requires_grad_(), 0.0, 6)
    coef = 0.05
    logits = base.clone().requires_grad_()
    with_bonus, count2, _ = _loss(monkeypatch, logits, coef, 6)
    mask = batch["loss_mask"]
    h = torch.distributions.Categorical(logits=base).entropy()
    # make_loss_forward returns numerators (megatron divides by the global token count): sums.
    assert count == count2 == 5
    assert with_bonus.item() == pytest.approx(plain.item() - coef * h[mask].sum().item(), abs=1e-5)
    with_bonus.backward()          # the bonus is differentiable through the logits
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
