"""Trainer -> rollout engine weight sync: seconds and GB/s per sync, per mode, shape and PP size.

    python benchmarks/weight_sync.py [--shapes tiny,100m] [--modes local,http,disk,distributed]
                                     [--pp 1,2] [--bucket-mb 512] [--repeats 2]

A stand-in Megatron model (the HF weights through the conversion mapping,
tests/dist/rollout_common.py; at PP2 each rank holds its own stage's parameters only, under
torchrun with gloo) is synced with ``sync_weights`` into

* ``local``: the CPU engine in the sender's process (``update_weights`` per bucket);
* ``http``: the CPU server (``python -m prism_megatron.rollout.serve``) through ``SGLangEngine``
  (``tensor`` mode: base64 safetensors per bucket over HTTP, inside one weight-update session);
* ``disk``: safetensors shards in a directory + ``update_weights_from_disk`` on the CPU engine;
* ``distributed``: the CPU server joins a gloo weight-update group with every PP stage's sender
  (``/init_weights_update_group`` once), each bucket broadcast flattened
  (``/update_weights_from_distributed``), as SGLang over NCCL.

Shapes: ``tiny`` (the tiny preset) and ``100m`` (a random Qwen3-VL text tower of ~100M
parameters: hidden 768, 16 layers, GQA 12/4, plus a small vision tower). Printed per row: the
model's HF bytes, seconds per sync (best of ``--repeats``; at PP2 the slowest rank's), GB/s
(model bytes / seconds), and the bytes sent by the busiest rank as a fraction of the model: the
tensor, http and disk paths funnel every stage through one rank (1.00 at any PP), the
distributed path sends each stage from its own rank (target 1/PP; the vision tower and the
embeddings sit on the first stage, so it is above 1/PP on small models).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def make_model(shape: str, out: Path) -> Path:
    from dataclasses import replace

    from prism_megatron.testing import tiny

    if (out / "config.json").is_file():
        return out
    if shape == "tiny":
        return tiny.write_tiny_model(out, "tiny", seed=0, log=lambda *_: None)
    base = tiny.get_preset("tiny-mrope")
    preset = replace(base, name="bench-100m", hidden_size=768, intermediate_size=2048,
                     num_layers=16, num_heads=12, num_kv_heads=4, head_dim=64,
                     mrope_section=(16, 8, 8), deepstack_visual_indexes=(0, 1),
                     vision_depth=2, vision_hidden_size=256, vision_intermediate_size=512,
                     vision_heads=4)
    preset.validate()
    tokenizer = tiny.build_tokenizer(preset)
    processor = tiny.build_processor(tokenizer)
    config = tiny.build_config(preset, tokenizer)
    model = tiny.build_model(config, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tiny.save_processor(processor, out)
    return out


def hf_bytes(hf_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                t = h.get_slice(name)
                numel = 1
                for d in t.get_shape():
                    numel *= d
                total += numel * {"F32": 4, "BF16": 2, "F16": 2}[t.get_dtype()]
    return total


def make_engine(mode: str, hf_dir: Path, logs: Path):
    from prism_megatron.rollout.local import LocalEngine
    from prism_megatron.rollout.sglang import SGLangEngine

    if mode in ("http", "distributed"):
        return SGLangEngine(model_path=hf_dir, server="prism", request_timeout_s=600,
                            extra_server_args=["--num-threads", "1"], log_dir=logs)
    return LocalEngine(hf_dir)


def run_sync(trainer, engine, config, mode, hf_dir, tmp: Path, bucket_mb, repeats):
    """(best seconds, stats of this rank) over ``repeats`` syncs (the first one connects)."""
    from prism_megatron.rollout.weight_sync import sync_weights

    import torch.distributed as dist

    kind = {"local": "tensor", "http": "tensor"}.get(mode, mode)
    best, stats = None, None
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()   # every rank starts together (rank 0 launched the server first)
        t0 = time.perf_counter()
        stats = sync_weights(trainer, engine, config, bucket_mb=bucket_mb, mode=kind,
                             disk_dir=tmp / "sync" if kind == "disk" else None, hf_dir=hf_dir)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best, stats


def worker(args) -> int:
    """One rank of a PP run (torchrun): its stage's stand-in model; rank 0 prints the rows."""
    import torch.distributed as dist

    from rollout_common import fake_megatron_model

    from prism_megatron.distributed import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    pp = int(os.environ["WORLD_SIZE"])
    init_distributed(pp=pp)
    rank = dist.get_rank()
    hf_dir = Path(args.hf_dir)
    trainer, config = fake_megatron_model(hf_dir, stage=rank, pp=pp)
    engine = make_engine(args.worker, hf_dir, Path(args.tmp) / "logs") if rank == 0 else None
    try:
        seconds, stats = run_sync(trainer, engine, config, args.worker, hf_dir, Path(args.tmp),
                                  args.bucket_mb, args.repeats)
    finally:
        if engine is not None:
            engine.shutdown()
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, {"seconds": seconds, "bytes": stats.bytes if stats else 0,
                                  "buckets": stats.buckets if stats else 0})
    if rank == 0:
        print("RESULT " + json.dumps(rows), flush=True)
    destroy_distributed()
    return 0


