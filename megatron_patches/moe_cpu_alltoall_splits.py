"""The alltoall MoE token dispatcher's split sizes on CPU."""

from __future__ import annotations


def split_sizes_as_numpy_on_cpu() -> None:
    """``MoEAlltoAllTokenDispatcher`` turns its all-to-all split sizes into numpy arrays with
    ``maybe_move_tensor_to_cpu(..., as_numpy=True)``, which only converts CUDA tensors; on a CPU
    host the sizes stay tensors and ``all_to_all_single`` rejects them (TypeError: incompatible
    function arguments) as soon as expert parallelism is > 1. Here a CPU tensor asked for
    ``as_numpy`` is converted too. megatron-core 0.16.1; can go when the helper converts CPU
    tensors as well (or the dispatcher calls ``.tolist()``)."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu
    if getattr(original, "__prism_patched__", False):
        return

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        import torch

        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    maybe_move_tensor_to_cpu.__prism_patched__ = True
    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
