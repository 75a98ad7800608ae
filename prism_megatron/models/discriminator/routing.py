"""Expert routing of the discriminator: megatron's TopKRouter plus what PRISM needs on top.

* ``expert_routing: segment`` (spec §9.6): the experts are split into a perception half and a
  reasoning half; every token of a caption pass may only be routed within the first half, every
  token of a reasoning pass within the second. Implemented as a router-logit mask (-inf outside the
  allowed half) applied before megatron's top-k, so dispatch, expert parallelism and the combine
  step are megatron's own and cannot route a token into the wrong half.
* A padding-aware Switch load-balancing loss (spec §3.6 "attention-masked"; coefficient per stage,
  §9.5): the plain Switch loss in ``learned`` mode, balanced within each half in ``segment`` mode,
  attached to the routing probabilities with a constant gradient scale, like megatron's
  MoEAuxLossAutoScaler but with our own scale (see ``RoutingContext``). Each layer's loss is
  weighted ``coef x top_k / L`` (``layer_aux_weight``), the scale of the reference's loss
  (transformers' ``load_balancing_loss_func``, pooled over the L layers, ``top_k`` at balance).
* Expert-load counts per layer, per segment type, per expert (padding excluded) for the logs.

megatron's own aux loss stays off (``moe_aux_loss_coeff=0``): its gradient scale is tied to a
token-count loss normalisation, while discriminator losses are normalised by pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.moe.router import TopKRouter

from prism_megatron.data.segments import (  # noqa: F401 (re-exported)
    CAPTION, REASONING, SEGMENT_NAMES)

ROUTING_MODES = ("learned", "segment")


def allowed_experts(mode: str, num_experts: int) -> torch.Tensor:
    """[2, E] bool: which experts a caption (row 0) / reasoning (row 1) token may use."""
    table = torch.ones(2, num_experts, dtype=torch.bool)
    if mode == "segment":
        half = num_experts // 2
        table[CAPTION, half:] = False
        table[REASONING, :half] = False
    return table


class _AttachAux(torch.autograd.Function):
    """Identity on ``x``; in backward, feeds ``scale`` as the gradient of ``aux`` so the aux loss
    trains the routers without entering the returned loss (megatron's MoEAuxLossAutoScaler idea)."""

    @staticmethod
    def forward(ctx, x, aux, scale: float):
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return x

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


def switch_aux_loss(scores: torch.Tensor, routing_map: torch.Tensor, segment: torch.Tensor,
                    valid: torch.Tensor, allowed: torch.Tensor, topk: int,
                    sequence_group=None) -> torch.Tensor:
    """Switch-Transformer load balancing over the valid (non-padding) tokens.

    Tokens are grouped by the expert set they may use (one group in ``learned`` mode: the plain
    Switch loss; the two halves in ``segment`` mode). For a group G with experts A:
    ``aux_G = |A| * sum_{e in A} f_e P_e``, f_e the fraction of the group's |G|*topk routing slots
    given to e, P_e the group's mean router probability of e; ``aux = sum_G |G| aux_G / sum |G|``.
    1 at perfect balance in both modes. scores/routing_map: [T, E]; segment, valid: [T].
    ``sequence_group``: with sequence parallelism each TP rank routes a slice of the tokens; the
    counts and probability sums are summed over the group (backward: this rank's share), so every
    rank gets the loss of the whole micro-batch, as without it.
    """
    def across(x: torch.Tensor) -> torch.Tensor:
        if sequence_group is None:
            return x
        return reduce_from_tensor_model_parallel_region(x, group=sequence_group)

    total = across(valid.sum()).clamp(min=1)
    aux = scores.new_zeros(())
    for experts in torch.unique(allowed, dim=0):
        kinds = [g for g in range(allowed.shape[0]) if torch.equal(allowed[g], experts)]
        tokens = valid & torch.isin(segment, torch.tensor(kinds, device=segment.device))
        n = across(tokens.sum())
        if n == 0:
            continue
        f = across(routing_map[tokens][:, experts].float().sum(0)) / (n * topk)
        p = across(scores[tokens][:, experts].sum(0)) / n
        aux = aux + (n / total) * experts.sum() * (f * p).sum()
    return aux


def layer_aux_weight(coef: float, topk: int, num_layers: int) -> float:
    """Weight of one layer's ``switch_aux_loss`` (1 at balance) so that the model's total is on
    the scale of ``coef x`` transformers' ``load_balancing_loss_func``: that one pools the routing
    statistics of all L layers, ``E * sum_e F_e P_e`` with ``F_e`` the share of the L*T*top_k
    slots (summing to top_k) and ``P_e`` the mean probability over the L*T token-layers, so it
    is ``top_k`` at balance. ``sum_l coef*top_k/L * aux_l = coef * mean_l E sum_e F_le P_le``:
    equal to the reference's value and gradient whenever every layer has the same routing
    statistics (balance included); otherwise larger by ``coef * E * sum_e cov_l(F_le, P_le)``
    (the pooled loss only balances the layers' mean load). L counts the MoE layers of the whole
    model, not of one pipeline stage."""
    return coef * topk / num_layers


@dataclass
class RoutingContext:
    """Per-forward routing inputs shared by all routers of one model chunk, and their outputs.

    The discriminator fills ``segment`` / ``valid`` (``[S, B]``, the router's token order) before
    each forward; routers read them and write this forward's load counts and aux-loss values into
    per-layer slots (overwritten, not added, so an activation-recompute re-run cannot double count).
    ``aux_scale`` is the constant gradient weight of each layer's aux loss for the whole step:
    ``layer_aux_weight(coef, top_k, L) * (loss count on this rank) / (micro-batches)``, so after
    megatron divides the gradients by the global loss count the aux losses enter as
    ``coef * top_k / L x`` their sum over layers, averaged over micro-batches and ranks.
    """

    allowed: torch.Tensor                      # [2, E] bool
    topk: int
    segment: torch.Tensor | None = None        # [S, B] long, CAPTION / REASONING
    valid: torch.Tensor | None = None          # [S, B] bool, False on padding
    aux_scale: float = 0.0
    load: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [2, E] counts
    aux: dict[int, torch.Tensor] = field(default_factory=dict)    # layer -> aux value (detached)

    def set_batch(self, segment_per_sample: torch.Tensor, valid_tokens: torch.Tensor) -> None:
        """segment_per_sample [B], valid_tokens [B, S] -> the router's [S, B] layout."""
        seq = valid_tokens.shape[1]
        self.segment = segment_per_sample.long()[None, :].expand(seq, -1)
        self.valid = valid_tokens.bool().t()
        self.load.clear()
        self.aux.clear()

    def local(self, tensor: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """``tensor`` [S, B, ...] as the router sees it, flattened to [T, ...]. With sequence
        parallelism each TP rank routes a contiguous S/tp slice."""
        flat = tensor.reshape(-1, *tensor.shape[2:])
        if flat.shape[0] == num_tokens:
            return flat
        from megatron.core import parallel_state as ps

        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        if flat.shape[0] != num_tokens * tp:
            raise RuntimeError(f"router saw {num_tokens} tokens, batch has {flat.shape[0]}")
        seq = tensor.shape[0] // tp
        return tensor[rank * seq:(rank + 1) * seq].reshape(-1, *tensor.shape[2:])


class SegmentRouter(TopKRouter):
    """TopKRouter with the segment-routing mask, masked aux loss and load counts of a
    ``RoutingContext`` (attached by the discriminator as ``router.routing_context``). Without a
    context (or without a batch set) it is megatron's TopKRouter (top-1: renormalised)."""

    routing_context: RoutingContext | None = None

    def _tokens(self, num_tokens: int):
        ctx = self.routing_context
        if ctx is None or ctx.segment is None:
            return None
        segment = ctx.local(ctx.segment.to(self.weight.device), num_tokens)
        valid = ctx.local(ctx.valid.to(self.weight.device), num_tokens)
        return ctx, segment, valid

    def _topk_routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None):
        probs, routing_map = super().routing(logits, padding_mask)
        if self.topk == 1:   # pre-softmax (model.moe_config_fields): renormalised, weight 1 as HF
            total = probs.sum(dim=-1, keepdim=True)   # >= 1/E; 0 only on unrouted padding
            probs = probs / total.clamp(min=torch.finfo(probs.dtype).tiny)
        return probs, routing_map

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        num_experts = self.config.num_moe_experts
        tokens = self._tokens(logits.numel() // num_experts)
        if tokens is None:
            return self._topk_routing(logits, padding_mask)
        ctx, segment, valid = tokens
        allowed = ctx.allowed.to(logits.device)[segment]              # [T, E]
        flat = logits.reshape(-1, num_experts)
        if not bool(allowed.all()):
            flat = flat.masked_fill(~allowed, float("-inf"))
        probs, routing_map = self._topk_routing(flat.view_as(logits), padding_mask)
        with torch.no_grad():
            counts = torch.zeros(2, num_experts, device=logits.device)
            counts.index_add_(0, segment[valid], routing_map[valid].float())
            ctx.load[self.layer_number] = counts
        if ctx.aux_scale and self.training:
            scores = torch.softmax(flat.float(), dim=-1)
            aux = switch_aux_loss(scores, routing_map, segment, valid,
                                  ctx.allowed.to(logits.device), self.topk,
                                  self.tp_group if self.config.sequence_parallel else None)
            ctx.aux[self.layer_number] = aux.detach()
            if torch.is_grad_enabled():  # (an activation-recompute first pass runs without grad)
                probs = _AttachAux.apply(probs, aux, ctx.aux_scale)
        return probs, routing_map


def attach_routing_context(model: torch.nn.Module, context: RoutingContext) -> int:
    """Give every SegmentRouter in ``model`` the shared context; returns how many there are."""
    routers = [m for m in model.modules() if isinstance(m, SegmentRouter)]
    for router in routers:
        router.routing_context = context
    return len(routers)
