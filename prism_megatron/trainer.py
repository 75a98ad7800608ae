"""One Megatron model under training: DDP, optimizer, LR schedule, pipeline schedule, checkpoints.

Every stage (SFT, discriminator warm-up, alignment, RLVR) trains through ``Trainer.train_step``
with its own ``forward(batch, model) -> (output, loss_fn)`` pair in megatron's convention. Losses
are sums with token counts (``calculate_per_token_loss``): megatron divides the gradients by the
global number of loss tokens across micro-batches and data-parallel ranks, so a step equals the
whole-batch token mean however the batch is split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from prism_megatron.checkpoint import find_latest, load_checkpoint, save_checkpoint
from prism_megatron.config import CheckpointConfig, OptimizerConfig, ParallelConfig
from prism_megatron.optim import build_optimizer, wrap_ddp

# forward(batch, model) -> (output tensor, loss_fn); loss_fn(output) -> (loss_sum, n_tokens, logs)
ForwardFn = Callable[[dict, torch.nn.Module], tuple]


def token_loss_fn(loss_mask: torch.Tensor):
    """Megatron loss function for per-token losses [B, S]: (sum, token count, logs)."""

    def loss_fn(per_token: torch.Tensor):
        mask = loss_mask.to(per_token.dtype)
        loss_sum = (per_token.float() * mask).sum()
        n_tokens = mask.sum().to(torch.int)
        return loss_sum, n_tokens, {"loss": torch.stack([loss_sum.detach(), mask.sum().detach()])}

    return loss_fn


class Trainer:
    def __init__(self, model: torch.nn.Module, transformer_config, optimizer_cfg: OptimizerConfig,
                 parallel: ParallelConfig, checkpoint: CheckpointConfig, total_steps: int,
                 *, bf16: bool = False):
        from megatron.core.distributed import finalize_model_grads

        transformer_config.calculate_per_token_loss = True
        transformer_config.finalize_model_grads_func = finalize_model_grads
        self.config = transformer_config
        self.model = wrap_ddp(model, transformer_config, parallel)
        self.optimizer, self.scheduler = build_optimizer(
            [self.model], optimizer_cfg, parallel, total_steps, bf16=bf16)
        self.checkpoint = checkpoint
        self.total_steps = total_steps

    # ---- steps --------------------------------------------------------------------------
    def _run(self, batches: list[dict], forward: ForwardFn, seq_length: int, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batch_iter = iter(batches)

        def forward_step(data_iterator, model):
            return forward(next(data_iterator), model)

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=batch_iter, model=[self.model],
            num_microbatches=len(batches), seq_length=seq_length,
            micro_batch_size=batches[0]["input_ids"].shape[0], forward_only=forward_only)

    def train_step(self, batches: list[dict], forward: ForwardFn, seq_length: int) -> dict:
        """One optimizer step over this rank's micro-batches; returns the global mean loss,
        grad norm and learning rate (the same numbers on every rank)."""
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run(batches, forward, seq_length, forward_only=False)
        updated, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        metrics = reduce_losses(outputs)
        metrics.update(grad_norm=float(grad_norm or 0.0), lr=self.optimizer.param_groups[0]["lr"],
                       skipped=float(not updated))
        return metrics

    @torch.no_grad()
    def eval_step(self, batches: list[dict], forward: ForwardFn, seq_length: int) -> dict:
        self.model.eval()
        return reduce_losses(self._run(batches, forward, seq_length, forward_only=True))

    # ---- checkpoints --------------------------------------------------------------------
    def save(self, step: int, state: dict | None = None) -> Path:
        return save_checkpoint(self.checkpoint.save_dir, step, [self.model], self.optimizer,
                               self.scheduler, state, keep_last=self.checkpoint.keep_last)

    def maybe_resume(self) -> dict:
        """Resume per ``checkpoint.resume``: auto (latest in save_dir, if any), none, or a path."""
        mode = self.checkpoint.resume
        if mode == "none" or not self.checkpoint.save_dir:
            return {}
        path = find_latest(self.checkpoint.save_dir) if mode == "auto" else Path(mode)
        if path is None:
            return {}
        return load_checkpoint(path, [self.model], self.optimizer, self.scheduler)


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
