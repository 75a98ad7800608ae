"""HF-style export of the discriminator, for inspection: transformers' Qwen3-VL-MoE names plus
the value head as ``v_head.1.weight`` (the reference's layout, spec §3.2).

Dense tensors go through the Qwen3-VL mapping table (``models/qwen3_vl/mapping.py``: the one
HF <-> Megatron correspondence); the MoE tensors are stacked the way transformers stores them:
``mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows, then up rows, as megatron's fused fc1),
``mlp.experts.down_proj`` [E, H, I], ``mlp.gate.weight`` [E, H]. No LM head is written.
Runs in one process at TP=1/PP=1/EP=1 (``export_checkpoint`` reshards a trained checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prism_megatron.convert.torch_dist import ensure_process_group, release_process_group
from prism_megatron.models.discriminator.model import (
    Qwen3VLDiscriminator, build_discriminator_from_config, load_discriminator, read_info)
from prism_megatron.models.qwen3_vl.mapping import FAMILY
from prism_megatron.weights.table import expand

TEXT = "model.language_model.layers"
MEGATRON = "language_model.decoder.layers"


def moe_hf_config(hf_config, num_experts: int, top_k: int, aux_loss_coef: float = 0.01):
    """A ``Qwen3VLMoeConfig`` for the upcycled model (spec §3.1: every layer MoE, experts as wide
    as the dense MLP, renormalised top-k, no shared expert)."""
    from transformers import Qwen3VLMoeConfig

    text = hf_config.text_config.to_dict()
    text.update(num_experts=num_experts, num_experts_per_tok=top_k,
                moe_intermediate_size=hf_config.text_config.intermediate_size,
                decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                router_aux_loss_coef=aux_loss_coef)
    for key in ("model_type", "architectures", "transformers_version"):
        text.pop(key, None)
    vision = hf_config.vision_config.to_dict()
    for key in ("model_type", "transformers_version"):
        vision.pop(key, None)
    return Qwen3VLMoeConfig(
        text_config=text, vision_config=vision, image_token_id=hf_config.image_token_id,
        video_token_id=hf_config.video_token_id,
        vision_start_token_id=hf_config.vision_start_token_id,
        vision_end_token_id=hf_config.vision_end_token_id,
        tie_word_embeddings=False, architectures=["Qwen3VLMoeForConditionalGeneration"])


def hf_state_dict(disc: Qwen3VLDiscriminator) -> dict[str, torch.Tensor]:
    """The discriminator (one full TP=1/PP=1/EP=1 stage) as HF-named tensors."""
    from megatron.core import parallel_state as ps


    if ps.get_expert_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() \
            * ps.get_tensor_model_parallel_world_size() != 1:
        raise ValueError("export needs the whole model in one process (TP=PP=EP=1)")
    hf = disc.hf_config
    info = FAMILY.describe(hf)
    dims = info.dims(disc.padded_vocab_size)
    state = {k: v.detach() for k, v in disc.state_dict().items() if not k.endswith("_extra_state")}
    out: dict[str, torch.Tensor] = {}
    for entry in expand(FAMILY.rules, info):
        text_mlp = entry.megatron.startswith(MEGATRON) and ".mlp.linear_fc" in entry.megatron
        if entry.rule.tied_to or text_mlp:
            continue  # LM head dropped; text MLPs are experts now (below)
        for name, tensor in zip(entry.hf, entry.rule.to_hf(state[entry.megatron], dims)):
            out[name] = tensor.contiguous().clone()
    experts = disc.config.num_moe_experts
    for layer in range(disc.config.num_layers):
        mg = f"{MEGATRON}.{layer}.mlp"
        out[f"{TEXT}.{layer}.mlp.gate.weight"] = state[f"{mg}.router.weight"].clone()
        for hf_name, megatron_name in (("gate_up_proj", "linear_fc1"), ("down_proj", "linear_fc2")):
            out[f"{TEXT}.{layer}.mlp.experts.{hf_name}"] = torch.stack(
                [state[f"{mg}.experts.local_experts.{e}.{megatron_name}.weight"]
                 for e in range(experts)])
    out["v_head.1.weight"] = state["v_head.1.weight"].clone()
    return out


def export_hf(disc: Qwen3VLDiscriminator, out_dir: str | Path) -> Path:
    """``config.json`` (Qwen3VLMoeConfig) + ``model.safetensors`` under ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = moe_hf_config(disc.hf_config, disc.config.num_moe_experts, disc.config.moe_router_topk)
    config.save_pretrained(out)
    save_file(hf_state_dict(disc), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "prism_value_head.json").write_text(json.dumps(
        {"value_head": "v_head.1.weight", "layout": "Sequential(Dropout, Linear(H->1, no bias))",
         "score": "value at the segment's closing-tag token"}, indent=2) + "\n")
    return out


def export_checkpoint(megatron_dir: str | Path, out_dir: str | Path) -> Path:
    """Export a discriminator checkpoint (upcycled or trained, any layout) from one process."""
    created = ensure_process_group()
    try:
        hf, info = read_info(megatron_dir)
        disc, _ = build_discriminator_from_config(hf, num_experts=info["num_experts"],
                                                  top_k=info["top_k"],
                                                  padded_vocab_size=info.get("padded_vocab_size"))
        load_discriminator(disc, megatron_dir)
        return export_hf(disc, out_dir)
    finally:
        release_process_group(created)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="Export a discriminator checkpoint (upcycled or warmed, any layout) to "
                    "HF-style safetensors: Qwen3-VL-MoE names + v_head.1.weight.")
    parser.add_argument("--megatron-dir", required=True, help="discriminator checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {export_checkpoint(args.megatron_dir, args.out)}")
    except ValueError as exc:  # ConfigError: not a discriminator checkpoint
        parser.error(str(exc))
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing spawns a helper process
    from prism_megatron.errors import run_cli

    raise SystemExit(run_cli(main))
