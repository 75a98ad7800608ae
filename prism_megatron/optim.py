"""Optimizer + learning-rate schedule from the config, on megatron-core's implementations."""

from __future__ import annotations

import math

from prism_megatron.config import ConfigError, OptimizerConfig, ParallelConfig


def warmup_steps(cfg: OptimizerConfig, total_steps: int) -> int:
    """``warmup_steps`` when set, else ``ceil(warmup_ratio * total_steps)``."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)


def check_offload(cfg: OptimizerConfig, parallel: ParallelConfig, *, cuda: bool | None = None
                  ) -> None:
    """megatron-core's optimizer CPU offload (HybridDeviceOptimizer) moves states between CUDA
    streams and host memory, and megatron runs it through the distributed optimizer with the
    precision-aware path: refuse what it cannot run, naming the fix."""
    if not getattr(cfg, "cpu_offload", False):
        return
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        raise ConfigError("optimizer.cpu_offload=true needs CUDA: megatron-core's "
                          "HybridDeviceOptimizer moves the optimizer states between GPU and host "
                          "on CUDA streams; set optimizer.cpu_offload=false on a CPU host")
    if not parallel.distributed_optimizer:
        raise ConfigError("optimizer.cpu_offload=true runs through megatron's distributed "
                          "optimizer: set parallel.distributed_optimizer=true")


def megatron_optimizer_config(cfg: OptimizerConfig, parallel: ParallelConfig, *,
                              bf16: bool = False):
    """megatron-core's OptimizerConfig for ours (AdamW, decoupled weight decay)."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig

    check_offload(cfg, parallel)
    offload = {}
    if getattr(cfg, "cpu_offload", False):
        # megatron's offload path is the precision-aware distributed optimizer (fp32 states)
        offload = dict(optimizer_cpu_offload=True,
                       optimizer_offload_fraction=float(cfg.offload_fraction),
                       use_precision_aware_optimizer=True, overlap_cpu_optimizer_d2h_h2d=True)
    return MegatronOptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, bf16=bf16,
        use_distributed_optimizer=parallel.distributed_optimizer, **offload)


def build_optimizer(model_chunks: list, cfg: OptimizerConfig, parallel: ParallelConfig,
                    total_steps: int, *, bf16: bool = False):
    """AdamW (megatron's optimizer wrapper, optionally distributed, optionally with its CPU
    offload) and its LR schedule.

    ``model_chunks`` are megatron DDP-wrapped modules. Weight decay is decoupled (AdamW) and
    not applied to biases and norms (megatron's default grouping).
    """
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = get_megatron_optimizer(megatron_optimizer_config(cfg, parallel, bf16=bf16),
                                       model_chunks)
    total_steps = max(total_steps, 1)
    warmup = min(warmup_steps(cfg, total_steps), total_steps - 1) if total_steps > 1 else 0
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else cfg.lr, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=total_steps,
        lr_decay_style=cfg.schedule, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=total_steps, wd_incr_style="constant")
    return optimizer, scheduler


def wrap_ddp(model, transformer_config, parallel: ParallelConfig,
             optimizer: OptimizerConfig | None = None):
    """megatron DDP around one model chunk. ``use_distributed_optimizer`` must agree between
    DDP and the optimizer (set in only one, megatron silently falls back and ranks drift), so
    both read ``parallel.distributed_optimizer``. The gradient buffer is fp32 unless
    ``optimizer.main_grads_dtype`` is bf16 (megatron's ``grad_reduce_in_fp32`` off: half the
    memory; with the distributed optimizer only this rank's shard is upcast for the update).
    Overlapped reduce/gather use CUDA streams and stay off on CPU. megatron's own NaN check on
    the reduced gradients is fatal (it raises in the backward's gradient reduction); the trainer
    instead skips a non-finite step and stops only after ``optimizer.max_skipped_steps`` in a
    row, so that check stays off."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    fp32_grads = getattr(optimizer, "main_grads_dtype", "fp32") != "bf16"
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=fp32_grads, use_distributed_optimizer=parallel.distributed_optimizer,
        overlap_grad_reduce=False, overlap_param_gather=False, check_for_nan_in_grad=False)
    return DistributedDataParallel(transformer_config, ddp_config, model)
