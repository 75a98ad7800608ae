#!/usr/bin/env python
"""Sparse-upcycle a dense Qwen3-VL checkpoint into PRISM's MoE discriminator (spec §3.1-3.2).

    python tools/upcycle_discriminator.py --hf-dir Qwen3-VL-2B-Instruct --out ckpt/disc-2b-4x \
        --num-experts 4 --top-k 2 [--noise-std 0.01] [--seed 0] [--ep 2] [--export-hf]

Attention, vision tower, embeddings and norms are copied; every text layer's MLP becomes
--num-experts experts, each the dense MLP plus i.i.d. N(0, noise_std^2) noise drawn independently
per expert; routers start at N(0, 0.02), a value head N(0, 0.02) is added, the LM head dropped.
The output is a megatron dist_checkpointing (torch_dist) checkpoint, loadable at any EP/DP/PP:
--tp/--pp/--ep only check that the layout you will train at fits the model (the tool itself runs
in one process). --export-hf also writes OUT/hf/ (transformers Qwen3-VL-MoE names + v_head).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prism_megatron.convert.cli import add_common_args, run_cli  # noqa: E402
from prism_megatron.weights.errors import ConversionError  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True,
                   help="dense Qwen3-VL HF directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output discriminator checkpoint directory")
    p.add_argument("--num-experts", type=int, default=4, help="experts per MoE layer (default 4)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--noise-std", type=float, default=0.01,
                   help="absolute std of the per-expert weight noise (default 0.01)")
    p.add_argument("--router-std", type=float, default=0.02,
                   help="std of the fresh router weights (default 0.02; 0 = uniform router)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and fresh weights")
    p.add_argument("--tp", type=int, default=1, help="tensor parallelism to train at (checked)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallelism to train at (checked)")
    p.add_argument("--ep", type=int, default=1, help="expert parallelism to train at (checked)")
    p.add_argument("--export-hf", action="store_true", help="also write OUT/hf/ for inspection")
    add_common_args(p)
    return p.parse_args(argv)


def main(argv):
    args = parse(argv)
    from prism_megatron.convert.upcycle import upcycle

    try:
        info = upcycle(args.hf_dir, args.out, num_experts=args.num_experts, top_k=args.top_k,
                       noise_std=args.noise_std, router_std=args.router_std, seed=args.seed,
                       tp=args.tp, pp=args.pp, ep=args.ep, export_hf=args.export_hf,
                       force=args.force, progress=not args.quiet,
                       log=(lambda *a: None) if args.quiet else print)
    except (ValueError, KeyError, FileNotFoundError) as exc:  # bad options/inputs, ConfigError
        raise ConversionError(str(exc).strip("'\"")) from None
    print(f"wrote discriminator checkpoint {args.out}: {info['num_experts']} experts, "
          f"top-{info['top_k']}, noise std {info['noise_std']}"
          + (", segment routing possible" if info["segment_routing_possible"] else ""))


if __name__ == "__main__":  # the guard matters: dist_checkpointing.save spawns a helper process
    sys.exit(run_cli(main))
