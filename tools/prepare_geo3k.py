#!/usr/bin/env python
"""Geometry3K -> verl-layout parquet files for the RL stages and held-out evaluation.

    huggingface-cli download hiyouga/geometry3k --repo-type dataset --local-dir data/geometry3k
    python tools/prepare_geo3k.py --src data/geometry3k --out data/geo3k
    # -> data/geo3k/{train,validation,test}.parquet

The system prompt is the project's default, ``--system-prompt TEXT``, or ``data.system_prompt``
of ``--config YAML``; see prism_megatron/data/geo3k.py for the output columns.
"""

from __future__ import annotations

import argparse
import sys

from prism_megatron.data.geo3k import prepare_geo3k
from prism_megatron.errors import PrismError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--src", required=True,
                        help="local copy of hiyouga/geometry3k (directory of parquet files)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--splits", default="train,validation,test",
                        help="comma-separated splits to write (those present)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--system-prompt", default=None, help="system message of every prompt "
                       "('' = none)")
    group.add_argument("--config", default=None,
                       help="a prism config whose data.system_prompt is used")
    args = parser.parse_args(argv)
    try:
        system_prompt = args.system_prompt
        if system_prompt is None:
            from prism_megatron.config import PrismConfig, load_config

            system_prompt = (load_config(args.config) if args.config else
                             PrismConfig()).data.system_prompt
        written = prepare_geo3k(args.src, args.out, system_prompt=system_prompt,
                                splits=tuple(s for s in args.splits.split(",") if s))
    except PrismError as exc:
        print(f"prepare_geo3k: error: {exc}", file=sys.stderr)
        return 2
    for split, (path, rows) in written.items():
        print(f"{split}: {rows} rows -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
