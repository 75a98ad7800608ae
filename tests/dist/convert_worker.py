"""Worker for tests/test_convert.py: conversions that need a process group or the model.

    python tests/dist/convert_worker.py roundtrip --hf A,B --out DIR
        For every HF dir and layout: HF -> torch_dist -> HF in this one process; prints one JSON
        line {tag: "ok" | error}. (One process for all of them: imports and the gloo group are
        paid once.)
    torchrun --nproc_per_node T tests/dist/convert_worker.py load --hf-dir D --tp T \\
            --ckpt C1 --ckpt C2 ... --out logits.pt
        Builds the training model at TP=T, loads each checkpoint (legacy or torch_dist) and runs
        one forward on a fixed text+image batch; rank 0 saves {ckpt: (format, logits)} to --out.
        With --save-training-ckpt DIR the model is then saved as a training checkpoint.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

LAYOUTS = [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None)]


def tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def roundtrip(args) -> None:
    import torch

    from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron
    from prism_megatron.convert.megatron_to_hf import convert_megatron_to_hf
    from prism_megatron.convert.torch_dist import ensure_process_group

    ensure_process_group()
    results = {}
    for n, hf in enumerate(map(Path, args.hf.split(","))):
        original = tensors(hf)
        layers = json.loads((hf / "config.json").read_text())["text_config"]["num_hidden_layers"]
        layouts = LAYOUTS + ([(2, 2, [1, layers - 1])] if layers >= 3 else [])
        for tp, pp, pp_layers in layouts:
            tag = f"{n}:{hf}/tp{tp}pp{pp}" + (f"-{pp_layers}" if pp_layers else "")
            mg = Path(args.out) / f"{n}-tp{tp}pp{pp}-{len(results)}" / "mg"
            back = mg.parent / "hf"
            convert_hf_to_megatron(hf, mg, tp=tp, pp=pp, pp_layers=pp_layers, fmt="torch_dist",
                                   progress=False)
            convert_megatron_to_hf(mg, back, progress=False)
            got = tensors(back)
            bad = sorted(set(got) ^ set(original)) + [
                k for k in original if k in got and not (
                    got[k].dtype == original[k].dtype and got[k].shape == original[k].shape
                    and torch.equal(got[k].view(torch.uint8), original[k].view(torch.uint8)))]
            results[tag] = "ok" if not bad else f"differs: {bad[:5]}"
    print(json.dumps(results))


def load(args) -> None:
    import torch
    import torch.distributed as dist

    from prism_megatron.weights.load import load_megatron_checkpoint
    from prism_megatron.convert.verify import build_megatron, make_batches, megatron_logits
    from prism_megatron.distributed import destroy_distributed, init_distributed

    init_distributed(tp=args.tp, pp=1)
    model, config = build_megatron(args.hf_dir)
    _, batch = make_batches(args.hf_dir)[-1]  # the two-image case
    out = {}
    for ckpt in args.ckpt:
        fmt = load_megatron_checkpoint(model, ckpt)
        out[ckpt] = (fmt, megatron_logits(model, config, batch))
    if dist.get_rank() == 0:
        torch.save(out, args.out)
    if args.save_training_ckpt:
        from prism_megatron.checkpoint import save_checkpoint

        save_checkpoint(args.save_training_ckpt, 1, [model])
    destroy_distributed()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("roundtrip")
    r.add_argument("--hf", required=True)
    r.add_argument("--out", required=True)
    ld = sub.add_parser("load")
    ld.add_argument("--hf-dir", required=True)
    ld.add_argument("--tp", type=int, default=1)
    ld.add_argument("--ckpt", action="append", required=True)
    ld.add_argument("--out", required=True)
    ld.add_argument("--save-training-ckpt", default=None,
                    help="also save the loaded model with prism_megatron.checkpoint")
    args = p.parse_args()
    {"roundtrip": roundtrip, "load": load}[args.cmd](args)


if __name__ == "__main__":  # dist_checkpointing.save starts a helper process: keep the guard
    main()
