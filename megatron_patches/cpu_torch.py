"""A view of ``torch`` for megatron-core modules running on a CPU-only host.

megatron-core 0.16.1 places buffers with ``torch.cuda.current_device()``, allocates small
counters with ``device="cuda"`` and calls ``torch.cuda.synchronize()``/``empty_cache()`` in
dozens of places. Rather than patching global ``torch.cuda`` (which would lie to every other
library in the process), each affected megatron module gets its own ``torch`` global replaced by
this view: identical to ``torch`` except that CUDA device requests resolve to the CPU.
"""

from __future__ import annotations

import functools
import importlib
import types

import torch

# Factory functions megatron calls with ``device="cuda"`` or ``torch.cuda.current_device()``.
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "empty_like",
              "ones_like", "full_like", "randn", "rand", "randint")


def _cpu_if_cuda(device):
    if device is None:
        return None
    text = str(device)
    return "cpu" if text.startswith("cuda") or text.isdigit() else device


def _redirect_device(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinned memory needs a CUDA driver
        return fn(*args, **kwargs)
    return wrapper


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: work on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, *a, **k):
        return _NullStream()

    def record(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _CpuCuda(types.SimpleNamespace):
    """``torch.cuda`` as megatron sees it on CPU; anything not overridden falls through."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


_cpu_cuda = _CpuCuda(
    current_device=lambda: "cpu",
    synchronize=lambda *a, **k: None,
    empty_cache=lambda: None,
    Stream=_NullStream,
    Event=_NullStream,
    current_stream=lambda *a, **k: _NullStream(),
    default_stream=lambda *a, **k: _NullStream(),
    stream=lambda *a, **k: _NullStream(),
    get_rng_state=lambda *a, **k: torch.get_rng_state(),
    set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
    manual_seed=torch.manual_seed,  # the tracker seeds, snapshots and restores one generator
    is_available=lambda: False,
)


class CpuTorchView(types.ModuleType):
    """Module proxy: ``torch`` with CUDA device requests answered by the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _cpu_cuda
        for name in _FACTORIES:
            setattr(self, name, _redirect_device(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


CPU_TORCH = CpuTorchView()


def redirect_module(module_name: str) -> None:
    """Give one megatron module the CPU view of torch (idempotent)."""
    module = importlib.import_module(module_name)
    if getattr(module, "torch", None) is not CPU_TORCH:
        module.torch = CPU_TORCH
