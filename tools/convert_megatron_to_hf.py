#!/usr/bin/env python
"""Convert a Megatron checkpoint (legacy or torch_dist, any TP/PP) back to a HuggingFace
directory: safetensors shards + model.safetensors.index.json + config.json.

    python tools/convert_megatron_to_hf.py --megatron-dir ckpt/run1 --out hf/run1 \\
        --hf-config-dir Qwen3-VL-8B

--megatron-dir may be the root (with latest_checkpointed_iteration.txt) or an iter_*/ directory.
Without --hf-config-dir the config stored in the checkpoint by convert_hf_to_megatron.py is
used; with it, its tokenizer / processor / chat-template / generation-config files are copied.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prism_megatron.convert.cli import add_common_args, run_cli  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron-dir", required=True, help="Megatron checkpoint directory")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--hf-config-dir", default=None,
                   help="original HF model dir: config + tokenizer/processor files to copy")
    p.add_argument("--max-shard-size", default="5GB", help="per safetensors file (default 5GB)")
    add_common_args(p)
    return p.parse_args(argv)


def main(argv):
    args = parse(argv)
    from prism_megatron.convert.megatron_to_hf import convert_megatron_to_hf

    files = convert_megatron_to_hf(args.megatron_dir, args.out, hf_config_dir=args.hf_config_dir,
                                   max_shard_size=args.max_shard_size, force=args.force,
                                   progress=not args.quiet)
    print(f"wrote {args.out} ({len(files)} safetensors shard(s))")


if __name__ == "__main__":  # the guard matters: torch_dist loading may start helper processes
    sys.exit(run_cli(main))
