"""The policy side of the RL stages (alignment and RLVR), on Megatron with TP/PP/DP.

One step, whatever the reward:

    samples  = generate(engine, prompts, params, n)        # sender rank samples, all ranks get them
    plans    = plan_minibatches(...)                       # this rank's micro-batches per mini-batch
    old      = compute_log_probs(trainer.model, plan)      # recomputed by the trainer (spec §6.1)
    metrics  = update(trainer, plan, old, advantages, ...) # clipped policy loss, one optimizer step

Sequences are ``[prompt ; response]`` with the response tokens (the stop token included, as the
engine returns it) as the only trained positions. Per-token quantities live in megatron's label
coordinates: position ``t`` holds the log-prob of token ``t + 1``. The log-prob pass and the update
use the same micro-batches, so with one epoch and one mini-batch the first ratio is exactly 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from prism_megatron.algorithms.losses import (
    aggregate, aggregation_denominator, kl_penalty, policy_loss, tis_weights)
from prism_megatron.data.collate import collate, segment_attention_mask
from prism_megatron.data.encode import Encoded
from prism_megatron.stages.discriminator_warmup import rank_share

RATIO_LEVEL = {"grpo": "token", "dapo": "token", "prism": "token", "gspo": "sequence"}


# ------------------------------------------------------------------------------ rollouts

def generate(engine, prompts, params, n: int) -> list:
    """``n`` samples per prompt, group-major (sample ``g*n + j`` is sample j of prompt g), on
    every rank: the engine lives on the sender rank, which broadcasts what it drew."""
    from prism_megatron.rollout.weight_sync import is_sender

    box = [None]
    if is_sender():
        groups = engine.generate([p.rollout_prompt() for p in prompts], params, n=n)
        box[0] = [sample for group in groups for sample in group]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def sequences(prompts, samples, group: list[int]) -> list[Encoded]:
    """``[prompt ; response]`` per sample, the response tokens trainable."""
    out = []
    for sample, g in zip(samples, group):
        prompt = prompts[g].encoded
        response = torch.tensor(sample.token_ids, dtype=torch.long)
        out.append(Encoded(torch.cat([prompt.input_ids, response]),
                           torch.cat([torch.zeros(len(prompt.input_ids), dtype=torch.bool),
                                      torch.ones(len(response), dtype=torch.bool)]),
                           prompt.pixel_values, prompt.image_grid_thw))
    return out


# ------------------------------------------------------------------------------ batching

@dataclass
class Plan:
    """This rank's micro-batches of one mini-batch; ``batch["index"]`` names each row's sample
    (-1 = filler row, so every data-parallel rank runs the same number of micro-batches)."""

    batches: list[dict]
    seq_length: int
    indices: list[int]


def response_positions(seq: Encoded, hf_config) -> torch.Tensor:
    """``[3, S]`` M-RoPE positions as generation assigns them: the prompt's (images spread over
    t/h/w), then the response as text continuing after the prompt's largest position. Vision
    tokens the policy happens to sample are plain text tokens there, and here."""
    from prism_megatron.models.qwen3_vl.rope import rope_index_for_sample

    prompt_length = seq.prompt_length
    prompt = rope_index_for_sample(seq.input_ids[:prompt_length], seq.image_grid_thw,
                                   hf_config=hf_config)
    response = prompt.max() + 1 + torch.arange(len(seq.input_ids) - prompt_length)
    return torch.cat([prompt, response.expand(3, -1)], dim=1)


def _no_positions(input_ids, _grid):
    return torch.zeros(3, len(input_ids), dtype=torch.long)


def plan_batches(seqs: list[Encoded], indices: list[int], *, micro_batch_size: int, pad_id: int,
                 hf_config) -> Plan:
    from megatron.core import parallel_state as ps

    seq_length = math.ceil(max(len(seqs[i].input_ids) for i in indices) / 8) * 8
    mine = rank_share(indices, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                      micro_batch_size)
    batches = []
    for k in range(0, len(mine), micro_batch_size):
        chosen = mine[k:k + micro_batch_size]
        batch = collate(seqs, [[i] if i is not None else [] for i in chosen], pad_id=pad_id,
                        position_fn=_no_positions, length=seq_length)
        batch["image_mask"] = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        for r, i in enumerate(chosen):
            if i is not None:
                seq = seqs[i]
                batch["position_ids"][:, r, :len(seq.input_ids)] = response_positions(seq, hf_config)
                batch["image_mask"][r, :seq.prompt_length] = (
                    seq.input_ids[:seq.prompt_length] == hf_config.image_token_id)
        batch["index"] = torch.tensor([-1 if i is None else i for i in chosen])
        batches.append(batch)
    return Plan(batches, seq_length, list(indices))


def scatter(batch: dict, per_sample: dict[int, torch.Tensor] | list, fill: float = 0.0
            ) -> torch.Tensor:
    """Per-sample values ([R] per response token, or a scalar) -> [B, S] at the loss positions."""
    mask = batch["loss_mask"].bool()
    out = torch.full(mask.shape, fill, dtype=torch.float32)
    for r, i in enumerate(batch["index"].tolist()):
        if i >= 0:
            out[r][mask[r]] = torch.as_tensor(per_sample[i], dtype=torch.float32)
    return out


# ------------------------------------------------------------------------------ log-probs

def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def policy_forward(batch: dict, model) -> torch.Tensor:
    """Logits (last pipeline stage, vocabulary-sharded over TP) or hidden states."""
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                 attention_mask=segment_attention_mask(batch["segment_ids"]),
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
    start = ps.get_tensor_model_parallel_rank() * width
    if start + width > vocab_size:
        column = torch.arange(start, start + width, device=logits.device)
        logits = logits.masked_fill(column >= vocab_size, float("-inf"))
    return logits


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


def run_schedule(model, batches: list[dict], forward, seq_length: int, forward_only: bool):
    """megatron's pipeline schedule over ``batches`` (one model chunk)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch_iter = iter(batches)
    return get_forward_backward_func()(
        forward_step_func=lambda data, m: forward(next(data), m), data_iterator=batch_iter,
        model=[model], num_microbatches=len(batches), seq_length=seq_length,
        micro_batch_size=batches[0]["input_ids"].shape[0], forward_only=forward_only)


