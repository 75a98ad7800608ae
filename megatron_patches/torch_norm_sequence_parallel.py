"""megatron's torch norms (the local spec) under sequence parallelism."""

from __future__ import annotations

import copy


def allow_torch_norms_under_sequence_parallel() -> None:
    """``WrappedTorchNorm`` asserts ``not config.sequence_parallel``, so a local-spec model
    cannot turn sequence parallelism on, and megatron's MoE layers need it at TP > 1 (the
    discriminator at TP2/TP4 on CPU). A norm is per token, so it runs unchanged on a sequence
    slice; what sequence parallelism adds is that its weight's gradient is a partial sum over
    this rank's tokens: the patch builds the norm from a copy of the config without the flag and
    marks its parameters ``sequence_parallel = True``, the attribute TE's norms set, which makes
    ``finalize_model_grads`` all-reduce those gradients over TP. megatron-core 0.16.1; can go
    when ``WrappedTorchNorm`` supports sequence parallelism itself (on GPU the TE spec's
    ``TENorm`` already does)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if getattr(WrappedTorchNorm, "_prism_sequence_parallel", False):
        return
    original = WrappedTorchNorm.__new__

    def __new__(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return original(cls, config, *args, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = original(cls, plain, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    WrappedTorchNorm.__new__ = staticmethod(__new__)
    WrappedTorchNorm._prism_sequence_parallel = True
