#!/usr/bin/env python3
"""Write the synthetic colour-grid visual-reasoning dataset (sharegpt multimodal JSONL + PNG images).

Splits: sft_public.jsonl, sft_teacher.jsonl, align.jsonl, rl.jsonl, test.jsonl, images/, manifest.json.
The same --seed and sizes always give byte-identical files.

Example:
    python tools/make_synthetic_data.py --out demo_out/data --seed 0 --n-sft-public 500
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from prism_megatron.data.synthetic import DEFAULT_SIZES, SPLITS, write_dataset  # noqa: E402
from prism_megatron.errors import run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    for split in SPLITS:
        parser.add_argument(f"--n-{split.replace('_', '-')}", type=int, default=DEFAULT_SIZES[split],
                            dest=f"n_{split}", metavar="N", help=f"rows in {split}.jsonl (default {DEFAULT_SIZES[split]})")
    parser.add_argument("--force", action="store_true",
                        help="remove an existing dataset at --out first (one with a manifest.json)")
    args = parser.parse_args(argv)

    out: Path = args.out
    if out.exists() and any(out.iterdir()):
        if not args.force:
            print(f"error: {out} is not empty (use --force to replace a dataset)", file=sys.stderr)
            return 2
        if not (out / "manifest.json").is_file():
            print(f"error: refusing to clear {out}: no manifest.json, not a dataset dir", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    sizes = {split: getattr(args, f"n_{split}") for split in SPLITS}
    if any(n < 0 for n in sizes.values()):
        parser.error("split sizes must be >= 0")
    start = time.time()
    print(f"[synthetic] writing seed={args.seed} to {out}")
    manifest = write_dataset(out, args.seed, sizes)
    print(f"[synthetic] done: {sum(manifest['counts'].values())} rows, {manifest['num_images']} images "
          f"in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
