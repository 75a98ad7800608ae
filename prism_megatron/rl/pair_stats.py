"""Run statistics of the discriminator: pairwise accuracy and expert load per segment type.

Collected on whichever ranks produce them (scores on the last pipeline stage, expert loads on the
stage owning each layer) and reduced over the whole world once per report: data-parallel ranks
hold different pairs (summed), tensor-parallel ranks without sequence parallelism see the same
tokens and scores (divided out).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from prism_megatron.data.segments import SEGMENT_NAMES


def _replicas() -> int:
    """How many ranks hold identical copies of the same scores (the TP group)."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


class PairStats:
    """Sums over pairs: correct / valid counts per segment, loss, aux loss."""

    KEYS = ("correct_caption", "correct_reasoning", "pairs", "loss_sum", "loss_count",
            "margin_caption", "margin_reasoning")

    def __init__(self):
        self.totals = torch.zeros(len(self.KEYS), dtype=torch.float64)

    def add_pairs(self, tc, sc, tr, sr, valid: torch.Tensor) -> None:
        """Teacher/student caption and reasoning scores [n] of valid (real, format-valid) pairs."""
        valid = valid.bool().cpu()
        tc, sc, tr, sr = (t.detach().float().cpu() for t in (tc, sc, tr, sr))
        self.totals[0] += (tc > sc)[valid].sum()
        self.totals[1] += (tr > sr)[valid].sum()
        self.totals[2] += valid.sum()
        self.totals[5] += (tc - sc)[valid].sum()
        self.totals[6] += (tr - sr)[valid].sum()

    def add_loss(self, loss_sum: float, count: float) -> None:
        self.totals[3] += loss_sum
        self.totals[4] += count

    def reduce(self) -> dict[str, float]:
        """World-reduced metrics (the same dict on every rank); resets the sums."""
        totals = self.totals.clone()
        if dist.is_initialized():
            dist.all_reduce(totals)
            totals /= _replicas()
        self.totals.zero_()
        pairs = max(totals[2].item(), 1.0)
        return {"acc_caption": totals[0].item() / pairs, "acc_reasoning": totals[1].item() / pairs,
                "pairs": totals[2].item(), "loss": totals[3].item() / max(totals[4].item(), 1.0),
                "margin_caption": totals[5].item() / pairs,
                "margin_reasoning": totals[6].item() / pairs}


def reduce_load(load: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
    """[L, 2, E] routed-token counts of this rank's layers -> world totals (every rank). With
    sequence parallelism each TP rank routes its own slice of the tokens, otherwise all TP ranks
    route the same tokens."""
    load = load.double().clone()
    if dist.is_initialized():
        dist.all_reduce(load)
        if not sequence_parallel:
            load /= _replicas()
    return load


def load_metrics(load: torch.Tensor, prefix: str = "load") -> dict[str, float]:
    """Share of routed slots per expert within each segment type (mean over layers):
    ``load/caption/e0`` ... sums to 1 over experts for each segment type."""
    share = load / load.sum(-1, keepdim=True).clamp(min=1)
    mean = share.mean(0)
    return {f"{prefix}/{SEGMENT_NAMES[g]}/e{e}": mean[g, e].item()
            for g in range(mean.shape[0]) for e in range(mean.shape[1])}


def load_table(load: torch.Tensor) -> dict:
    """Per layer, per segment type: routed-slot counts and shares (for the JSON report)."""
    share = load / load.sum(-1, keepdim=True).clamp(min=1)
    def cell(layer: int, g: int) -> dict:
        return {"tokens_x_topk": load[layer, g].tolist(),
                "share": [round(x, 4) for x in share[layer, g].tolist()]}

    return {f"layer{layer + 1}": {SEGMENT_NAMES[g]: cell(layer, g) for g in range(load.shape[1])}
            for layer in range(load.shape[0])}
