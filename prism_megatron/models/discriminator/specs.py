"""MoE text layers for the discriminator, derived from Qwen3-VL's own layer spec.

Attention, norms, DeepStack injection and the checkpoint key mapping come from
``qwen3_vl.specs.text_layer_spec``; only the MLP changes: megatron-core's MoELayer (router ->
token dispatcher -> SequentialMLP experts -> combine) with our ``SegmentRouter``. The pre-MLP norm
stays a separate module on both backends (it cannot be fused into a router-selected expert's fc1),
so its checkpoint key is ``pre_mlp_layernorm.weight`` for the local and the TE spec alike.
"""

from __future__ import annotations

import dataclasses

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules, get_num_layers_to_build)

from prism_megatron.models.discriminator.routing import SegmentRouter
from prism_megatron.models.qwen3_vl.specs import get_backend, text_layer_spec


def moe_mlp_spec(spec: str, num_experts: int, grouped_gemm: bool = False) -> ModuleSpec:
    """MoELayer with SequentialMLP experts, or TE's grouped GEMM (``grouped_gemm``, TE spec
    only: TEGroupedMLP, whose sharded checkpoint keys equal SequentialMLP's, so weights load
    either way; megatron notes the optimizer states do not), and the segment-aware router."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend

    if spec == "local":
        from megatron.core.models.backends import LocalSpecProvider as Provider
    else:
        get_backend(spec)  # the TE install hint when it is missing
        from megatron.core.extensions.transformer_engine_spec_provider import (
            TESpecProvider as Provider)
    moe = get_moe_module_spec_for_backend(Provider(), num_experts=num_experts,
                                          moe_grouped_gemm=grouped_gemm and spec != "local")
    moe.submodules.router = SegmentRouter
    moe.submodules.shared_experts = None   # Qwen3-VL-MoE has no shared expert
    return moe


def moe_text_layer_spec(spec: str, num_experts: int, grouped_gemm: bool = False) -> ModuleSpec:
    dense = text_layer_spec(spec)
    keys = {k: v for k, v in dense.submodules.sharded_state_dict_keys_map.items()
            if not k.startswith("pre_mlp_layernorm")}
    submodules = dataclasses.replace(dense.submodules, pre_mlp_layernorm=get_backend(spec).norm,
                                     mlp=moe_mlp_spec(spec, num_experts, grouped_gemm),
                                     sharded_state_dict_keys_map=keys)
    return ModuleSpec(module=dense.module, params=dict(dense.params), submodules=submodules)


def moe_text_block_spec(config, spec: str = "local") -> TransformerBlockSubmodules:
    """This pipeline stage's MoE decoder layers (every layer is MoE, spec §3.1) + final norm."""
    layer = moe_text_layer_spec(spec, config.num_moe_experts,
                                bool(getattr(config, "moe_grouped_gemm", False)))
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=get_backend(spec).norm)
