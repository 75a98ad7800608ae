"""Names megatron-core forgets to define when Transformer Engine is absent."""

from __future__ import annotations


def define_te_general_gemm() -> None:
    """``moe_utils`` imports ``te_general_gemm`` only inside ``try: import transformer_engine``
    but later tests ``if te_general_gemm is not None`` unconditionally, so the MoE router's
    forward raises NameError without TE. Defining it as None selects the torch path. A
    megatron-core 0.16.1 bug; can go when the import fallback defines it."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