def run_pp(shape, mode, hf_dir, pp, args, tmp: Path) -> dict:
    from dist_utils import torchrun_command

    cmd, env = torchrun_command(pp, [str(Path(__file__).resolve()), "--worker", mode,
                                     "--hf-dir", str(hf_dir), "--tmp", str(tmp),
                                     "--bucket-mb", str(args.bucket_mb),
                                     "--repeats", str(args.repeats)])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{shape} {mode} PP{pp} failed:\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    ranks = json.loads(lines[-1][len("RESULT "):])
    return {"seconds": max(r["seconds"] for r in ranks), "bytes": [r["bytes"] for r in ranks],
            "buckets": sum(r["buckets"] for r in ranks)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,100m")
    parser.add_argument("--modes", default="local,http,disk,distributed")
    parser.add_argument("--pp", default="1,2", help="pipeline sizes (PP > 1 runs under torchrun)")
    parser.add_argument("--bucket-mb", type=float, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    torch.set_num_threads(1)

    from rollout_common import fake_megatron_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-weight-sync-") as tmp:
        tmp = Path(tmp)
        for shape in args.shapes.split(","):
            hf_dir = make_model(shape, tmp / shape)
            nbytes = hf_bytes(hf_dir)
            for pp in map(int, args.pp.split(",")):
                for mode in args.modes.split(","):
                    if pp == 1:
                        trainer, config = fake_megatron_model(hf_dir)
                        engine = make_engine(mode, hf_dir, tmp / "logs")
                        try:
                            seconds, stats = run_sync(trainer, engine, config, mode, hf_dir, tmp,
                                                      args.bucket_mb, args.repeats)
                        finally:
                            engine.shutdown()
                        sent, buckets = [stats.bytes], stats.buckets
                    else:
                        r = run_pp(shape, mode, hf_dir, pp, args, tmp)
                        seconds, sent, buckets = r["seconds"], r["bytes"], r["buckets"]
                    rows.append((shape, pp, mode, nbytes, seconds, nbytes / seconds / 1e9,
                                 max(sent) / nbytes, buckets))
    print(f"{'shape':6} {'PP':>2} {'mode':11} {'model MB':>9} {'s/sync':>8} {'GB/s':>7} "
          f"{'busiest/model':>13} {'buckets':>7}")
    for shape, pp, mode, nbytes, seconds, gbps, frac, buckets in rows:
        print(f"{shape:6} {pp:2d} {mode:11} {nbytes / 1e6:9.1f} {seconds:8.3f} {gbps:7.3f} "
              f"{frac:13.2f} {buckets:7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
