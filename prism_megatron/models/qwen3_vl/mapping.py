"""Qwen3-VL: HF (transformers 5.x ``Qwen3VLForConditionalGeneration``) <-> Megatron names.

One declarative table; the TP/PP machinery in ``prism_megatron/convert`` does the rest.
Placeholders: ``{layer}`` text decoder layer (split over pipeline stages), ``{vision_layer}``
vision block, ``{deepstack}`` DeepStack merger. The vision tower and the embedding live on the
first pipeline stage, the final norm and output layer on the last.
"""

from __future__ import annotations

from prism_megatron.weights.rules import (
    HeadLayout, column, gated_mlp, qkv, qkv_fused, replicated, row, row_bias, vocab)
from prism_megatron.weights.table import Family, IndexSpec, ModelInfo

V = "model.visual"
T = "model.language_model"
VL = "vision_model.decoder.layers.{vision_layer}"
TL = "language_model.decoder.layers.{layer}"
DS = "vision_model.deepstack_mergers.{deepstack}"
HF_DS = V + ".deepstack_merger_list.{deepstack}"


def _merger(mg: str, hf: str) -> list:
    """Patch merger (main and DeepStack): LayerNorm, then column fc1 -> GELU -> row fc2."""
    return [
        replicated(f"{mg}.norm.weight", f"{hf}.norm.weight"),
        replicated(f"{mg}.norm.bias", f"{hf}.norm.bias"),
        column(f"{mg}.linear_fc1.weight", f"{hf}.linear_fc1.weight"),
        column(f"{mg}.linear_fc1.bias", f"{hf}.linear_fc1.bias"),
        row(f"{mg}.linear_fc2.weight", f"{hf}.linear_fc2.weight"),
        row_bias(f"{mg}.linear_fc2.bias", f"{hf}.linear_fc2.bias"),
    ]


