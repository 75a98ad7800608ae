"""Model-parallel RNG tracker on the CPU generator."""

from __future__ import annotations

import logging

import torch


def use_cpu_rng_for_model_parallel_tracker() -> None:
    """megatron's ``CudaRNGStatesTracker`` (used by ``model_parallel_cuda_manual_seed`` and by
    every tensor-parallel weight init and dropout) saves and swaps the CUDA generator state. On
    CPU the tracked states live in the CPU generator instead: forking swaps the CPU state in and
    restores it afterwards, so TP ranks still draw different init/dropout streams while the
    default stream stays identical across them. Needed on megatron-core <= 0.16.1 (no CPU path).

    The tracker's "CPU RNG state changed within GPU RNG context" warning is meaningless when the
    two generators are the same one, so it is silenced.
    """
    from megatron.core.tensor_parallel import random as mp_random

    def get_state(device=None, clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mp_random._get_cuda_rng_state = get_state
    mp_random._set_cuda_rng_state = set_state
    logging.getLogger(mp_random.__name__).setLevel(logging.ERROR)
