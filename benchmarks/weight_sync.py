"""Trainer -> rollout engine weight sync: seconds and GB/s per sync, per mode and model shape.

    python benchmarks/weight_sync.py [--shapes tiny,100m] [--modes local,http,disk]
                                     [--bucket-mb 512] [--repeats 2]

Single process (TP=1, PP=1): a stand-in Megatron model (the HF weights through the conversion
mapping, tests/dist/rollout_common.py) is synced with ``sync_weights`` into

* ``local``: the CPU engine in this process (``update_weights`` per bucket: gather + copy only);
* ``http``: the CPU server (``python -m prism_megatron.rollout.serve``) through ``SGLangEngine``
  (base64 safetensors per bucket over HTTP, inside one weight-update session);
* ``disk``: safetensors shards in a directory + ``update_weights_from_disk`` on the CPU engine.

Shapes: ``tiny`` (the tiny preset) and ``100m`` (a random Qwen3-VL text tower of ~100M
parameters: hidden 768, 16 layers, GQA 12/4, plus a small vision tower). Reported per sync: the
model's bytes, seconds (best of ``--repeats``), GB/s, and the bytes sent by the busiest rank as
a fraction of the model. In one process that rank holds the whole model (1.00); at PP>1 each
stage's rank sends its own layers only when the distributed path does the sending (the target
is 1/PP), while the tensor and disk paths funnel everything through the first stage's rank.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "dist"))


def make_model(shape: str, out: Path) -> Path:
    from dataclasses import replace

    from prism_megatron.models.qwen3_vl import tiny

    if shape == "tiny":
        return tiny.write_tiny_model(out, "tiny", seed=0)
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


def model_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def time_sync(label, fn, repeats):
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        stats = fn()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best, stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,100m")
    parser.add_argument("--modes", default="local,http,disk")
    parser.add_argument("--bucket-mb", type=float, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from rollout_common import fake_megatron_model

    from prism_megatron.rollout.local import LocalEngine
    from prism_megatron.rollout.sglang import SGLangEngine
    from prism_megatron.rollout.weight_sync import sync_weights

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-weight-sync-") as tmp:
        tmp = Path(tmp)
        for shape in args.shapes.split(","):
            hf_dir = make_model(shape, tmp / shape)
            trainer, config = fake_megatron_model(hf_dir)
            nbytes = model_bytes(trainer)
            for mode in args.modes.split(","):
                if mode == "http":
                    engine = SGLangEngine(model_path=hf_dir, server="prism", request_timeout_s=600,
                                          extra_server_args=["--num-threads", "1"],
                                          log_dir=tmp / "logs")
                else:
                    engine = LocalEngine(hf_dir)
                try:
                    kind = "disk" if mode == "disk" else "tensor"
                    seconds, stats = time_sync(mode, lambda: sync_weights(
                        trainer, engine, config, bucket_mb=args.bucket_mb, mode=kind,
                        disk_dir=tmp / "sync" if kind == "disk" else None, hf_dir=hf_dir),
                        args.repeats)
                finally:
                    engine.shutdown()
                rows.append((shape, mode, stats.bytes, seconds, stats.bytes / seconds / 1e9,
                             stats.bytes / nbytes, stats.buckets))
    print(f"{'shape':6} {'mode':6} {'MB sent':>9} {'s/sync':>8} {'GB/s':>7} "
          f"{'busiest/model':>13} {'buckets':>7}")
    for shape, mode, sent, seconds, gbps, frac, buckets in rows:
        print(f"{shape:6} {mode:6} {sent / 1e6:9.1f} {seconds:8.3f} {gbps:7.3f} {frac:13.2f} "
              f"{buckets:7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
