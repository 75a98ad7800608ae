#!/usr/bin/env python
"""Conversion throughput vs. plain safetensors read+write, measured side by side in one run.

Builds a random fp32 Qwen3-VL (a few hundred MB: real tensor shapes, random values written
straight to safetensors) in a temporary directory, then times

* baseline: read every tensor of the HF files and write them to new safetensors files
  (the floor any converter pays: the same bytes in and out);
* HF -> Megatron legacy at TP2 (and torch_dist with ``--formats legacy,torch_dist``);
* Megatron -> HF back (checked bit-exact).

and prints MB/s for each and the ratio to the baseline (1.0 = as fast as copying the weights).
Everything runs in process with progress bars off; the page cache is warmed first so every
phase reads from memory. ``--repeat`` rounds each run every phase once; the medians are printed
(each ratio against the same round's baseline, so machine-load drift mostly cancels).

    python benchmarks/convert.py [--size-mb 400] [--tp 2] [--repeat 3] [--formats legacy,torch_dist]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_config(layers: int):
    from transformers import Qwen3VLConfig

    hidden = 1024
    return Qwen3VLConfig(
        text_config=dict(vocab_size=16000, hidden_size=hidden, intermediate_size=3072,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                         head_dim=64,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                          "mrope_section": [12, 10, 10],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=4, hidden_size=512, intermediate_size=2048, num_heads=8,
                           out_hidden_size=hidden, patch_size=16, temporal_patch_size=2,
                           spatial_merge_size=2, num_position_embeddings=256,
                           deepstack_visual_indexes=[1, 3]),
        tie_word_embeddings=False, dtype="float32")


def build_model_dir(out: Path, size_mb: int) -> float:
    """A Qwen3-VL HF directory of roughly ``size_mb`` MB of fp32 weights (real shapes, random
    values, untied, GQA 16/4, DeepStack); returns its size in MB."""
    import torch
    from safetensors.torch import save_file

    from prism_megatron.convert.families import get_family
    from prism_megatron.weights.table import hf_reference_shapes

    family = get_family("qwen3_vl")

    def mb(layers):
        return sum(4 * torch.Size(s).numel() for s in
                   hf_reference_shapes(family, make_config(layers)).values()) / 2**20

    per_layer = (mb(4) - mb(2)) / 2
    layers = max(2, round((size_mb - (mb(2) - 2 * per_layer)) / per_layer))
    layers += layers % 2  # even, so PP2 could split it
    config = make_config(layers)
    out.mkdir(parents=True)
    config.save_pretrained(out)
    gen = torch.Generator().manual_seed(0)
    shard, shard_bytes, n, weight_map = {}, 0, 0, {}

    def flush():
        nonlocal shard, shard_bytes, n
        n += 1
        save_file(shard, str(out / f"part-{n}.safetensors"), metadata={"format": "pt"})
        weight_map.update({k: f"part-{n}.safetensors" for k in shard})
        shard, shard_bytes = {}, 0

    for name, shape in hf_reference_shapes(family, config).items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        shard[name] = torch.randn(shape, generator=gen) * 0.02
        shard_bytes += shard[name].numel() * 4
        if shard_bytes > 200 * 2**20:
            flush()
    if shard:
        flush()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20


def plain_copy(src: Path, dst: Path) -> None:
    """The baseline: every tensor read through safetensors and written back out."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir()
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            tensors = {k: h.get_tensor(k) for k in h.keys()}
        save_file(tensors, str(dst / f.name), metadata={"format": "pt"})
        del tensors


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=400)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--formats", default="legacy", help="comma list: legacy,torch_dist")
    p.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
    args = p.parse_args()

    from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron
    from prism_megatron.convert.megatron_to_hf import convert_megatron_to_hf

    work = Path(args.workdir or tempfile.mkdtemp(prefix="prism-convert-bench-"))
    try:
        hf = work / "hf"
        size = build_model_dir(hf, args.size_mb)
        print(f"model: {size:.0f} MB fp32 in {len(list(hf.glob('*.safetensors')))} files; "
              f"workdir {work}")
        plain_copy(hf, work / "warm")  # warm the page cache for every phase alike
        shutil.rmtree(work / "warm")
        phases = {"safetensors read+write": lambda: plain_copy(hf, fresh(work / "copy"))}
        for fmt in args.formats.split(","):
            mg, back = work / f"mg-{fmt}", work / f"back-{fmt}"
            phases[f"hf->megatron {fmt} tp{args.tp}"] = (
                lambda fmt=fmt, mg=mg: convert_hf_to_megatron(hf, fresh(mg), tp=args.tp, fmt=fmt,
                                                              progress=False))
            phases[f"megatron {fmt} tp{args.tp}->hf"] = (
                lambda mg=mg, back=back: convert_megatron_to_hf(mg, fresh(back), progress=False))
        # Rounds interleave all phases, and each ratio is taken against the baseline of its own
        # round: on a shared machine the load drifts, and adjacent runs see about the same load.
        rounds = []
        for _ in range(args.repeat):
            rounds.append({name: timed(fn) for name, fn in phases.items()})
        for fmt in args.formats.split(","):
            _check_equal(hf, work / f"back-{fmt}")

        base_name = "safetensors read+write"
        print(f"{'phase':34s} {'seconds':>8s} {'MB/s':>8s} {'vs plain':>9s}   (median of "
              f"{args.repeat} rounds)")
        rows = {}
        for name in phases:
            sec = statistics.median(r[name] for r in rounds)
            ratio = statistics.median(r[base_name] / r[name] for r in rounds)
            rows[name] = {"seconds": round(sec, 3), "mb_per_s": round(size / sec, 1),
                          "ratio_vs_plain": round(ratio, 3)}
            print(f"{name:34s} {sec:8.2f} {size / sec:8.0f} {ratio:9.2f}")
        print(json.dumps({"model_mb": round(size, 1), "tp": args.tp, "results": rows}))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _check_equal(a: Path, b: Path) -> None:
    """The round trip is bit-exact (a benchmark of a wrong converter is worthless)."""
    import torch
    from safetensors import safe_open

    def index(d):
        out = {}
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                out.update({k: (f, k) for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    assert set(ia) == set(ib), set(ia) ^ set(ib)
    for k, (fa, _) in ia.items():
        with safe_open(str(fa), "pt") as ha, safe_open(str(ib[k][0]), "pt") as hb:
            assert torch.equal(ha.get_tensor(k), hb.get_tensor(k)), k


if __name__ == "__main__":  # the guard matters: torch_dist saving starts a helper process
    main()
