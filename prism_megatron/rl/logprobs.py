"""The policy's side of an RL step on Megatron: log-probs, entropies and the clipped update.

Per-token quantities live in megatron's label coordinates of a micro-batch: position ``t`` holds
the log-prob of token ``t + 1``. ``compute_log_probs`` writes the old (or reference) log-probs
into the micro-batches it ran on (the last pipeline stage holds them), and the update reads them
from there, so the log-prob pass and the update use the same micro-batches: with one epoch and
one mini-batch the first ratio is exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from prism_megatron.algorithms.losses import (
    aggregate, aggregation_denominator, kl_penalty, policy_loss, tis_weights)
from prism_megatron.models import unwrap_model
from prism_megatron.rl.batch import MicroBatches, unpacked
from prism_megatron.schedule import forward_only
from prism_megatron.weights.layout import vocab_padding

RATIO_LEVEL = {"grpo": "token", "dapo": "token", "prism": "token", "gspo": "sequence"}


# ------------------------------------------------------------------------------ log-probs

def policy_forward(batch: dict, model) -> torch.Tensor:
    """Logits (last pipeline stage, vocabulary-sharded over TP) or hidden states."""
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                 segment_ids=batch["segment_ids"],
                 pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
                 image_mask=batch["image_mask"])


def _shard_logits(logits: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """fp32 ``logits / T`` of this TP rank's vocabulary shard, padding columns at -inf (the
    engine has no padded vocabulary, so they must not enter the softmax)."""
    from megatron.core import parallel_state as ps

    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    width = logits.shape[-1]
    padding = vocab_padding(ps.get_tensor_model_parallel_rank() * width, width, vocab_size,
                            logits.device)
    return logits if padding is None else logits.masked_fill(padding, float("-inf"))


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                    temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / T)[label]`` [B, S] over the TP-sharded vocabulary, with grad
    (the rollout engines' log-prob convention, rollout/base.py). Megatron's cross entropy works
    in place: ``logits`` may be overwritten, so read anything else from them first."""
    from megatron.core import tensor_parallel

    shard = _shard_logits(logits, vocab_size, temperature)
    return -tensor_parallel.vocab_parallel_cross_entropy(shard, labels.clamp(min=0))


def token_entropy(logits: torch.Tensor, vocab_size: int, temperature: float = 1.0, *,
                  grad: bool = False) -> torch.Tensor:
    """Entropy of ``softmax(logits / T)`` per position [B, S], over the TP-sharded vocabulary.

    ``H = m + log S0 - S1 / S0`` with ``S0 = sum exp(z - m)``, ``S1 = sum exp(z - m) z`` summed
    over the TP shards. With ``grad`` the sums go through megatron's autograd-aware all-reduce
    (the entropy bonus of the policy loss); the peak ``m`` only stabilises and is detached, which
    leaves the gradient exact: ``dH/dz_v = -p_v (z_v - E_p[z])``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        shard = _shard_logits(logits, vocab_size, temperature)
        tp = ps.get_tensor_model_parallel_world_size()
        peak = shard.detach().max(dim=-1).values
        if tp > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
        weights = torch.exp(shard - peak[..., None])
        finite = torch.where(weights > 0, shard, torch.zeros_like(shard))   # -inf pads: 0 * -inf
        sums = torch.stack([weights.sum(-1), (weights * finite).sum(-1)])
        if tp > 1:
            sums = reduce_from_tensor_model_parallel_region(sums)
        return peak + torch.log(sums[0]) - sums[1] / sums[0]


def compute_log_probs(model, micro: MicroBatches, *, key: str = "old_log_probs",
                      temperature: float = 1.0, entropy: bool = False) -> None:
    """Response-token log-probs ``log softmax(logits / T)[label]`` into ``batch[key]`` [B, S] of
    every micro-batch (and ``batch["entropy"]`` with ``entropy``), on the last pipeline stage;
    nothing elsewhere. No gradient; collective over the model-parallel group."""
    vocab_size = unwrap_model(model).vocab_size

    def forward(batch, m):
        def loss_fn(logits):
            mask = batch["loss_mask"].bool()
            if entropy:
                batch["entropy"] = token_entropy(logits, vocab_size, temperature) * mask
            log_probs = token_log_probs(logits, batch["labels"], vocab_size, temperature)
            batch[key] = (log_probs * mask).float()
            return logits.sum() * 0, torch.tensor(1, dtype=torch.int), {}

        return policy_forward(batch, m), loss_fn

    forward_only(model, micro.batches, forward, micro.seq_length)


def gather_samples(local: dict[int, object]) -> dict[int, object]:
    """Merge every rank's per-sample dict (the holders are the last-stage, TP-rank-0 ranks);
    for checks and tests (training reads the values where they were computed)."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return dict(local)
    holder = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local if holder else {})
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


