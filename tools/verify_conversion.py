#!/usr/bin/env python
"""Logits parity of a converted checkpoint: transformers (HF dir) vs the Megatron model.

    torchrun --nproc_per_node $((T*P)) tools/verify_conversion.py \\
        --hf-dir Qwen3-VL-8B --megatron-dir ckpt/qwen3vl8b-tp2 --tp T --pp P

Runs both models (fp32) on the same chat-formatted batches — text only, one image, two images
of different sizes — built with the HF dir's processor, and prints ONE JSON line:
{"max_abs_logit_diff": ..., "tp": T, "pp": P, "ok": ..., "cases": {...}, ...}.
Exits 1 when the difference exceeds --tol, 2 on a usage/checkpoint error.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prism_megatron.convert.cli import int_list, run_cli  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF checkpoint (weights, config, processor)")
    p.add_argument("--megatron-dir", required=True, help="converted Megatron checkpoint")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--pp-layers", type=int_list, default=None,
                   help="layers per stage (default: the checkpoint's split, else even)")
    p.add_argument("--tol", type=float, default=1e-4, help="max |logit diff| allowed (1e-4)")
    p.add_argument("--debug", action="store_true", help="tracebacks for unexpected errors")
    return p.parse_args(argv)


def main(argv):
    args = parse(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.tp * args.pp:
        from prism_megatron.weights.errors import ConversionError

        raise ConversionError(f"run under torchrun with --nproc_per_node {args.tp * args.pp} "
                              f"(tp*pp); this world has {world} process(es)")
    from prism_megatron.convert.verify import print_result, verify
    from prism_megatron.distributed import destroy_distributed

    result = verify(args.hf_dir, args.megatron_dir, args.tp, args.pp, args.pp_layers, args.tol)
    destroy_distributed()
    if result is not None:
        print_result(result)
        if not result["ok"]:
            raise SystemExit(1)


if __name__ == "__main__":
    sys.exit(run_cli(main))
