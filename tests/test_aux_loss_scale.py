"""The discriminator's load-balancing loss on the reference's scale: the per-layer Switch losses,
each weighted ``coef x top_k / L`` (``layer_aux_weight``), against ``coef x`` transformers'
pooled ``load_balancing_loss_func`` (the one Qwen3-VL-MoE adds with ``router_aux_loss_coef``)."""

import pytest
import torch

from prism_megatron.models.discriminator.routing import (
    CAPTION, REASONING, allowed_experts, layer_aux_weight, switch_aux_loss)

E, K, COEF = 4, 2, 0.01
B, S = 2, 5                                            # 10 token positions per layer
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])   # 8 valid tokens, 2 padding
VALID = MASK.reshape(-1).bool()


def hf_loss(logits: list[torch.Tensor]) -> torch.Tensor:
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import load_balancing_loss_func

    return load_balancing_loss_func(tuple(logits), E, K, MASK)


def ours(logits: list[torch.Tensor], mode: str = "learned", segment=None, k: int = K) -> torch.Tensor:
    """The model's total: sum over layers of layer_aux_weight x the layer's loss."""
    segment = torch.zeros(B * S, dtype=torch.long) if segment is None else segment
    total = 0
    for layer in logits:
        scores = torch.softmax(layer, dim=-1)
        routing_map = torch.zeros_like(layer, dtype=torch.bool).scatter(
            1, layer.topk(k).indices, True)
        total = total + layer_aux_weight(COEF, k, len(logits)) * switch_aux_loss(
            scores, routing_map, segment, VALID, allowed_experts(mode, E), k)
    return total


def with_padding(valid_rows: torch.Tensor, seed: int) -> torch.Tensor:
    """[8, E] logits of the valid tokens placed at the valid positions; garbage on padding."""
    out = 50 * torch.randn(B * S, E, generator=torch.Generator().manual_seed(seed))
    out[VALID] = valid_rows
    return out


def test_balanced_routing_gives_coef_times_top_k_like_the_reference():
    """Token i prefers experts (i+l, i+l+1) mod 4 in layer l, with layer-specific logit values:
    every layer is balanced (each expert 4 of 16 slots, mean probability 1/4), so the pooled
    loss is top_k = 2 and ours equals it: 0.01 x 2."""
    layers = []
    for l, base in enumerate(([3.0, 2.0, 0.0, 0.0], [1.0, 0.5, -1.0, -1.0], [0.2, 0.1, 0.0, 0.0])):
        rows = torch.stack([torch.tensor(base).roll(i + l) for i in range(8)])
        layers.append(with_padding(rows, seed=l))
    assert hf_loss(layers).item() == pytest.approx(K, rel=1e-6)
    assert ours(layers).item() == pytest.approx(COEF * K, rel=1e-6)


def test_unbalanced_layers_with_equal_statistics_match_value_and_gradient():
    """The same (unbalanced) router outputs in every layer, tokens shuffled per layer: the
    layers' load shares and mean probabilities are equal, so the per-layer losses weighted
    top_k / L give exactly the pooled loss, and the same gradient for every layer's logits."""
    rows = torch.randn(8, E, generator=torch.Generator().manual_seed(7)) + torch.tensor(
        [2.0, 1.0, 0.0, -1.0])
    layers = []
    for l in range(3):
        order = torch.randperm(8, generator=torch.Generator().manual_seed(l))
        layers.append(with_padding(rows[order], seed=10 + l).requires_grad_(True))
    reference = COEF * hf_loss(layers)
    assert reference.item() > COEF * K * 1.2                        # clearly unbalanced
    assert ours(layers).item() == pytest.approx(reference.item(), rel=1e-6)
    grads_ref = torch.autograd.grad(reference, layers)
    grads_ours = torch.autograd.grad(ours(layers), layers)
    for g_ref, g_ours in zip(grads_ref, grads_ours):
        assert g_ref.abs().max() > 1e-4                             # a real gradient ...
        assert torch.allclose(g_ours, g_ref, rtol=1e-5, atol=1e-9)  # ... and the same one
        assert g_ours[~VALID].abs().max() == 0                      # padding gets none


def test_layers_with_different_statistics_differ_by_the_covariance_term():
    """Different layers: ours is the mean over layers of E sum_e F_le P_le, the pooled loss is
    E sum_e mean_l(F_le) mean_l(P_le); they differ by E sum_e cov_l(F_le, P_le) (population
    covariance over layers; F_le: layer l's share of slots, summing to top_k)."""
    generator = torch.Generator().manual_seed(3)
    layers = [with_padding(torch.randn(8, E, generator=generator) * 2, seed=20 + l)
              for l in range(3)]
    f = torch.stack([torch.zeros(E).index_add_(0, x[VALID].topk(K).indices.reshape(-1),
                                               torch.ones(8 * K)) / 8 for x in layers])
    p = torch.stack([torch.softmax(x[VALID], -1).mean(0) for x in layers])     # [L, E]
    cov = ((f - f.mean(0)) * (p - p.mean(0))).mean(0).sum()
    assert abs(cov.item()) > 1e-3
    assert ours(layers).item() == pytest.approx(COEF * (hf_loss(layers) + E * cov).item(),
                                                rel=1e-5)
    # Two layers with opposite loads: each is maximally unbalanced, the pooled loss calls the
    # pair balanced (top_k) and ours does not.
    a = with_padding(torch.tensor([[5.0, 4.0, 0.0, 0.0]] * 8), seed=1)
    b = with_padding(torch.tensor([[0.0, 0.0, 5.0, 4.0]] * 8), seed=2)
    assert hf_loss([a, b]).item() == pytest.approx(K, rel=1e-3)
    assert ours([a, b]).item() > 1.9 * COEF * K


def test_segment_mode_is_on_the_same_scale():
    """Segment mode balances each pass within its half; balanced halves give coef x top_k too
    (top-1 within 2 experts per half: half of each pass's tokens on each of its experts)."""
    caption = [[1.0, 0.0, 9.0, 9.0], [0.0, 1.0, 9.0, 9.0]] * 2    # 9s: the other half, masked
    reasoning = [[9.0, 9.0, 1.0, 0.0], [9.0, 9.0, 0.0, 1.0]] * 2
    segment = torch.full((B * S,), CAPTION)
    segment[VALID.nonzero().squeeze(1)[4:]] = REASONING
    rows = torch.tensor(caption + reasoning)
    allowed = allowed_experts("segment", E)[segment][VALID]
    layers = [with_padding(rows.masked_fill(~allowed, float("-inf")), seed=s) for s in range(2)]
    assert ours(layers, "segment", segment, k=1).item() == pytest.approx(COEF * 1, rel=1e-6)