# ------------------------------------------------------------------------------ update

class StepStats:
    """Token-weighted means / maxima of the loss metrics over micro-batches and ranks."""

    MEANS = ("clip_frac", "clip_frac_dual", "approx_kl", "ratio_mean", "kl")

    def __init__(self):
        self.sums = {k: 0.0 for k in self.MEANS}
        self.tokens = 0.0
        self.ratio_max = 0.0

    def add(self, metrics: dict, tokens: float) -> None:
        for k in self.MEANS:
            if k in metrics:
                self.sums[k] += float(metrics[k]) * tokens
        self.tokens += tokens
        self.ratio_max = max(self.ratio_max, float(metrics.get("ratio_max", 0.0)))

    def reduce(self) -> dict[str, float]:
        from megatron.core import parallel_state as ps

        sums = torch.tensor([*self.sums.values(), self.tokens], dtype=torch.float64)
        peak = torch.tensor([self.ratio_max], dtype=torch.float64)
        if dist.is_initialized():
            for group in (ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group()):
                dist.all_reduce(sums, group=group)
                dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        tokens = max(float(sums[-1]), 1.0)
        out = {k: float(v) / tokens for k, v in zip(self.sums, sums[:-1].tolist())}
        out["ratio_max"] = float(peak[0])
        return out


@dataclass
class LossSettings:
    ratio_level: str = "token"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    agg: str = "token-mean"
    temperature: float = 1.0
    tis_cap: float | None = None
    kl_coef: float = 0.0
    kl_kind: str = "low_var_kl"
    entropy_coef: float = 0.0

    @classmethod
    def from_config(cls, algorithm, temperature: float) -> "LossSettings":
        return cls(RATIO_LEVEL[algorithm.name], algorithm.clip_low, algorithm.clip_high,
                   algorithm.dual_clip, algorithm.loss_agg, temperature, algorithm.tis_cap,
                   algorithm.kl_coef, algorithm.kl_kind, algorithm.entropy_coef)


