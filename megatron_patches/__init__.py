"""Small, named patches that let megatron-core 0.16.1 build, train and checkpoint on CPU (gloo).

Each entry of ``PATCHES`` is one function with a docstring saying why it exists and when it
can go. ``apply_all()`` is idempotent and does nothing on a machine with CUDA: the patches only
redirect CUDA-only code paths to the CPU.

Written against megatron-core==0.16.1 (pinned in requirements.txt). After an upgrade, run
``make test``: each source-rewrite patch asserts that the code it rewrites is still there.
"""

from __future__ import annotations

import torch

from megatron_patches import (cpu_rng, cpu_torch, cuda_type_checks, gloo_uneven_collectives,
                              missing_te_symbols, moe_cpu_alltoall_splits, tied_embedding_cpu,
                              torch_adam_step, torch_norm_sequence_parallel)

MEGATRON_CORE_VERSION = "0.16.1"

# Megatron modules that ask torch.cuda for a device, stream or synchronisation.
CUDA_QUERYING_MODULES = (
    "megatron.core.utils",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.module",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.rerun_state_machine",
)


def redirect_cuda_device_queries() -> None:
    """megatron-core allocates with ``torch.cuda.current_device()``/``device="cuda"`` and calls
    ``torch.cuda.synchronize()`` (global memory buffer, TP gathers, p2p shape exchange, pipeline
    token counters, grad-norm buffers). Those modules get a torch view whose CUDA requests
    resolve to the CPU. Needed for every megatron-core release so far on CPU-only hosts."""
    for name in CUDA_QUERYING_MODULES:
        cpu_torch.redirect_module(name)


PATCHES = [
    redirect_cuda_device_queries,
    cpu_rng.use_cpu_rng_for_model_parallel_tracker,
    cuda_type_checks.accept_cpu_params,
    missing_te_symbols.define_te_general_gemm,
    torch_adam_step.copy_only_checkpointed_adam_state,
    moe_cpu_alltoall_splits.split_sizes_as_numpy_on_cpu,
    tied_embedding_cpu.place_tied_embedding_copy_on_current_device,
    torch_norm_sequence_parallel.allow_torch_norms_under_sequence_parallel,
    gloo_uneven_collectives.uneven_first_dim_collectives_on_gloo,
]

_applied = False


def apply_all(force: bool = False) -> list[str]:
    """Apply every patch once (no-op when CUDA is available unless ``force``).

    Returns the names of the patches applied by this call.
    """
    global _applied
    if _applied or (torch.cuda.is_available() and not force):
        return []
    for patch in PATCHES:
        patch()
    _applied = True
    return [p.__name__ for p in PATCHES]
