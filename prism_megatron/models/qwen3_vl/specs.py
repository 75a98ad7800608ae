"""Layer specs of Qwen3-VL's two towers, for two backends from one model definition.

* ``local``: megatron-core's own modules (torch norms, Column/RowParallelLinear,
  DotProductAttention) — runs anywhere, CPU included.
* ``transformer_engine``: TE layers (norm fused into the following linear, TE attention, FP8).
  TE is imported only when this spec is asked for.

Both produce the same ``sharded_state_dict`` keys (the local spec maps its separate norms onto
TE's fused ``layer_norm_*`` names, as megatron's GPT local spec does), so checkpoints move freely
between them. Plain ``state_dict()`` names differ only in those norms.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules, get_num_layers_to_build)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from prism_megatron.models.qwen3_vl.config import SPECS

TE_INSTALL_HINT = ("the 'transformer_engine' layer spec needs NVIDIA Transformer Engine, which is "
                   "not importable here: pip install -r requirements-gpu.txt (on a CUDA machine), "
                   "or use spec='local'")

# Local (unfused) norm names -> TE's fused ``linear.layer_norm_*`` names in sharded checkpoints.
LOCAL_TO_TE_KEYS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


class DeepStackTransformerLayer(TransformerLayer):
    """A text decoder layer that adds its DeepStack visual features after its output.

    megatron threads a ``context`` tensor through every layer of a TransformerBlock (meant for
    cross-attention, which Qwen3-VL does not have), also through activation recompute. The model
    passes the DeepStack features there as a dense ``[levels, S, B, H]`` tensor (zero away from
    image tokens); layer ``i`` (global index) adds level ``i`` when there is one.
    """

    def forward(self, *args, **kwargs):
        output, context = super().forward(*args, **kwargs)
        level = self.layer_number - 1  # layer_number is global and 1-based
        if context is not None and level < context.shape[0]:
            output = output + context[level]
        return output, context


@dataclass(frozen=True)
class Backend:
    """The module classes a spec is built from."""
    name: str
    norm: type                      # stand-alone norm (q/k norm, final norm, unfused pre-norms)
    column_linear: type
    row_linear: type
    norm_column_linear: type | None  # norm fused into the next linear (TE), else None
    core_attention: type


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install
        return False
    return True


def get_backend(spec: str) -> Backend:
    if spec not in SPECS:
        raise ValueError(f"unknown layer spec {spec!r}; choose one of {SPECS}")
    if spec == "local":
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.dot_product_attention import DotProductAttention
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        return Backend("local", WrappedTorchNorm, ColumnParallelLinear, RowParallelLinear, None,
                       DotProductAttention)
    if not te_available():
        raise ImportError(TE_INSTALL_HINT)
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear, TEDotProductAttention, TELayerNormColumnParallelLinear, TENorm,
        TERowParallelLinear)

    return Backend("transformer_engine", TENorm, TEColumnParallelLinear, TERowParallelLinear,
                   TELayerNormColumnParallelLinear, TEDotProductAttention)


def _layer_spec(backend: Backend, *, layer: type, mask_type: AttnMaskType, qk_norm: bool) -> ModuleSpec:
    fused = backend.norm_column_linear is not None
    in_linear = backend.norm_column_linear if fused else backend.column_linear
    return ModuleSpec(
        module=layer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if fused else backend.norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=in_linear, core_attention=backend.core_attention,
                    linear_proj=backend.row_linear,
                    q_layernorm=backend.norm if qk_norm else IdentityOp,
                    k_layernorm=backend.norm if qk_norm else IdentityOp),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp if fused else backend.norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=in_linear,
                                                                linear_fc2=backend.row_linear)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={} if fused else dict(LOCAL_TO_TE_KEYS),
        ),
    )


def text_layer_spec(spec: str = "local") -> ModuleSpec:
    """Qwen3 decoder layer: causal GQA with per-head RMS q/k norms, SwiGLU MLP, DeepStack add."""
    return _layer_spec(get_backend(spec), layer=DeepStackTransformerLayer,
                       mask_type=AttnMaskType.causal, qk_norm=True)


def vision_layer_spec(spec: str = "local") -> ModuleSpec:
    """Vision block: bidirectional attention within each image (``no_mask`` + the per-image
    block-diagonal mask on the local backend, packed ``cu_seqlens`` on TE), GELU MLP."""
    return _layer_spec(get_backend(spec), layer=TransformerLayer,
                       mask_type=AttnMaskType.no_mask, qk_norm=False)


def text_block_spec(config, spec: str = "local", vp_stage: int | None = None,
                    pp_rank: int | None = None) -> TransformerBlockSubmodules:
    """This pipeline stage's decoder layers plus the final RMSNorm (kept on the last stage)."""
    layer = text_layer_spec(spec)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage, pp_rank),
        layer_norm=get_backend(spec).norm)


def vision_block_spec(config, spec: str = "local") -> TransformerBlockSubmodules:
    """All vision blocks; no final norm (each patch merger has its own)."""
    return TransformerBlockSubmodules(layer_specs=[vision_layer_spec(spec)] * config.num_layers,
                                      layer_norm=None)