def make_loss_forward(settings: LossSettings, vocab_size: int, *, stats: StepStats):
    """``forward(batch, model)`` of megatron's schedule for the clipped policy loss, reading the
    micro-batch's ``advantages``, ``old_log_probs``, ``rollout_log_probs`` (and
    ``ref_log_probs``) [B, S]. Each micro-batch returns (numerator, normaliser): megatron divides
    by the GLOBAL normaliser (tokens for token-mean, sequences for seq-mean-* and
    token-mean-micro), so the step equals the whole mini-batch aggregate; for token-mean-micro
    the numerator is the micro-batch's token mean x its sequence count, i.e. verl's weighting
    of micro-batches by their share of the mini-batch's sequences (over all DP ranks)."""

    def forward(batch, model):
        logits = policy_forward(batch, model)

        def loss_fn(logits):
            entropy = None
            if settings.entropy_coef:
                # Before the cross entropy, which overwrites its input in place; the entropy graph
                # keeps only tensors derived from the logits, so no copy is needed.
                entropy = token_entropy(logits, vocab_size, settings.temperature, grad=True)
            log_probs = token_log_probs(logits, batch["labels"], vocab_size, settings.temperature)
            # Packed micro-batches: every sample on a row of its own ([N, L]), so sequence-level
            # ratios (GSPO) and seq-mean aggregation see sequences, not packed rows.
            view = (lambda x: unpacked(x, batch["unpack"])) if "unpack" in batch else (lambda x: x)
            mask = view(batch["loss_mask"]).bool()
            log_probs, old = view(log_probs), view(batch["old_log_probs"])
            weights = None
            if settings.tis_cap is not None and "rollout_log_probs" in batch:
                weights = tis_weights(old, view(batch["rollout_log_probs"]), settings.tis_cap)
            loss, metrics = policy_loss(
                log_probs, old, view(batch["advantages"]), mask,
                ratio_level=settings.ratio_level, clip_low=settings.clip_low,
                clip_high=settings.clip_high, dual_clip=settings.dual_clip, agg=settings.agg,
                denominator=1.0, rollout_is_weights=weights)
            if settings.kl_coef > 0 and "ref_log_probs" in batch:
                kl = kl_penalty(log_probs, view(batch["ref_log_probs"]), settings.kl_kind)
                loss = loss + settings.kl_coef * aggregate(kl, mask, settings.agg, denominator=1.0)
                metrics["kl"] = (kl.detach() * mask).sum() / mask.sum().clamp(min=1)
            if entropy is not None:   # verl's bonus: L - c * agg(H), aggregated like the loss
                loss = loss - settings.entropy_coef * aggregate(view(entropy), mask, settings.agg,
                                                                denominator=1.0)
            count = aggregation_denominator(mask, settings.agg)
            stats.add(metrics, float(mask.sum()))
            return loss, count.to(torch.int), {"loss": torch.stack([loss.detach(), count])}

        return logits, loss_fn

    return forward


def update(trainer, micro: MicroBatches, settings: LossSettings) -> dict[str, float]:
    """One optimizer step on one mini-batch; returns loss, grad norm, lr and the loss metrics."""
    stats = StepStats()
    forward = make_loss_forward(settings, unwrap_model(trainer.model).vocab_size, stats=stats)
    out = trainer.train_step(micro.batches, forward, micro.seq_length)
    return {**out, **stats.reduce()}


def log_prob_metrics(micros: list[MicroBatches]) -> dict[str, float]:
    """Train/rollout log-prob mismatch (mean and max |old - rollout| over all response tokens)
    and the mean token entropy, from the micro-batches' old log-probs (all ranks; the values
    live on the last pipeline stage, identical across its tensor-parallel ranks)."""
    from megatron.core import parallel_state as ps

    sums = torch.zeros(3, dtype=torch.float64)     # |delta| sum, entropy sum, tokens
    peak = torch.zeros(1, dtype=torch.float64)
    for micro in micros:
        for batch in micro.batches:
            if "old_log_probs" not in batch:
                continue
            mask = batch["loss_mask"].bool()      # (filler rows have no loss positions)
            delta = (batch["old_log_probs"] - batch["rollout_log_probs"]).abs()[mask]
            sums[0] += float(delta.sum())
            sums[1] += float(batch["entropy"][mask].sum()) if "entropy" in batch else 0.0
            sums[2] += int(mask.sum())
            if len(delta):
                peak[0] = max(float(peak[0]), float(delta.max()))
    if dist.is_initialized():
        for group in (ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group()):
            dist.all_reduce(sums, group=group)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    tokens = max(float(sums[2]), 1.0)
    return {"logprob_diff_mean": float(sums[0]) / tokens if sums[2] else 0.0,
            "logprob_diff_max": float(peak[0]), "entropy": float(sums[1]) / tokens}
