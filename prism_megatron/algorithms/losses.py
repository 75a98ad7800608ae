"""Policy, KL and discriminator losses (spec §3.4, §6) and loss aggregation.

Shapes are batch-first: per-token tensors are [B, T] with a response ``mask`` (1 = response
token); per-response tensors are [B]. Advantages, old/rollout log-probs and importance weights
are treated as constants (detached).

Splitting a batch (micro-batches, data-parallel ranks): pass the WHOLE batch's normaliser as
``denominator`` (see :func:`aggregation_denominator`, summed over the pieces); then the per-piece
losses add up to the whole-batch loss, instead of averaging per-piece means.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AGG_MODES",
    "aggregate",
    "aggregation_denominator",
    "discriminator_loss",
    "kl_penalty",
    "pairwise_accuracy",
    "policy_loss",
    "tis_weights",
]

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm",
             "token-mean-micro")
LOG_RATIO_CLAMP = 20.0  # token log-ratio clamp (spec §6.1)
GSPO_LOG_RATIO_MAX = 10.0  # GSPO clamps its per-token log-ratio from above (spec §6.4)


def _check_mode(mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGG_MODES}")


def aggregation_denominator(mask: Tensor, mode: str) -> Tensor:
    """This piece's normaliser for ``mode``: token count (``token-mean``), number of sequences
    with >= 1 token (``seq-mean-*``, ``token-mean-micro``), or the constant ``T``
    (``seq-mean-token-sum-norm``).

    Sum the first two over micro-batches / ranks to get the global ``denominator``; the third is
    a constant and is NOT summed (pass the same ``T``, e.g. the max response length, everywhere).
    """
    _check_mode(mode)
    mask = mask.bool()
    if mode == "token-mean":
        return mask.sum().to(torch.float32)
    if mode == "seq-mean-token-sum-norm":
        return torch.tensor(float(mask.shape[-1]))
    return mask.any(dim=-1).sum().to(torch.float32)


def aggregate(
    loss: Tensor, mask: Tensor, mode: str, *, denominator: float | Tensor | None = None
) -> Tensor:
    """Reduces a per-token loss [B, T] to a scalar (spec §6.1; modes as in verl).

    * ``token-mean``: ``sum(L*M) / sum(M)``
    * ``seq-mean-token-sum``: mean over sequences with >= 1 token of ``sum_t L*M``
    * ``seq-mean-token-mean``: mean over sequences with >= 1 token of ``sum_t L*M / sum_t M``
    * ``seq-mean-token-sum-norm``: ``sum(L*M) / T`` (Dr. GRPO's constant normaliser)
    * ``token-mean-micro``: verl's micro-batch weighting. Each call is one micro-batch ``b``:
      ``n_b * (sum(L*M) / sum(M)) / denominator`` with ``n_b`` its sequences with >= 1 token;
      with the mini-batch's sequence count as ``denominator`` the pieces add up to
      ``sum_b n_b/N x token-mean_b``. Alone (no ``denominator``) it is ``token-mean``; it depends
      on how the mini-batch is split, which is the point (a parity option).

    ``denominator`` replaces the local normaliser (global token count, global sequence count, or
    the constant T) so that per-micro-batch results sum to the whole-batch value. Normalisers
    below 1 count as 1, so an empty batch gives 0 (with a graph, for a uniform backward).
    """
    _check_mode(mode)
    valid = mask.bool()
    masked = torch.where(valid, loss, torch.zeros_like(loss))  # padding garbage (nan/inf) stays out
    if mode == "seq-mean-token-mean":
        counts = valid.sum(dim=-1).clamp(min=1).to(loss.dtype)
        total = (masked.sum(dim=-1) / counts).sum()  # empty sequences contribute 0
    elif mode == "token-mean-micro":
        rows = valid.any(dim=-1).sum()
        total = masked.sum() / valid.sum().clamp(min=1) * rows
    else:
        total = masked.sum()
    if denominator is None:
        denominator = aggregation_denominator(valid, mode)
    denominator = torch.as_tensor(denominator, dtype=loss.dtype, device=loss.device).clamp(min=1)
    return total / denominator


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    values = torch.where(valid, values.to(torch.float32), torch.zeros((), device=values.device))
    return values.sum() / valid.sum().clamp(min=1)


def _masked_max(values: Tensor, valid: Tensor) -> Tensor:
    if not valid.any():
        return torch.zeros((), device=values.device)
    return values[valid].max().to(torch.float32)


def tis_weights(old_log_probs: Tensor, rollout_log_probs: Tensor, cap: float) -> Tensor:
    """Truncated importance-sampling weights ``min(pi_train / pi_rollout, cap)`` per token.

    ``old_log_probs`` are the trainer's recomputed log-probs of the sampled tokens,
    ``rollout_log_probs`` the inference engine's. Detached: the weights only rescale the loss.
    """
    log_ratio = (old_log_probs - rollout_log_probs).detach()
    return torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).clamp(max=cap)


def policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ratio_level: str = "token",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    agg: str | None = None,
    denominator: float | Tensor | None = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy-gradient loss and metrics; all inputs [B, T] (spec §6.1, §6.3, §6.4).

    ``ratio_level="token"`` (GRPO/DAPO, vanilla PPO): ``rho = exp(clamp(logp - logp_old, ±20))``,
    ``L = max(-A*rho, -A*clip(rho, 1-clip_low, 1+clip_high))``, then for ``A < 0`` only the dual
    clip ``L = min(L, -A*dual_clip)`` (``dual_clip=None`` disables it). Default ``agg``:
    ``token-mean``.

    ``ratio_level="sequence"`` (GSPO): ``s_i = exp(sum_t M*(logp - logp_old) / max(|y_i|, 1))``
    and a per-token surrogate ``log s_it = logp_t - sg(logp_t) + sg(log s_i)`` clamped above at 10
    (value ``s_i``, gradient ``s_i * grad logp_t``); ``L = max(-A*s_it, -A*clip(s_it, ...))``, no
    dual clip. Default ``agg``: ``seq-mean-token-mean``, which the reference forces; another
    explicit ``agg`` is honoured with a warning.

    ``rollout_is_weights`` (e.g. :func:`tis_weights`) multiply the per-token loss. ``denominator``
    is forwarded to :func:`aggregate`. Metrics (detached, local to this call): ``clip_frac``
    (tokens where the clipped branch is active), ``clip_frac_dual`` (tokens capped by the dual
    clip), ``approx_kl`` (masked mean of k1 = ``-(logp - logp_old)``, clamped log-ratio),
    ``ratio_mean``, ``ratio_max`` (token ratio, or ``s_i`` per token for GSPO).
    """
    if ratio_level not in ("token", "sequence"):
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    default_agg = "token-mean" if ratio_level == "token" else "seq-mean-token-mean"
    if agg is None:
        agg = default_agg
    elif ratio_level == "sequence" and agg != default_agg:
        warnings.warn(f"GSPO with agg={agg!r}: the reference uses {default_agg!r} (spec §6.4)",
                      stacklevel=2)
    valid = mask.bool()
    advantages = advantages.detach()
    old_log_probs = old_log_probs.detach()
    log_ratio = torch.where(valid, log_probs - old_log_probs, torch.zeros_like(log_probs))

    if ratio_level == "token":
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    else:
        lengths = valid.sum(dim=-1).clamp(min=1).to(log_probs.dtype)
        seq_log_ratio = log_ratio.sum(dim=-1) / lengths  # unclamped, length-normalised
        log_surrogate = log_probs - log_probs.detach() + seq_log_ratio.detach()[:, None]
        ratio = torch.exp(log_surrogate.clamp(max=GSPO_LOG_RATIO_MAX))

    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    dual_clipped = torch.zeros_like(valid)
    if ratio_level == "token" and dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        dual_bound = -advantages * dual_clip
        negative = advantages < 0
        dual_clipped = negative & (per_token > dual_bound)
        per_token = torch.where(negative, torch.minimum(per_token, dual_bound), per_token)
    if rollout_is_weights is not None:
        per_token = per_token * rollout_is_weights.detach()

    loss = aggregate(per_token, valid, agg, denominator=denominator)
    with torch.no_grad():
        metrics = {
            "clip_frac": _masked_mean(clipped, valid),
            "clip_frac_dual": _masked_mean(dual_clipped, valid),
            "approx_kl": _masked_mean(-log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), valid),
            "ratio_mean": _masked_mean(ratio.detach(), valid),
            "ratio_max": _masked_max(ratio.detach(), valid),
        }
    return loss, metrics


