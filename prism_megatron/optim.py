"""Optimizer + learning-rate schedule from the config, on megatron-core's implementations."""

from __future__ import annotations

import math

from prism_megatron.config import OptimizerConfig, ParallelConfig


def warmup_steps(cfg: OptimizerConfig, total_steps: int) -> int:
    """``warmup_steps`` when set, else ``ceil(warmup_ratio * total_steps)``."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)


def build_optimizer(model_chunks: list, cfg: OptimizerConfig, parallel: ParallelConfig,
                    total_steps: int, *, bf16: bool = False):
    """AdamW (megatron's optimizer wrapper, optionally distributed) and its LR schedule.

    ``model_chunks`` are megatron DDP-wrapped modules. Weight decay is decoupled (AdamW) and
    not applied to biases and norms (megatron's default grouping).
    """
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
            clip_grad=cfg.clip_grad, bf16=bf16,
            use_distributed_optimizer=parallel.distributed_optimizer),
        model_chunks)
    total_steps = max(total_steps, 1)
    warmup = min(warmup_steps(cfg, total_steps), total_steps - 1) if total_steps > 1 else 0
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=total_steps,
        lr_decay_style=cfg.schedule, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=total_steps, wd_incr_style="constant")
    return optimizer, scheduler


def wrap_ddp(model, transformer_config, parallel: ParallelConfig):
    """megatron DDP around one model chunk. ``use_distributed_optimizer`` must agree between
    DDP and the optimizer (set in only one, megatron silently falls back and ranks drift), so
    both read ``parallel.distributed_optimizer``. Overlapped reduce/gather use CUDA streams and
    stay off on CPU. megatron's own NaN check on the reduced gradients is fatal (it raises in
    the backward's gradient reduction); the trainer instead skips a non-finite step and stops
    only after ``optimizer.max_skipped_steps`` in a row, so that check stays off."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=parallel.distributed_optimizer,
        overlap_grad_reduce=False, overlap_param_gather=False, check_for_nan_in_grad=False)
    return DistributedDataParallel(transformer_config, ddp_config, model)
