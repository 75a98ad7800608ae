"""SFT data loading at scale: time-to-first-batch and peak host memory for a 2k-row and a
100k-row file (they should not grow with the rows), and encoding throughput with 1 vs 2
DataLoader workers.

    python benchmarks/data_loading.py [--small 2000] [--large 100000] [--encode-steps 16]

Generates sharegpt JSONL files whose rows reference a handful of shared PNGs, and the tiny
Qwen3-VL's processor, in a temp dir. Every measurement runs in a fresh subprocess (what a rank
does at start-up: import, load the processor, open the rows, draw a global batch, encode this
rank's share in a worker): peak RSS is that process's VmHWM (and its workers'). Readers:

* ``jsonl-index`` (what training uses for .jsonl): a byte-offset index built by one pass over the
  file, no cache; "cold" is its first run after the file was written, "warm" a second run.
* ``parquet`` (the same rows; read through ``datasets``' memory-mapped Arrow table, as parquet
  and JSON-array files are): "cold" converts the file into a fresh Arrow cache (grows with the
  rows), "warm" memory-maps that cache.
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

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8


def write_data(out: Path, sizes: list[int]) -> dict[tuple[str, int], Path]:
    """Sharegpt JSONL and parquet files of the given row counts over 4 shared 64x64 images."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    colours = [(220, 40, 40), (40, 170, 70), (40, 80, 220), (240, 210, 40)]
    for k, colour in enumerate(colours):
        Image.new("RGB", (64, 64), colour).save(out / f"img{k}.png")
    files = {}
    for n in sizes:
        rows = [{"messages": [
                    {"role": "user", "content": f"<image>How many cells are coloured? ({i})"},
                    {"role": "assistant", "content": f"<caption>- {i % 9} cells</caption>\n"
                     f"<think>{i % 9} + 1 = {i % 9 + 1}</think>\n<answer>{i % 9 + 1}</answer>"}],
                 "images": [f"img{i % 4}.png"]} for i in range(n)]
        files["jsonl-index", n] = out / f"sft_{n}.jsonl"
        with files["jsonl-index", n].open("w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        files["parquet", n] = out / f"sft_{n}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), files["parquet", n])
    return files


def peak_rss_mb(pid: str = "self") -> float:
    """A process's peak resident memory (VmHWM, Linux; ``ru_maxrss`` is not reset by exec, so it
    would include the parent's memory at fork)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def child(args) -> None:
    """One start-up (or one encoding run) in this fresh process; prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    from functools import partial

    from prism_megatron.data.encode import load_processor
    from prism_megatron.data.sampler import ResumableSampler
    from prism_megatron.data.sft import (EncodeLimits, SFTDataset, StepRequests, StepShards,
                                         step_loader)
    from prism_megatron.models.qwen3_vl.rope import rope_index_for_sample
    from transformers import AutoConfig

    processor = load_processor(args.hf_dir)
    position_fn = partial(rope_index_for_sample, hf_config=AutoConfig.from_pretrained(args.hf_dir))
    t_index = time.perf_counter()
    dataset = SFTDataset([args.file], processor, EncodeLimits(1024, 256))
    t_index = time.perf_counter() - t_index
    steps = range(1, (args.encode_steps or 1) + 1)
    requests = StepRequests(ResumableSampler(len(dataset), seed=0), steps, GLOBAL_BATCH, 0, 1)
    shards = StepShards(dataset, micro_batch_size=2, packing=False,
                        pad_id=processor.tokenizer.pad_token_id, position_fn=position_fn)
    loader = step_loader(shards, requests, num_workers=args.workers, prefetch_steps=4)
    t_iter = time.perf_counter()
    iterator = iter(loader)
    first = next(iterator)
    t_first = time.perf_counter()
    rows = first.seen - sum(first.skipped.values())
    for _ in range(len(steps) - 1):
        shard = next(iterator)
        rows += shard.seen - sum(shard.skipped.values())
    t_end = time.perf_counter()
    # The workers' peaks (pages shared with this process since the fork included), read while
    # they still run: the iterator shuts them down once it is exhausted.
    workers = [peak_rss_mb(str(w.pid)) for w in getattr(iterator, "_workers", [])]
    del iterator
    print(json.dumps({
        "rows": len(dataset), "first_batch_s": t_first - T0, "index_s": t_index,
        "data_s": t_index + t_first - t_iter,
        "rss_mb": peak_rss_mb(),
        "worker_rss_mb": max(workers, default=0.0),
        "encoded": rows, "encode_s": t_end - t_iter}))


def measure(hf_dir: Path, file: Path, workers: int, cache: Path,
            encode_steps: int = 0) -> dict:
    env = dict(os.environ, HF_DATASETS_CACHE=str(cache), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, __file__, "--child", "--hf-dir", str(hf_dir), "--file", str(file),
           "--workers", str(workers), "--encode-steps", str(encode_steps)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--encode-steps", type=int, default=16)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    sys.path.insert(0, str(ROOT))
    from prism_megatron.testing.tiny import write_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    hf_dir = write_tiny_model(work / "model", preset="tiny", log=lambda *a: None)
    start = time.perf_counter()
    files = write_data(work / "data", [args.small, args.large])
    print(f"generated {args.small:,} + {args.large:,} rows as JSONL and parquet (4 shared 64x64 "
          f"PNGs) in "
          f"{time.perf_counter() - start:.1f} s; global batch {GLOBAL_BATCH} rows, 2 workers, "
          f"tiny Qwen3-VL processor; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs")
    results = {}
    for (reader, n), file in files.items():
        cache = work / f"cache-{reader}-{n}"
        for temp in ("cold", "warm"):
            results[reader, temp, n] = measure(hf_dir, file, 2, cache)
    # first batch: from the interpreter's start (imports and processor included); data: opening
    # the rows + drawing and encoding the first step (what could grow with the rows).
    print(f"{'reader':<12} {'start':<5} {'rows':>8} {'first batch':>12} {'data':>8} "
          f"{'open rows':>10} {'peak RSS':>9} {'worker RSS':>11}")
    for (reader, temp, n), r in sorted(results.items()):
        print(f"{reader:<12} {temp:<5} {n:>8,} {r['first_batch_s']:>10.2f} s {r['data_s']:>6.2f} s"
              f" {r['index_s']:>8.2f} s {r['rss_mb']:>6.0f} MB {r['worker_rss_mb']:>8.0f} MB")
    for reader in ("jsonl-index", "parquet"):
        for temp in ("cold", "warm"):
            small, large = results[reader, temp, args.small], results[reader, temp, args.large]
            print(f"ratio {args.large // 1000}k/{args.small // 1000}k {reader} {temp}: "
                  f"time-to-first-batch {large['first_batch_s'] / small['first_batch_s']:.2f} "
                  f"(data part {large['data_s'] / small['data_s']:.2f}), "
                  f"peak RSS {large['rss_mb'] / small['rss_mb']:.2f} "
                  f"(workers {large['worker_rss_mb'] / small['worker_rss_mb']:.2f})")
    rates = {1: 0.0, 2: 0.0}
    for workers in (1, 2, 1, 2):  # best of two each, interleaved: the host is shared
        r = measure(hf_dir, files["jsonl-index", args.small], workers, work / "cache-enc",
                    encode_steps=args.encode_steps)
        rates[workers] = max(rates[workers], r["encoded"] / r["encode_s"])
    print(f"encoding {args.encode_steps * GLOBAL_BATCH} rows (best of 2): 1 worker {rates[1]:.0f} rows/s, "
          f"2 workers {rates[2]:.0f} rows/s (x{rates[2] / rates[1]:.2f}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
