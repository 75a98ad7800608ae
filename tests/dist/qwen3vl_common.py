"""Shared by the Qwen3-VL model tests and their torchrun workers.

A test-only HF -> Megatron weight mapping, written independently of prism_megatron.convert so the
model tests check the model (and the parameter-name contract) on their own; inputs with zero, one
and two images; and parity helpers against transformers' Qwen3VLForConditionalGeneration.
"""

from __future__ import annotations

import re

import torch

# --------------------------------------------------------------------------- weights

_RENAMES = [  # (HF regex, Megatron template); layer indices are global
    (r"model\.visual\.patch_embed\.proj\.(\w+)", "vision_model.patch_embed.proj.{0}"),
    (r"model\.visual\.pos_embed\.weight", "vision_model.pos_embed.weight"),
    (r"model\.visual\.blocks\.(\d+)\.norm1\.(\w+)", "vision_model.decoder.layers.{0}.input_layernorm.{1}"),
    (r"model\.visual\.blocks\.(\d+)\.norm2\.(\w+)", "vision_model.decoder.layers.{0}.pre_mlp_layernorm.{1}"),
    (r"model\.visual\.blocks\.(\d+)\.attn\.qkv\.(\w+)", "vision_model.decoder.layers.{0}.self_attention.linear_qkv.{1}"),
    (r"model\.visual\.blocks\.(\d+)\.attn\.proj\.(\w+)", "vision_model.decoder.layers.{0}.self_attention.linear_proj.{1}"),
    (r"model\.visual\.blocks\.(\d+)\.mlp\.(linear_fc\d)\.(\w+)", "vision_model.decoder.layers.{0}.mlp.{1}.{2}"),
    (r"model\.visual\.merger\.(\w+)\.(\w+)", "vision_model.merger.{0}.{1}"),
    (r"model\.visual\.deepstack_merger_list\.(\d+)\.(\w+)\.(\w+)", "vision_model.deepstack_mergers.{0}.{1}.{2}"),
    (r"model\.language_model\.embed_tokens\.weight", "language_model.embedding.word_embeddings.weight"),
    (r"model\.language_model\.norm\.weight", "language_model.decoder.final_layernorm.weight"),
    (r"model\.language_model\.layers\.(\d+)\.input_layernorm\.weight", "language_model.decoder.layers.{0}.input_layernorm.weight"),
    (r"model\.language_model\.layers\.(\d+)\.post_attention_layernorm\.weight", "language_model.decoder.layers.{0}.pre_mlp_layernorm.weight"),
    (r"model\.language_model\.layers\.(\d+)\.self_attn\.q_norm\.weight", "language_model.decoder.layers.{0}.self_attention.q_layernorm.weight"),
    (r"model\.language_model\.layers\.(\d+)\.self_attn\.k_norm\.weight", "language_model.decoder.layers.{0}.self_attention.k_layernorm.weight"),
    (r"model\.language_model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "language_model.decoder.layers.{0}.self_attention.linear_proj.weight"),
    (r"model\.language_model\.layers\.(\d+)\.mlp\.down_proj\.weight", "language_model.decoder.layers.{0}.mlp.linear_fc2.weight"),
    (r"lm_head\.weight", "language_model.output_layer.weight"),
]


def hf_to_megatron(hf_sd: dict, hf_config) -> dict:
    """Full (TP=1) Megatron tensors with global layer indices; QKV in megatron's per-group
    [q heads..., k, v] layout, SwiGLU fc1 as [gate; up] (split per TP shard later)."""
    text, vision = hf_config.text_config, hf_config.vision_config
    out, fused = {}, {}
    for name, t in hf_sd.items():
        if name == "lm_head.weight" and hf_config.tie_word_embeddings:
            continue  # tied: megatron uses the embedding
        for pattern, template in _RENAMES:
            m = re.fullmatch(pattern, name)
            if m:
                out[template.format(*m.groups())] = t
                break
        else:
            fused[name] = t
    head_dim = text.head_dim
    groups, heads = text.num_key_value_heads, text.num_attention_heads
    for i in range(text.num_hidden_layers):
        p = f"model.language_model.layers.{i}."
        q = fused.pop(p + "self_attn.q_proj.weight").view(groups, heads // groups * head_dim, -1)
        k = fused.pop(p + "self_attn.k_proj.weight").view(groups, head_dim, -1)
        v = fused.pop(p + "self_attn.v_proj.weight").view(groups, head_dim, -1)
        out[f"language_model.decoder.layers.{i}.self_attention.linear_qkv.weight"] = (
            torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1]))
        out[f"language_model.decoder.layers.{i}.mlp.linear_fc1.weight"] = (
            fused.pop(p + "mlp.gate_proj.weight"), fused.pop(p + "mlp.up_proj.weight"))
    assert not fused, f"unmapped HF tensors: {sorted(fused)}"
    vheads = vision.num_heads
    for i in range(vision.depth):
        for kind in ("weight", "bias"):
            key = f"vision_model.decoder.layers.{i}.self_attention.linear_qkv.{kind}"
            t = out[key]  # HF rows: [q | k | v], each (heads, head_dim)
            out[key] = t.view(3, vheads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    return out


def _column(name: str) -> bool:
    return bool(re.search(r"(linear_qkv|linear_fc1)\.(weight|bias)$|word_embeddings|output_layer",
                          name))


def _row(name: str) -> bool:
    return bool(re.search(r"(linear_proj|linear_fc2)\.weight$", name))


def shard_for_rank(full: dict, *, tp: int, tp_rank: int, layer_offset: int, num_local_layers: int,
                   pre_process: bool, post_process: bool, padded_vocab: int, tied: bool) -> dict:
    """This rank's state_dict (stage-local layer numbers, TP shards, padded vocab)."""
    local = {}
    for name, t in full.items():
        m = re.match(r"language_model\.decoder\.layers\.(\d+)\.(.*)", name)
        if m:
            i = int(m.group(1)) - layer_offset
            if not 0 <= i < num_local_layers:
                continue
            name = f"language_model.decoder.layers.{i}.{m.group(2)}"
        elif name.startswith("vision_model.") or "word_embeddings" in name:
            if not pre_process:
                continue
        elif not post_process:  # final norm, output layer
            continue
        if isinstance(t, tuple):  # SwiGLU [gate; up]: split each, then fuse per shard
            t = torch.cat([x.chunk(tp)[tp_rank] for x in t])
        elif "word_embeddings" in name or "output_layer" in name:
            t = torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], t.shape[1])]).chunk(tp)[tp_rank]
        elif _column(name):
            t = t.chunk(tp)[tp_rank]
        elif _row(name):
            t = t.chunk(tp, dim=1)[tp_rank]
        local[name] = t
    if tied and post_process and not pre_process:  # megatron's last-stage copy of the embedding
        emb = full["language_model.embedding.word_embeddings.weight"]
        emb = torch.cat([emb, emb.new_zeros(padded_vocab - emb.shape[0], emb.shape[1])])
        local["language_model.output_layer.weight"] = emb.chunk(tp)[tp_rank]
    return local