@torch.no_grad()
def compute_log_probs(model, plan: Plan, *, temperature: float = 1.0, entropy: bool = False
                      ) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per sample of this rank's plan: response-token log-probs [R] (and entropies), on the last
    pipeline stage; empty elsewhere. Collective over the model-parallel group."""
    vocab_size = _unwrap(model).vocab_size
    found: dict[int, tuple] = {}

    def forward(batch, m):
        logits = policy_forward(batch, m)

        def loss_fn(logits):
            ent = token_entropy(logits, vocab_size, temperature) if entropy else None
            log_probs = token_log_probs(logits, batch["labels"], vocab_size, temperature)
            mask = batch["loss_mask"].bool()
            for r, i in enumerate(batch["index"].tolist()):
                if i >= 0:
                    found[i] = (log_probs[r][mask[r]].cpu(),
                                ent[r][mask[r]].cpu() if ent is not None else None)
            return logits.sum() * 0, torch.tensor(1, dtype=torch.int), {}

        return logits, loss_fn

    was_training = model.training
    model.eval()
    try:
        run_schedule(model, plan.batches, forward, plan.seq_length, forward_only=True)
    finally:
        model.train(was_training)
    return found


def gather_samples(local: dict[int, object]) -> dict[int, object]:
    """Merge every rank's per-sample dict (the holders are the last-stage, TP-rank-0 ranks)."""
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


def make_loss_forward(settings: LossSettings, vocab_size: int, *, old_log_probs, advantages,
                      rollout_log_probs=None, ref_log_probs=None, stats: StepStats):
    """``forward(batch, model)`` of megatron's schedule for the clipped policy loss. Each micro-
    batch returns (numerator, normaliser): megatron divides by the GLOBAL normaliser (tokens for
    token-mean, sequences for seq-mean-*), so the step equals the whole mini-batch aggregate."""

    def forward(batch, model):
        logits = policy_forward(batch, model)

        def loss_fn(logits):
            mask = batch["loss_mask"].bool()
            entropy = None
            if settings.entropy_coef:
                # Before the cross entropy, which overwrites its input in place; the entropy graph
                # keeps only tensors derived from the logits, so no copy is needed.
                entropy = token_entropy(logits, vocab_size, settings.temperature, grad=True)
            log_probs = token_log_probs(logits, batch["labels"], vocab_size, settings.temperature)
            old = scatter(batch, old_log_probs)
            weights = None
            if settings.tis_cap is not None and rollout_log_probs is not None:
                weights = tis_weights(old, scatter(batch, rollout_log_probs), settings.tis_cap)
            loss, metrics = policy_loss(
                log_probs, old, scatter(batch, advantages), mask,
                ratio_level=settings.ratio_level, clip_low=settings.clip_low,
                clip_high=settings.clip_high, dual_clip=settings.dual_clip, agg=settings.agg,
                denominator=1.0, rollout_is_weights=weights)
            if settings.kl_coef > 0 and ref_log_probs is not None:
                kl = kl_penalty(log_probs, scatter(batch, ref_log_probs), settings.kl_kind)
                loss = loss + settings.kl_coef * aggregate(kl, mask, settings.agg, denominator=1.0)
                metrics["kl"] = (kl.detach() * mask).sum() / mask.sum().clamp(min=1)
            if entropy is not None:   # verl's bonus: L - c * agg(H), aggregated like the loss
                loss = loss - settings.entropy_coef * aggregate(entropy, mask, settings.agg,
                                                                denominator=1.0)
            count = aggregation_denominator(mask, settings.agg)
            stats.add(metrics, float(mask.sum()))
            return loss, count.to(torch.int), {"loss": torch.stack([loss.detach(), count])}

        return logits, loss_fn

    return forward


def update(trainer, plan: Plan, settings: LossSettings, *, old_log_probs, advantages,
           rollout_log_probs=None, ref_log_probs=None) -> dict[str, float]:
    """One optimizer step on one mini-batch; returns loss, grad norm, lr and the loss metrics."""
    stats = StepStats()
    forward = make_loss_forward(settings, _unwrap(trainer.model).vocab_size,
                                old_log_probs=old_log_probs, advantages=advantages,
                                rollout_log_probs=rollout_log_probs, ref_log_probs=ref_log_probs,
                                stats=stats)
    out = trainer.train_step(plan.batches, forward, plan.seq_length)
    return {**out, **stats.reduce()}


def mismatch(old: dict[int, torch.Tensor], rollout: dict[int, torch.Tensor]) -> dict[str, float]:
    """Train/rollout log-prob mismatch over all response tokens: mean and max |delta|."""
    deltas = [(old[i] - rollout[i]).abs() for i in old if i in rollout and len(old[i])]
    if not deltas:
        return {"logprob_diff_mean": 0.0, "logprob_diff_max": 0.0}
    flat = torch.cat(deltas)
    return {"logprob_diff_mean": float(flat.mean()), "logprob_diff_max": float(flat.max())}