def kl_penalty(log_probs: Tensor, ref_log_probs: Tensor, kind: str = "low_var_kl") -> Tensor:
    """Per-token KL estimate between the policy and a reference, [B, T].

    ``kl`` (k1): ``logp - logp_ref``; ``abs``: ``|logp - logp_ref|``; ``mse`` (k2):
    ``0.5 * (logp - logp_ref)^2``; ``low_var_kl`` (k3): ``exp(d) - d - 1`` with
    ``d = clamp(logp_ref - logp, ±20)``, clamped to [-10, 10] like verl. Aliases k1/k2/k3.
    """
    kind = {"k1": "kl", "k2": "mse", "k3": "low_var_kl"}.get(kind, kind)
    diff = log_probs - ref_log_probs
    if kind == "kl":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "mse":
        return 0.5 * diff.square()
    if kind == "low_var_kl":
        d = (-diff).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return (torch.exp(d) - d - 1).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL kind {kind!r}; expected kl|abs|mse|low_var_kl (or k1|k2|k3)")


def _clean_scores(scores: Tensor, score_clip: float) -> Tensor:
    # Spec §3.3: NaN/Inf scores become 0; every score is clamped to [-score_clip, score_clip].
    scores = torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
    return scores.clamp(-score_clip, score_clip)


