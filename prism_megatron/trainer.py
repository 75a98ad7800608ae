"""One Megatron model under training: DDP, optimizer, LR schedule, pipeline schedule, checkpoints.

Every stage (SFT, discriminator warm-up, alignment, RLVR) trains through ``Trainer.train_step``
with its own ``forward(batch, model) -> (output, loss_fn)`` pair in megatron's convention. Losses
are sums with token counts (``calculate_per_token_loss``): megatron divides the gradients by the
global number of loss tokens across micro-batches and data-parallel ranks, so a step equals the
whole-batch token mean however the batch is split.

A step whose loss or gradient norm is not finite is skipped (no optimizer or LR-schedule update,
so the weights stay exactly as they were), logged and counted (``skipped_steps``); more than
``optimizer.max_skipped_steps`` in a row stop the run. Weights that are not finite are never
saved.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Iterable

import torch
import torch.distributed as dist

from prism_megatron.checkpoint import (
    CheckpointError, check_complete, load_checkpoint, read_latest_marker, remove_stale_tmp,
    resume_candidates, save_checkpoint, step_dirs)
from prism_megatron.config import CheckpointConfig, OptimizerConfig, ParallelConfig
from prism_megatron.errors import PrismError
from prism_megatron.optim import build_optimizer, wrap_ddp
from prism_megatron.schedule import ForwardFn, forward_only, run_schedule

log = logging.getLogger("prism.trainer")



def token_loss_fn(loss_mask: torch.Tensor):
    """Megatron loss function for per-token losses [B, S]: (sum, token count, logs)."""

    def loss_fn(per_token: torch.Tensor):
        mask = loss_mask.to(per_token.dtype)
        loss_sum = (per_token.float() * mask).sum()
        n_tokens = mask.sum().to(torch.int)
        return loss_sum, n_tokens, {"loss": torch.stack([loss_sum.detach(), mask.sum().detach()])}

    return loss_fn


class NonFiniteError(PrismError):
    """Training diverged: non-finite losses/gradients in a row, or non-finite weights to save."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _all_ranks(flag: bool, op=dist.ReduceOp.MIN) -> bool:
    """``flag`` combined over the world (MIN: all true; MAX: any true)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=op)
    return bool(value.item())


def _broadcast(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class Trainer:
    def __init__(self, model: torch.nn.Module, transformer_config, optimizer_cfg: OptimizerConfig,
                 parallel: ParallelConfig, checkpoint: CheckpointConfig, total_steps: int,
                 *, bf16: bool = False):
        from megatron.core.distributed import finalize_model_grads

        transformer_config.calculate_per_token_loss = True
        transformer_config.finalize_model_grads_func = finalize_model_grads
        self.config = transformer_config
        self.model = wrap_ddp(model, transformer_config, parallel, optimizer_cfg)  # grad dtype
        self.optimizer, self.scheduler = build_optimizer(
            [self.model], optimizer_cfg, parallel, total_steps, bf16=bf16)
        self.checkpoint = checkpoint
        self.total_steps = total_steps
        self.max_skipped_steps = optimizer_cfg.max_skipped_steps
        self.skipped_steps = 0          # steps skipped for a non-finite loss / grad norm (total)
        self.consecutive_skips = 0

    @property
    def saving(self) -> bool:
        return bool(self.checkpoint.enabled and self.checkpoint.save_dir)

    # ---- steps --------------------------------------------------------------------------
    def train_step(self, batches: list[dict], forward: ForwardFn, seq_length: int) -> dict:
        """One optimizer step over this rank's micro-batches; returns the global mean loss,
        grad norm and learning rate (the same numbers on every rank). A non-finite loss or
        grad norm skips the update (see the module docstring)."""
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = run_schedule(self.model, batches, forward, seq_length, forward_only=False)
        metrics = reduce_losses(outputs)
        # megatron's fp32 and bf16 optimizers check nothing without a loss scaler: look at the
        # (global, identical on every rank) loss and grad norm before stepping.
        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm() or 0.0)
        finite = not found_inf and math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)
        updated = False
        if finite:
            updated, step_norm, _ = self.optimizer.step()
            grad_norm = float(step_norm) if step_norm is not None else grad_norm
        if updated:
            self.scheduler.step(increment=1)
            self.consecutive_skips = 0
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            log.warning("optimizer step skipped: loss %s, grad norm %s (%d in a row; "
                        "optimizer.max_skipped_steps=%d)", metrics["loss"], grad_norm,
                        self.consecutive_skips, self.max_skipped_steps)
            if self.consecutive_skips > self.max_skipped_steps:
                raise NonFiniteError(
                    f"{self.consecutive_skips} optimizer steps in a row had a non-finite loss or "
                    f"gradient norm (last: loss {metrics['loss']}, grad norm {grad_norm}; "
                    f"optimizer.max_skipped_steps={self.max_skipped_steps}): lower optimizer.lr, "
                    "raise optimizer.adam_eps or check the data; the saved checkpoints hold "
                    "finite weights")
        metrics.update(grad_norm=grad_norm, lr=self.optimizer.param_groups[0]["lr"],
                       skipped=float(not updated), skipped_steps=float(self.skipped_steps))
        return metrics

    def forward_only(self, batches: list[dict], forward: ForwardFn, seq_length: int) -> list[dict]:
        """A no-gradient pass over ``batches`` (log-probs, scores); returns the loss_fn logs."""
        return forward_only(self.model, batches, forward, seq_length)

    def eval_step(self, batches: list[dict], forward: ForwardFn, seq_length: int) -> dict:
        """A no-gradient pass; the global mean of the loss_fn's ``loss`` logs."""
        return reduce_losses(self.forward_only(batches, forward, seq_length))

    # ---- checkpoints --------------------------------------------------------------------
    def weights_finite(self) -> bool:
        """True when every parameter on every rank is finite (collective)."""
        ok = all(bool(torch.isfinite(p).all()) for p in self.model.parameters())
        return _all_ranks(ok)

    def save(self, step: int, state: dict | None = None) -> Path | None:
        """Checkpoint ``step`` (None when checkpoints are off); refuses non-finite weights."""
        if not self.saving:
            return None
        if not self.weights_finite():
            raise NonFiniteError(
                f"the model's weights are not finite at step {step}: not saved (the checkpoints "
                f"in {self.checkpoint.save_dir} are kept); lower optimizer.lr or raise "
                "optimizer.adam_eps and resume")
        state = dict(state or {}, skipped_steps=self.skipped_steps)
        return save_checkpoint(self.checkpoint.save_dir, step, [self.model], self.optimizer,
                               self.scheduler, state, keep_last=self.checkpoint.keep_last)

    def maybe_resume(self) -> dict:
        """Resume per ``checkpoint.resume``: ``auto`` (the newest complete checkpoint in
        save_dir by step number, falling back to older complete ones when one fails to load;
        a directory whose step directories are all incomplete is refused), ``never`` (start
        from step 0; ``none`` is an alias) or a checkpoint path. Returns the trainer state
        ({} when starting from step 0)."""
        c = self.checkpoint
        mode = "never" if c.resume in ("never", "none") else c.resume
        save_dir = Path(c.save_dir) if self.saving else None
        if save_dir is not None:
            if _is_main():
                remove_stale_tmp(save_dir)
            if dist.is_initialized():
                dist.barrier()
        if mode == "never":
            existing = step_dirs(save_dir) if save_dir is not None else []
            if existing and _is_main():
                log.warning("checkpoint.resume=never: starting from step 0 although %s holds "
                            "%s (newest); a save at the same step replaces it", save_dir,
                            existing[0].name)
            return {}
        if mode == "auto":
            if save_dir is None:
                return {}
            complete, skipped = _broadcast(resume_candidates(save_dir) if _is_main() else None)
            if not complete and not skipped:
                if _is_main():
                    log.info("no checkpoint in %s: starting from step 0", save_dir)
                return {}
            if not complete:
                why = "; ".join(f"{p.name}: {r}" for p, r in skipped[:3])
                raise CheckpointError(
                    f"{save_dir} holds {len(skipped)} step directories and none is a complete "
                    f"checkpoint ({why}); set checkpoint.resume=never to start from step 0, or "
                    "move them away")
        else:
            path = Path(mode)
            why = _broadcast(check_complete(path) if _is_main() else None)
            if why is not None:
                raise CheckpointError(f"checkpoint.resume={mode}: not a complete checkpoint "
                                      f"({why})")
            complete, skipped = [path], []
        if _is_main():
            for path, why in skipped:
                log.warning("skipping %s: %s", path, why)
            marker = read_latest_marker(save_dir) if save_dir is not None else None
            if mode == "auto" and marker is not None and marker != complete[0].name:
                log.warning("%s/latest names %r, not the newest complete checkpoint %s: using "
                            "%s", save_dir, marker, complete[0].name, complete[0].name)
        failures = []
        for path in complete:
            started, error = time.perf_counter(), None
            try:
                state = load_checkpoint(path, [self.model], self.optimizer, self.scheduler)
            except Exception as exc:   # megatron / torch raise many types for a bad file
                error, state = _first_line(exc), {}
            if _all_ranks(error is None):
                self.skipped_steps = int(state.get("skipped_steps", 0))
                if _is_main():
                    log.info("resumed from %s (step %d) in %.1f s", path, state.get("step", 0),
                             time.perf_counter() - started)
                return state
            failures.append(f"{path.name}: {error or 'failed on another rank'}")
            if _is_main():
                log.warning("could not load %s (%s)%s", path, error or "failed on another rank",
                            "; falling back to the previous complete checkpoint"
                            if path != complete[-1] else "")
        raise CheckpointError(f"no checkpoint in {save_dir or complete[0]} could be loaded: "
                              + "; ".join(failures))


def reduce_losses(outputs: Iterable[dict]) -> dict:
    """Sum the (loss_sum, tokens) pairs of the micro-batches, across data-parallel ranks, and
    share the result from the last pipeline stage with the others."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(2)
    for out in outputs or []:
        if "loss" in out:
            total += out["loss"].float()
    if dist.is_initialized():
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return {"loss": (total[0] / total[1].clamp(min=1)).item(), "tokens": total[1].item()}