RULES = [
    # ---- vision tower (first pipeline stage) -------------------------------------------------
    replicated("vision_model.patch_embed.proj.weight", f"{V}.patch_embed.proj.weight"),
    replicated("vision_model.patch_embed.proj.bias", f"{V}.patch_embed.proj.bias"),
    replicated("vision_model.pos_embed.weight", f"{V}.pos_embed.weight"),
    replicated(f"{VL}.input_layernorm.weight", V + ".blocks.{vision_layer}.norm1.weight",
               aliases=(f"{VL}.self_attention.linear_qkv.layer_norm_weight",)),
    replicated(f"{VL}.input_layernorm.bias", V + ".blocks.{vision_layer}.norm1.bias",
               aliases=(f"{VL}.self_attention.linear_qkv.layer_norm_bias",)),
    qkv_fused(f"{VL}.self_attention.linear_qkv.weight", V + ".blocks.{vision_layer}.attn.qkv.weight",
              heads="vision"),
    qkv_fused(f"{VL}.self_attention.linear_qkv.bias", V + ".blocks.{vision_layer}.attn.qkv.bias",
              heads="vision"),
    row(f"{VL}.self_attention.linear_proj.weight", V + ".blocks.{vision_layer}.attn.proj.weight"),
    row_bias(f"{VL}.self_attention.linear_proj.bias", V + ".blocks.{vision_layer}.attn.proj.bias"),
    replicated(f"{VL}.pre_mlp_layernorm.weight", V + ".blocks.{vision_layer}.norm2.weight",
               aliases=(f"{VL}.mlp.linear_fc1.layer_norm_weight",)),
    replicated(f"{VL}.pre_mlp_layernorm.bias", V + ".blocks.{vision_layer}.norm2.bias",
               aliases=(f"{VL}.mlp.linear_fc1.layer_norm_bias",)),
    # The vision MLP is not gated: plain column fc1 -> GELU -> row fc2.
    column(f"{VL}.mlp.linear_fc1.weight", V + ".blocks.{vision_layer}.mlp.linear_fc1.weight"),
    column(f"{VL}.mlp.linear_fc1.bias", V + ".blocks.{vision_layer}.mlp.linear_fc1.bias"),
    row(f"{VL}.mlp.linear_fc2.weight", V + ".blocks.{vision_layer}.mlp.linear_fc2.weight"),
    row_bias(f"{VL}.mlp.linear_fc2.bias", V + ".blocks.{vision_layer}.mlp.linear_fc2.bias"),
    *_merger("vision_model.merger", f"{V}.merger"),
    *_merger(DS, HF_DS),
    # ---- text decoder ----------------------------------------------------------------------
    vocab("language_model.embedding.word_embeddings.weight", f"{T}.embed_tokens.weight"),
    replicated(f"{TL}.input_layernorm.weight", T + ".layers.{layer}.input_layernorm.weight",
               aliases=(f"{TL}.self_attention.linear_qkv.layer_norm_weight",)),
    qkv(f"{TL}.self_attention.linear_qkv.weight", T + ".layers.{layer}.self_attn.q_proj.weight",
        T + ".layers.{layer}.self_attn.k_proj.weight", T + ".layers.{layer}.self_attn.v_proj.weight",
        heads="text"),
    replicated(f"{TL}.self_attention.q_layernorm.weight", T + ".layers.{layer}.self_attn.q_norm.weight"),
    replicated(f"{TL}.self_attention.k_layernorm.weight", T + ".layers.{layer}.self_attn.k_norm.weight"),
    row(f"{TL}.self_attention.linear_proj.weight", T + ".layers.{layer}.self_attn.o_proj.weight"),
    replicated(f"{TL}.pre_mlp_layernorm.weight", T + ".layers.{layer}.post_attention_layernorm.weight",
               aliases=(f"{TL}.mlp.linear_fc1.layer_norm_weight",)),
    gated_mlp(f"{TL}.mlp.linear_fc1.weight", T + ".layers.{layer}.mlp.gate_proj.weight",
              T + ".layers.{layer}.mlp.up_proj.weight"),
    row(f"{TL}.mlp.linear_fc2.weight", T + ".layers.{layer}.mlp.down_proj.weight"),
    replicated("language_model.decoder.final_layernorm.weight", f"{T}.norm.weight", stage="last"),
    # Untied: lm_head <-> output_layer. Tied (tie_word_embeddings in the TOP-level config): no
    # lm_head in HF files; megatron keeps a copy of the embedding on the last stage when PP > 1.
    vocab("language_model.output_layer.weight", "lm_head.weight", stage="last", extra_state=True,
          tied_to="language_model.embedding.word_embeddings.weight"),
]


def describe(config) -> ModelInfo:
    """Index counts, attention geometry and vocabulary of a ``Qwen3VLConfig``."""
    text, vision = config.text_config, config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return ModelInfo(
        indices={
            "layer": IndexSpec(text.num_hidden_layers, pipelined=True, stacked=True),
            "vision_layer": IndexSpec(vision.depth, stacked=True),
            "deepstack": IndexSpec(len(vision.deepstack_visual_indexes or [])),
        },
        heads={
            "text": HeadLayout(text.num_attention_heads, text.num_key_value_heads, head_dim),
            "vision": HeadLayout(vision.num_heads, vision.num_heads,
                                 vision.hidden_size // vision.num_heads),
        },
        head_labels={"text": "text_config", "vision": "vision_config"},
        vocab_size=text.vocab_size,
        # Read from the top-level config: text_config's default differs (transformers issue).
        tie_word_embeddings=bool(config.tie_word_embeddings),
    )


def build_megatron_model(hf_config, padded_vocab_size: int, dtype):
    """The Megatron Qwen3-VL stage of this rank (the torch_dist writer's template), in the HF
    weights' dtype and without random init (every weight is overwritten). Imported lazily:
    converting to legacy needs no model code."""
    from prism_megatron.models.qwen3_vl.model import build_qwen3vl_model

    model, _ = build_qwen3vl_model(hf_config, dtype=dtype, padded_vocab_size=padded_vocab_size,
                                   perform_initialization=False)
    return model


FAMILY = Family(model_type="qwen3_vl", rules=RULES, describe=describe,
                hf_model_class="Qwen3VLForConditionalGeneration",
                build_megatron_model=build_megatron_model)
