"""Parameter type checks that only accept CUDA tensors (fp32, and bf16/fp16 for mixed precision)."""

from __future__ import annotations

from megatron_patches.source_rewrite import rewrite_function


HALF_CUDA = "['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']"
HALF_CPU = "['torch.HalfTensor', 'torch.BFloat16Tensor']"
FP32_CUDA, FP32_CPU = "'torch.cuda.FloatTensor'", "'torch.FloatTensor'"


def accept_cpu_params() -> None:
    """megatron's optimizers sort parameters by CUDA type strings
    (``param.type() == 'torch.cuda.FloatTensor'``, ``in ['torch.cuda.HalfTensor',
    'torch.cuda.BFloat16Tensor']``) and grad clipping asserts the fp32 one, so CPU parameters
    are rejected (fp32) or raise TypeError (bf16 mixed precision). The checks are rewritten to
    the CPU type names. Needed on megatron-core <= 0.16.1; can go once megatron compares dtypes
    instead of CUDA type strings."""
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as mcore_optimizer

    rewrite_function(clip_grads, "clip_grad_by_total_norm_fp32", [(FP32_CUDA, FP32_CPU)],
                     imported_by=(mcore_optimizer,))
    rewrite_function(distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups",
                     [(FP32_CUDA, FP32_CPU), (HALF_CUDA, HALF_CPU)])
    rewrite_function(distrib_optimizer.DistributedOptimizer, "__init__", [(HALF_CUDA, HALF_CPU)])
    rewrite_function(mcore_optimizer.Float16OptimizerWithFloat16Params, "__init__",
                     [(FP32_CUDA, FP32_CPU), (HALF_CUDA, HALF_CPU)])
