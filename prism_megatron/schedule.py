"""megatron's pipeline schedule over a list of micro-batches: the one place that calls it.

``forward(batch, model) -> (output, loss_fn)`` in megatron's convention; ``loss_fn(output) ->
(loss_sum, count, logs)`` runs on the last pipeline stage only. Training (``Trainer.train_step``),
log-prob recompute, discriminator scoring and conversion checks all go through ``run_schedule``;
the no-gradient passes through ``forward_only``, which also puts the model in eval mode for the
pass and restores its mode afterwards.
"""

from __future__ import annotations

from typing import Callable

import torch

# forward(batch, model) -> (output tensor, loss_fn); loss_fn(output) -> (loss_sum, n_tokens, logs)
ForwardFn = Callable[[dict, torch.nn.Module], tuple]


def run_schedule(model, batches: list[dict], forward: ForwardFn, seq_length: int, *,
                 forward_only: bool) -> list[dict]:
    """One pass of megatron's schedule (one model chunk); returns the loss_fn logs (last stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    data = iter(batches)
    return get_forward_backward_func()(
        forward_step_func=lambda iterator, m: forward(next(iterator), m), data_iterator=data,
        model=[model], num_microbatches=len(batches), seq_length=seq_length,
        micro_batch_size=batches[0]["input_ids"].shape[0], forward_only=forward_only)


@torch.no_grad()
def forward_only(model, batches: list[dict], forward: ForwardFn, seq_length: int) -> list[dict]:
    """A no-gradient pass in eval mode (collective over the model-parallel group)."""
    was_training = model.training
    model.eval()
    try:
        return run_schedule(model, batches, forward, seq_length, forward_only=True)
    finally:
        model.train(was_training)