def stage_layout(model) -> tuple[int, int]:
    """(global index of this stage's first decoder layer, its number of layers)."""
    layers = model.language_model.decoder.layers
    return (layers[0].layer_number - 1 if len(layers) else 0), len(layers)


def load_hf_weights(model, hf_model) -> dict:
    """Load ``hf_model``'s weights into this rank's Megatron stage (strict, names checked)."""
    from megatron.core import parallel_state as ps

    full = hf_to_megatron(hf_model.state_dict(), hf_model.config)
    offset, count = stage_layout(model)
    local = shard_for_rank(
        full, tp=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
        layer_offset=offset, num_local_layers=count, pre_process=model.pre_process,
        post_process=model.post_process, padded_vocab=model.padded_vocab_size,
        tied=bool(hf_model.config.tie_word_embeddings))
    expected = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    missing, unexpected = expected - set(local), set(local) - expected
    assert not missing and not unexpected, f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
    for k, v in model.state_dict().items():
        if k.endswith("_extra_state"):
            local[k] = v
    model.load_state_dict(local, strict=True)
    return full


# --------------------------------------------------------------------------- inputs

GRIDS = {"one": [[(1, 4, 4)]], "two": [[(1, 4, 4), (1, 6, 4)], [(1, 4, 6)]],
         "none": [[], []]}


def make_inputs(hf_config, case: str, seq_len: int = 40, seed: int = 0) -> dict:
    """Rows of random text with the case's images (vision_start, image pads, vision_end)."""
    gen = torch.Generator().manual_seed(seed)
    merge = hf_config.vision_config.spatial_merge_size
    vc = hf_config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    special = min(hf_config.image_token_id, hf_config.vision_start_token_id,
                  hf_config.vision_end_token_id, hf_config.video_token_id)
    rows, grids = [], []
    for row_grids in GRIDS[case]:
        ids = []
        for grid in row_grids:
            ids += torch.randint(3, special, (3,), generator=gen).tolist()
            ids += [hf_config.vision_start_token_id]
            ids += [hf_config.image_token_id] * (grid[0] * grid[1] * grid[2] // merge ** 2)
            ids += [hf_config.vision_end_token_id]
            grids.append(grid)
        ids += torch.randint(3, special, (seq_len - len(ids),), generator=gen).tolist()
        rows.append(ids)
    inputs = {"input_ids": torch.tensor(rows)}
    if grids:
        thw = torch.tensor(grids)
        inputs["image_grid_thw"] = thw
        inputs["pixel_values"] = torch.randn(int(thw.prod(-1).sum()), patch_dim, generator=gen)
    return inputs


def hf_forward(hf_model, inputs: dict, labels=None):
    """transformers' output for ``inputs`` (mm_token_type_ids as its processor would give)."""
    kwargs = dict(inputs)
    if "image_grid_thw" in kwargs:
        kwargs["mm_token_type_ids"] = (inputs["input_ids"] == hf_model.config.image_token_id).int()
    return hf_model(**kwargs, labels=labels)


def next_token_labels(input_ids):
    """Megatron convention: labels[t] = input_ids[t + 1]; the last position has no target."""
    labels = torch.roll(input_ids, -1, dims=1)
    mask = torch.ones_like(input_ids, dtype=torch.float)
    mask[:, -1] = 0
    return labels, mask


def load_hf_model(hf_dir):
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                            attn_implementation="eager")
    return model.eval()