def discriminator_loss(
    teacher_caption: Tensor,
    student_caption: Tensor,
    teacher_reasoning: Tensor,
    student_reasoning: Tensor,
    valid: Tensor,
    *,
    score_reg: float = 0.001,
    valid_global: int | None = None,
    score_clip: float = 10.0,
) -> Tensor:
    """Online Bradley-Terry discriminator loss for one micro-batch (spec §3.4); scores are [B].

    ``L = L_D + score_reg * R``: ``L_D`` is the pairwise term ``sum_i v_i softplus(s_S - s_T) /
    max(n_loc, 1)`` for caption plus reasoning when the GLOBAL valid count ``valid_global`` (the
    all-reduced sum of ``n_loc``; default = local count) is > 0, else the fallback
    ``0.01 * (softplus(-mean s_T^cap) + softplus(-mean s_T^cot))``; ``R`` is the mean of the four
    mean squared scores over ALL samples (invalid included). The caller scales the result by
    (micro-batch size / mini-batch size) for gradient accumulation, as the reference does.
    """
    tc, sc, tr, sr = (
        _clean_scores(scores, score_clip)
        for scores in (teacher_caption, student_caption, teacher_reasoning, student_reasoning)
    )
    valid = valid.bool()
    n_local = int(valid.sum())
    n_global = n_local if valid_global is None else int(valid_global)
    if n_global > 0:
        zero = torch.zeros_like(tc)
        pair_caption = torch.where(valid, F.softplus(-(tc - sc)), zero).sum()
        pair_reasoning = torch.where(valid, F.softplus(-(tr - sr)), zero).sum()
        loss_d = (pair_caption + pair_reasoning) / max(n_local, 1)
    else:
        loss_d = 0.01 * (F.softplus(-tc.mean()) + F.softplus(-tr.mean()))
    regulariser = sum(scores.square().mean() for scores in (sc, sr, tc, tr)) / 4
    return loss_d + score_reg * regulariser


def pairwise_accuracy(
    teacher: Tensor, student: Tensor, valid: Tensor, *, empty_value: float = float("nan")
) -> Tensor:
    """Fraction of valid pairs where the teacher outscores the student (spec §3.4 logging).

    ``empty_value`` is returned without valid pairs (the reference logs a 0.92 placeholder).
    """
    valid = valid.bool()
    if not valid.any():
        return torch.tensor(empty_value)
    return (teacher.detach()[valid] > student.detach()[valid]).float().mean()
