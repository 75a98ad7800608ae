#!/usr/bin/env python3
"""Write a random tiny Qwen3-VL checkpoint directory (offline), loadable with transformers' AutoProcessor
and Qwen3VLForConditionalGeneration exactly like a released Qwen3-VL-4B/8B directory.

Examples:
    python tools/make_tiny_qwen3vl.py --out demo_out/tiny-qwen3vl
    python tools/make_tiny_qwen3vl.py --out /tmp/m --preset tiny-qwenvocab --seed 1 --force
    python tools/make_tiny_qwen3vl.py --list
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")                    # everything here is built locally

from prism_megatron.testing.tiny import DEFAULT_PRESET, PRESETS, write_tiny_model  # noqa: E402
from prism_megatron.errors import run_cli  # noqa: E402


def print_presets() -> None:
    print(f"{'preset':16s} {'tok':5s} {'hid':>4s} {'L':>2s} {'h/kv':>5s} {'hd':>4s} {'mrope':12s} "
          f"{'tied':5s} {'vis L':>5s} {'deepstack':10s} description")
    for p in PRESETS.values():
        print(f"{p.name:16s} {p.tokenizer:5s} {p.hidden_size:4d} {p.num_layers:2d} "
              f"{p.num_heads:2d}/{p.num_kv_heads:<2d} {p.head_dim:4d} {str(list(p.mrope_section)):12s} "
              f"{str(p.tie_word_embeddings):5s} {p.vision_depth:5d} {str(list(p.deepstack_visual_indexes)):10s} "
              f"{p.description}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output directory (created; must be empty unless --force)")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                        help=f"model shape (default: {DEFAULT_PRESET}; see --list)")
    parser.add_argument("--seed", type=int, default=0, help="weight-init seed (same seed -> identical weights)")
    parser.add_argument("--force", action="store_true", help="replace an existing model directory at --out")
    parser.add_argument("--list", action="store_true", help="print the preset table and exit")
    args = parser.parse_args(argv)
    if args.list:
        print_presets()
        return 0
    if args.out is None:
        parser.error("--out is required")
    try:
        write_tiny_model(args.out, preset=args.preset, seed=args.seed, force=args.force)
    except FileExistsError as exc:   # main() is also called directly (tests): keep its status
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
