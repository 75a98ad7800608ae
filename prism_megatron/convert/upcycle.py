"""Sparse upcycling: a dense Qwen3-VL -> the MoE discriminator (spec §3.1, §3.2).

* everything that is not a text MLP (vision tower, embeddings, attention, norms) is copied;
* every expert of every text layer = the dense MLP + i.i.d. N(0, noise_std) noise, drawn
  independently per (layer, expert, tensor) from a generator seeded by (seed, name), so the result
  does not depend on the layout it is built at;
* routers are fresh N(0, 0.02) (``router_std``; 0 gives a uniform router), the value head
  N(0, 0.02); the LM head is dropped.

The model is built in one process at TP=1/PP=1/EP=1 (like the torch_dist converter) and saved
with megatron's dist_checkpointing, which reshards on load: the checkpoint loads at any EP/DP/PP.
Output directory (the converter's conventions, so ``weights.load`` and ``read_info`` find it):
    OUT/release/                              torch_dist checkpoint
    OUT/latest_checkpointed_iteration.txt     "release"
    OUT/hf_config/                            the dense model's config.json (+ generation config)
    OUT/prism_discriminator.json              experts, top-k, noise, seed, source
    OUT/hf/                                   optional HF-style export (Qwen3VLMoe names + v_head)
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import torch

from prism_megatron.convert.discriminator_export import export_hf as write_hf
from prism_megatron.convert.fsutil import atomic_output_dir, check_output
from prism_megatron.convert.hf_to_megatron import open_hf_source
from prism_megatron.convert.torch_dist import (
    _hf_dtype, ensure_process_group, fill_model_from_hf, release_process_group, save_torch_dist)
from prism_megatron.models.discriminator.model import (
    INFO_FILE, Qwen3VLDiscriminator, build_discriminator_from_config, check_moe_layout)
from prism_megatron.weights import ckpt_layout as lay
from prism_megatron.weights.layout import padded_vocab_size

ROUTER_STD = 0.02
VALUE_HEAD_STD = 0.02
_EXPERT = ".mlp.experts.local_experts."


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))


def _normal_like(t: torch.Tensor, std: float, seed: int, name: str) -> torch.Tensor:
    if std == 0:
        return torch.zeros_like(t)
    noise = torch.randn(t.shape, generator=_generator(seed, name), dtype=torch.float32) * std
    return noise.to(t.dtype)


def dense_source_name(name: str) -> str | None:
    """Discriminator parameter -> the dense parameter it is upcycled from (None: fresh)."""
    if _EXPERT in name:
        head, tail = name.split(_EXPERT)
        return f"{head}.mlp.{tail.split('.', 1)[1]}"  # drop the expert index
    if name.endswith(".mlp.router.weight") or name.startswith("v_head."):
        return None
    return name


@torch.no_grad()
def upcycle_weights(dense: torch.nn.Module, disc: Qwen3VLDiscriminator, *, noise_std: float,
                    seed: int, router_std: float = ROUTER_STD) -> dict[str, int]:
    """Fill ``disc`` (TP=1/PP=1/EP=1) from ``dense``; returns counts for the report. Every dense
    tensor must be used except the LM head (there is none when embeddings are tied)."""
    source = {k: v for k, v in dense.state_dict().items() if not k.endswith("_extra_state")}
    used, counts = set(), {"copied": 0, "experts": 0, "fresh": 0}
    for name, target in disc.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        origin = dense_source_name(name)
        if origin is None:
            std = router_std if name.endswith("router.weight") else VALUE_HEAD_STD
            target.data.copy_(_normal_like(target, std, seed, name))
            counts["fresh"] += 1
            continue
        if origin not in source:
            raise KeyError(f"{name}: the dense model has no {origin}")
        weight = source[origin]
        if tuple(weight.shape) != tuple(target.shape):
            raise ValueError(f"{name}: shape {tuple(target.shape)}, dense {origin} is "
                             f"{tuple(weight.shape)}")
        if _EXPERT in name:
            target.data.copy_(weight + _normal_like(weight, noise_std, seed, name))
            counts["experts"] += 1
        else:
            target.data.copy_(weight)
            counts["copied"] += 1
        used.add(origin)
    unused = [k for k in source
              if k not in used and not k.startswith("language_model.output_layer")]
    if unused:
        raise KeyError(f"dense tensors with no place in the discriminator: {unused[:8]}")
    return counts


def build_dense_from_hf(hf_dir: str | Path, progress: bool = False):
    """(HF source, dims, dense Megatron Qwen3-VL filled from the HF weights) at TP=1/PP=1."""
    src = open_hf_source(hf_dir)
    dims = src.info.dims(padded_vocab_size(src.info.vocab_size, 1))
    dense = src.family.build_megatron_model(src.config, dims.padded_vocab_size, _hf_dtype(src))
    fill_model_from_hf(dense, src, dims, progress)
    return src, dims, dense


def upcycle(hf_dir: str | Path, out: str | Path, *, num_experts: int = 4, top_k: int = 2,
            noise_std: float = 0.01, seed: int = 0, router_std: float = ROUTER_STD,
            tp: int = 1, pp: int = 1, ep: int = 1, export_hf: bool = False, force: bool = False,
            progress: bool = True, log=print) -> dict:
    """Dense HF Qwen3-VL at ``hf_dir`` -> discriminator checkpoint at ``out``; returns the info
    written to ``OUT/prism_discriminator.json``. ``tp/pp/ep`` name the layout it will be trained
    at: checked here (the checkpoint itself is layout-free)."""
    import torch.distributed as dist

    check_output(out, force)
    check_moe_layout(num_experts, top_k, "learned", tp=tp, ep=ep)
    if noise_std < 0 or router_std < 0:
        raise ValueError("noise and router standard deviations must be >= 0")
    created = ensure_process_group()
    try:
        if dist.get_world_size() != 1:
            raise ValueError("upcycling runs in one process: the checkpoint is reshardable, so "
                             "there is no need for torchrun (--tp/--pp/--ep only check the layout)")
        log(f"[upcycle] reading dense Qwen3-VL from {hf_dir}")
        src, dims, dense = build_dense_from_hf(hf_dir, progress)
        if src.info.num_layers % pp:
            log(f"[upcycle] note: {src.info.num_layers} layers need parallel.pp_layers at pp={pp}")
        dtype = next(dense.parameters()).dtype
        log(f"[upcycle] building the {num_experts}-expert top-{top_k} discriminator ({dtype})")
        disc, _ = build_discriminator_from_config(
            src.config, num_experts=num_experts, top_k=top_k, dtype=dtype,
            padded_vocab_size=dims.padded_vocab_size)
        counts = upcycle_weights(dense, disc, noise_std=noise_std, seed=seed, router_std=router_std)
        del dense
        log(f"[upcycle] {counts['copied']} tensors copied, {counts['experts']} expert tensors "
            f"(dense + N(0, {noise_std}^2)), {counts['fresh']} fresh (routers, value head)")
        info = {"num_experts": num_experts, "top_k": top_k, "noise_std": noise_std,
                "router_std": router_std, "value_head_std": VALUE_HEAD_STD, "seed": seed,
                "moe_ffn_hidden_size": src.config.text_config.intermediate_size,
                "padded_vocab_size": dims.padded_vocab_size,
                "dtype": str(dtype).replace("torch.", ""),
                "target_layout": {"tp": tp, "pp": pp, "ep": ep},
                "segment_routing_possible": num_experts % 2 == 0 and top_k <= num_experts // 2,
                "source": str(Path(hf_dir).resolve()), "tensors": counts}
        with atomic_output_dir(out, force) as tmp:
            ckpt = tmp / lay.iteration_dir_name(0, True)
            ckpt.mkdir()
            log("[upcycle] saving torch_dist checkpoint")
            save_torch_dist(disc, ckpt)
            lay.write_tracker(tmp, 0, True)
            copy_hf_config(hf_dir, tmp)
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
            if export_hf:
                log("[upcycle] exporting HF-style safetensors")
                write_hf(disc, tmp / "hf")
        log(f"[upcycle] wrote {out}")
        return info
    finally:
        release_process_group(created)


def copy_hf_config(hf_dir: str | Path, root: Path) -> None:
    """The dense config (the discriminator is rebuilt from it + prism_discriminator.json)."""

    (root / lay.HF_CONFIG_DIR).mkdir(exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if (Path(hf_dir) / name).is_file():
            shutil.copy2(Path(hf_dir) / name, root / lay.HF_CONFIG_DIR / name)
