"""Megatron TransformerConfigs for Qwen3-VL, built from the checkpoint's HF ``config.json``.

Model hyper-parameters live only in the HF config; this module translates them. Two configs come
out: the text decoder's (pipelined over PP stages, FP8-capable) and the vision tower's (always
whole on the first stage, so its own ``pipeline_model_parallel_size`` is 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from prism_megatron.weights.errors import ConversionError
from prism_megatron.weights.layout import padded_vocab_size, stage_layer_counts  # noqa: F401 (re-export)
from prism_megatron.errors import PrismError

SPECS = ("local", "transformer_engine")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16}


class Qwen3VLConfigError(PrismError, ValueError):
    """The HF config or the requested layout cannot be built; the message says what to change."""


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """HF's ``gelu_pytorch_tanh`` (the vision blocks' activation)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": gelu_tanh,
               "gelu_new": gelu_tanh}


# ------------------------------------------------------------------------------ HF config

# Keys of config.json the model is built from. transformers fills absent ones with defaults of
# some other Qwen3-VL size (head_dim, token ids, tied embeddings, M-RoPE sections), which then
# fails much later as a shape mismatch naming no key, so they are required here.
REQUIRED_KEYS = (
    "model_type", "tie_word_embeddings", "image_token_id", "vision_start_token_id",
    "vision_end_token_id",
    "text_config.vocab_size", "text_config.hidden_size", "text_config.intermediate_size",
    "text_config.num_hidden_layers", "text_config.num_attention_heads",
    "text_config.num_key_value_heads", "text_config.head_dim", "text_config.rms_norm_eps",
    "text_config.rope_parameters|rope_scaling",
    "vision_config.depth", "vision_config.hidden_size", "vision_config.intermediate_size",
    "vision_config.num_heads", "vision_config.out_hidden_size", "vision_config.patch_size",
    "vision_config.spatial_merge_size", "vision_config.temporal_patch_size",
    "vision_config.num_position_embeddings", "vision_config.deepstack_visual_indexes",
)


def read_config_json(hf_dir: str | Path) -> dict:
    """``hf_dir/config.json`` as a dict, with one-line errors for a missing directory or file, bad
    JSON, or keys the model needs (see REQUIRED_KEYS). Reads JSON only: no model is built."""
    if not hf_dir:
        raise Qwen3VLConfigError("model.hf_dir is empty: set it to a Qwen3-VL HF checkpoint "
                                 "directory (config.json, tokenizer, processor)")
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise Qwen3VLConfigError(f"model directory {hf_dir} does not exist (prism runs offline: "
                                 f"give a local HF checkpoint directory, e.g. from `hf download "
                                 f"Qwen/Qwen3-VL-8B-Instruct --local-dir DIR`, or a tiny test "
                                 f"model from tools/make_tiny_qwen3vl.py --out DIR)")
    if not path.is_file():
        raise Qwen3VLConfigError(f"no config.json in {hf_dir}: pass a Qwen3-VL HF checkpoint dir")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Qwen3VLConfigError(f"{path} is not valid JSON ({e}): restore it from the "
                                 f"original checkpoint") from None
    if not isinstance(data, dict):
        raise Qwen3VLConfigError(f"{path} is not a JSON object")
    if data.get("model_type") not in (None, "qwen3_vl"):
        raise Qwen3VLConfigError(f"{path}: model_type {data.get('model_type')!r} is not supported "
                                 f"here: this model is Qwen3-VL ('qwen3_vl')")
    missing = missing_keys(data)
    if missing:
        raise Qwen3VLConfigError(f"{path} lacks keys the model is built from: "
                                 f"{', '.join(missing)} (a released Qwen3-VL config.json has them)")
    return data


def missing_keys(data: dict) -> list[str]:
    """The REQUIRED_KEYS absent from a config.json dict (``a|b``: either one)."""
    missing = []
    for key in REQUIRED_KEYS:
        section, _, names = key.rpartition(".")
        node = data.get(section, {}) if section else data
        if not isinstance(node, dict) or not any(n in node for n in names.split("|")):
            missing.append(key.replace("|", " or " + (section + "." if section else "")))
    return missing


