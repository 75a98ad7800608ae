#!/usr/bin/env python
"""Convert a HuggingFace checkpoint (safetensors) to a Megatron checkpoint at a given TP/PP.

    python tools/convert_hf_to_megatron.py --hf-dir Qwen3-VL-8B --out ckpt/qwen3vl8b-tp2 --tp 2
    python tools/convert_hf_to_megatron.py --hf-dir D --out O --tp 2 --pp 2 --pp-layers 10,26
    python tools/convert_hf_to_megatron.py --hf-dir D --out O --format torch_dist

legacy: iter_0000000/mp_rank_TT[_PPP]/model_optim_rng.pt per rank (load at exactly this TP/PP).
torch_dist: megatron-core dist_checkpointing (load at any TP/PP; --tp only sets vocab padding).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prism_megatron.convert.cli import add_common_args, int_list, run_cli  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output Megatron checkpoint directory")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--pp-layers", type=int_list, default=None, metavar="N,N,...",
                   help="decoder layers per pipeline stage, e.g. 1,3 (uneven splits allowed)")
    p.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None, metavar="N",
                   help="layers on the first stage; the rest split evenly (megatron's option)")
    p.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None, metavar="N",
                   help="layers on the last stage; the rest split evenly (megatron's option)")
    p.add_argument("--format", choices=["legacy", "torch_dist"], default="legacy",
                   help="checkpoint format (default legacy)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128, metavar="N",
                   help="vocab padded to a multiple of this times TP (megatron default 128)")
    p.add_argument("--iteration", type=int, default=0,
                   help="iteration recorded in the checkpoint (directory iter_%%07d)")
    p.add_argument("--release", action="store_true",
                   help="write release/ and 'release' in the tracker (Megatron-LM's loader "
                        "rejects iteration 0 unless it is a release checkpoint)")
    add_common_args(p)
    return p.parse_args(argv)


def main(argv):
    args = parse(argv)
    from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron

    manifest = convert_hf_to_megatron(
        args.hf_dir, args.out, tp=args.tp, pp=args.pp, pp_layers=args.pp_layers,
        first_stage_layers=args.decoder_first_pipeline_num_layers,
        last_stage_layers=args.decoder_last_pipeline_num_layers, fmt=args.format,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        iteration=args.iteration, release=args.release, force=args.force,
        progress=not args.quiet)
    print(f"wrote {args.format} checkpoint {args.out} (tp={manifest['tp']} pp={manifest['pp']} "
          f"layers/stage={manifest['pp_layers']} vocab {manifest['vocab_size']}->"
          f"{manifest['padded_vocab_size']})")


if __name__ == "__main__":  # the guard matters: dist_checkpointing.save spawns a helper process
    sys.exit(run_cli(main))
