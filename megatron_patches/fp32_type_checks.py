"""fp32 parameter type checks that only accept CUDA tensors."""

from __future__ import annotations

from megatron_patches.source_rewrite import rewrite_function


def accept_cpu_fp32_params() -> None:
    """The distributed optimizer sorts parameters by ``param.type() == 'torch.cuda.FloatTensor'``
    and grad clipping asserts the same string, so fp32 CPU parameters are rejected. Both checks
    are rewritten to the CPU type name. Needed on megatron-core <= 0.16.1; can go once
    megatron compares dtypes instead of CUDA type strings."""
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as mcore_optimizer

    rewrite_function(clip_grads, "clip_grad_by_total_norm_fp32",
                     [("'torch.cuda.FloatTensor'", "'torch.FloatTensor'")],
                     imported_by=(mcore_optimizer,))
    rewrite_function(distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups",
                     [("model_param.type() == 'torch.cuda.FloatTensor'",
                       "model_param.type() == 'torch.FloatTensor'")])