def load_hf_config(source: Any):
    """A ``Qwen3VLConfig`` from a checkpoint directory (or an object that has one in ``hf_dir``),
    or ``source`` itself when it already is a config."""
    if hasattr(source, "text_config") and hasattr(source, "vision_config"):
        config = source
    else:
        path = getattr(source, "hf_dir", source)
        read_config_json(path)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path))
    if getattr(config, "model_type", None) != "qwen3_vl":
        raise Qwen3VLConfigError(f"model_type {getattr(config, 'model_type', None)!r} is not "
                                 f"supported here: this model is Qwen3-VL ('qwen3_vl')")
    return config


def tie_word_embeddings(hf) -> bool:
    """Read from the TOP-level config: text_config's default differs from the released models'."""
    return bool(hf.tie_word_embeddings)


def text_head_dim(hf) -> int:
    text = hf.text_config
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def rope_theta(hf) -> float:
    return float((hf.text_config.rope_parameters or {}).get("rope_theta", 10000.0))


def mrope_section(hf) -> list[int]:
    rope = hf.text_config.rope_parameters or {}
    return list(rope.get("mrope_section") or [24, 20, 20])  # transformers' default


def pipeline_split(num_layers: int, pp: int, pp_layers: list[int] | None = None) -> list[int]:
    """Decoder layers per pipeline stage: the converter's rule (one implementation), raised as
    this module's error."""
    try:
        return stage_layer_counts(num_layers, pp, pp_layers)
    except ConversionError as exc:
        raise Qwen3VLConfigError(str(exc)) from None


def _uneven_split_fields(counts: list[int]) -> dict:
    """Megatron expresses uneven splits as first/last stage sizes with equal middle stages."""
    if len(set(counts)) == 1:
        return {}
    middle = counts[1:-1]
    if len(set(middle)) > 1:
        raise Qwen3VLConfigError(f"pipeline split {counts}: megatron-core needs the middle stages "
                                 f"to hold equal layer counts (only the first and last may differ)")
    fields = {}
    if len(counts) == 2 or counts[0] != (middle[0] if middle else None):
        fields["num_layers_in_first_pipeline_stage"] = counts[0]
    if len(counts) == 2 or counts[-1] != (middle[0] if middle else None):
        fields["num_layers_in_last_pipeline_stage"] = counts[-1]
    return fields


# ------------------------------------------------------------------------------ megatron configs

def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise Qwen3VLConfigError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _common(*, tp: int, spec: str, dtype, recompute: bool | str, init_std: float) -> dict:
    """Fields shared by both towers: precision, CPU-safe (unfused) kernels, recompute."""
    from megatron.core.transformer.enums import AttnBackend

    if spec not in SPECS:
        raise Qwen3VLConfigError(f"spec {spec!r}: choose one of {SPECS}")
    params_dtype = _dtype(dtype)
    common = dict(
        tensor_model_parallel_size=tp, params_dtype=params_dtype, pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16, use_cpu_initialization=not torch.cuda.is_available(),
        init_method_std=init_std, hidden_dropout=0.0, attention_dropout=0.0,
        # torch fallbacks: the fused kernels need CUDA (and some of them TE).
        masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        attention_backend=AttnBackend.local if spec == "local" else AttnBackend.auto,
    )
    granularity = recompute_granularity(recompute)
    if granularity == "full":
        common.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
    elif granularity == "selective":   # megatron's default module: core_attn
        common.update(recompute_granularity="selective")
    return common


RECOMPUTE = ("full", "selective")


def recompute_granularity(recompute: bool | str | None) -> str | None:
    """``True`` (the config's ``model.recompute``) means full; a string names the granularity."""
    if not recompute:
        return None
    if recompute is True:
        return "full"
    if recompute not in RECOMPUTE:
        raise Qwen3VLConfigError(f"recompute={recompute!r}: choose one of {RECOMPUTE}")
    return recompute


def _check_heads(label: str, heads: int, groups: int, tp: int) -> None:
    if heads % tp or groups % tp and tp % groups:
        raise Qwen3VLConfigError(f"tp={tp} does not divide the {label} attention heads "
                                 f"({heads} heads, {groups} key/value heads)")


def text_transformer_config(hf, *, tp: int = 1, pp: int = 1, pp_layers: list[int] | None = None,
                            spec: str = "local", dtype="fp32", fp8: str | None = None,
                            fp8_recipe: str = "delayed", recompute: bool = False, **overrides):
    """The text decoder: Qwen3 blocks (RMSNorm, QK-norm, GQA, SwiGLU, no bias)."""
    from megatron.core.transformer import TransformerConfig

    text = hf.text_config
    if text.hidden_act != "silu" or getattr(text, "attention_bias", False):
        raise Qwen3VLConfigError("only Qwen3's bias-free SwiGLU (hidden_act='silu', "
                                 "attention_bias=False) text blocks are supported")
    rope_type = (text.rope_parameters or {}).get("rope_type", "default")
    if rope_type != "default":
        raise Qwen3VLConfigError(f"rope_type {rope_type!r} is not supported (only 'default' M-RoPE)")
    _check_heads("text", text.num_attention_heads, text.num_key_value_heads, tp)
    fp8_fields = {}
    if fp8 is not None:
        if fp8 not in FP8_FORMATS or fp8_recipe not in FP8_RECIPES:
            raise Qwen3VLConfigError(f"fp8={fp8!r}/fp8_recipe={fp8_recipe!r}: formats "
                                     f"{FP8_FORMATS}, recipes {FP8_RECIPES}")
        if spec != "transformer_engine":
            raise Qwen3VLConfigError("FP8 runs on Transformer Engine layers: use "
                                     "spec='transformer_engine' (pip install -r requirements-gpu.txt)")
        fp8_fields = dict(fp8=fp8, fp8_recipe=fp8_recipe)
    counts = pipeline_split(text.num_hidden_layers, pp, pp_layers)
    fields = dict(
        num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
        ffn_hidden_size=text.intermediate_size, num_attention_heads=text.num_attention_heads,
        num_query_groups=text.num_key_value_heads, kv_channels=text_head_dim(hf),
        normalization="RMSNorm", layernorm_epsilon=text.rms_norm_eps, qk_layernorm=True,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        mrope_section=mrope_section(hf), pipeline_model_parallel_size=pp,
        **_uneven_split_fields(counts), **fp8_fields,
        **_common(tp=tp, spec=spec, dtype=dtype, recompute=recompute,
                  init_std=text.initializer_range),
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def vision_transformer_config(hf, *, tp: int = 1, spec: str = "local", dtype="fp32",
                              recompute: bool = False, **overrides):
    """The vision tower: pre-norm ViT blocks (LayerNorm with bias, GELU-tanh MLP, biased linears)
    with full multi-head attention. It is never pipelined: it runs on the first stage."""
    from megatron.core.transformer import TransformerConfig

    vision = hf.vision_config
    if vision.hidden_act not in ACTIVATIONS:
        raise Qwen3VLConfigError(f"vision hidden_act {vision.hidden_act!r}: supported "
                                 f"{sorted(ACTIVATIONS)}")
    _check_heads("vision", vision.num_heads, vision.num_heads, tp)
    fields = dict(
        num_layers=vision.depth, hidden_size=vision.hidden_size,
        ffn_hidden_size=vision.intermediate_size, num_attention_heads=vision.num_heads,
        num_query_groups=vision.num_heads, kv_channels=vision.hidden_size // vision.num_heads,
        normalization="LayerNorm", layernorm_epsilon=1e-6, gated_linear_unit=False,
        activation_func=ACTIVATIONS[vision.hidden_act], add_bias_linear=True, add_qkv_bias=True,
        pipeline_model_parallel_size=1,
        **_common(tp=tp, spec=spec, dtype=dtype, recompute=recompute,
                  init_std=vision.initializer_range),
    )
    fields.update(overrides)
    return TransformerConfig(**fields)
