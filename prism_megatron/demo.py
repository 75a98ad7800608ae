"""``make demo``: the tiny three-stage PRISM pipeline on CPU, end to end.

Every step writes into ``--out`` and is skipped when its output already exists, so an
interrupted demo resumes where it stopped (SFT itself resumes from its last checkpoint). Steps so
far: a tiny random Qwen3-VL checkpoint, the synthetic colour-grid task, HF -> Megatron conversion,
and stage 1 (SFT) with held-out accuracy before and after. Later stages plug in here.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def make_model(out: Path, preset: str, seed: int) -> Path:
    from prism_megatron.models.qwen3_vl.tiny import write_tiny_model

    path = out / "model"
    if not (path / "config.json").is_file():
        write_tiny_model(path, preset=preset, seed=seed)
    return path


def make_data(out: Path, seed: int) -> Path:
    from prism_megatron.data.synthetic import write_dataset

    path = out / "data"
    if not (path / "manifest.json").is_file():
        write_dataset(path, seed)
    return path


def convert(out: Path, model_dir: Path) -> Path:
    from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron

    path = out / "megatron"
    if not (path / "prism_convert.json").is_file():
        convert_hf_to_megatron(model_dir, path, fmt="torch_dist", force=True)
    return path


def sft(out: Path, model_dir: Path, megatron_dir: Path, data_dir: Path, steps: int) -> dict:
    """Stage 1 in this process (world size 1) with the tiny example config."""
    from prism_megatron.config import load_config
    from prism_megatron.metrics import read_history
    from prism_megatron.stages import sft as sft_stage

    run_dir = out / "runs" / "sft"
    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "tiny" / "sft.yaml", [
        f"model.hf_dir={model_dir}", f"model.megatron_dir={megatron_dir}",
        f"data.train_files=[{data_dir / 'sft_public.jsonl'},{data_dir / 'sft_teacher.jsonl'}]",
        f"data.eval_files=[{data_dir / 'test.jsonl'}]", f"train_steps={steps}",
        f"checkpoint.save_dir={run_dir / 'ckpt'}", f"logging.run_dir={run_dir}"])
    history = read_history(run_dir)
    if not (history and history[-1]["step"] == steps and "eval/test/accuracy" in history[-1]):
        sft_stage.run(cfg)
        history = read_history(run_dir)
    return {"before": history[0], "after": history[-1], "run_dir": run_dir}


def summarise(model_dir: Path, data_dir: Path) -> None:
    info = json.loads((model_dir / "prism_tiny_model.json").read_text())
    manifest = json.loads((data_dir / "manifest.json").read_text())
    print(f"\nmodel  {model_dir}: preset {info['preset']['name']}, "
          f"{info['parameters']['total']:,} parameters, vocabulary {info['tokenizer_size']}")
    print(f"data   {data_dir}: " + ", ".join(f"{k} {v}" for k, v in manifest["counts"].items())
          + f", {manifest['num_images']} images")
    row = json.loads((data_dir / "sft_teacher.jsonl").read_text().splitlines()[0])
    print("example teacher demo:")
    for message in row["messages"][1:]:
        print(f"  [{message['role']}] {message['content']}")


def run(out: Path, preset: str = "tiny", seed: int = 0, sft_steps: int = 200) -> None:
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    print(f"== PRISM tiny demo -> {out}")
    model_dir = make_model(out, preset, seed)
    data_dir = make_data(out, seed)
    summarise(model_dir, data_dir)
    megatron_dir = convert(out, model_dir)
    print(f"\n== stage 1: SFT ({sft_steps} steps) on sft_public + sft_teacher")
    result = sft(out, model_dir, megatron_dir, data_dir, sft_steps)
    before, after = result["before"], result["after"]
    print("\n| held-out (test.jsonl, greedy) | accuracy | format valid |\n|---|---|---|")
    for name, row in (("random init", before), ("after SFT", after)):
        print(f"| {name} | {row['eval/test/accuracy']:.3f} | {row['eval/test/format_rate']:.3f} |")
    print(f"SFT loss {result['after']['loss']:.3f}; curves: {result['run_dir'] / 'sft_curves.png'}")
    print(f"\ndemo finished in {time.time() - start:.0f}s")


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prism demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    parser.add_argument("--preset", default="tiny", help="tiny model preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=200)
    args = parser.parse_args(argv)
    run(args.out, args.preset, args.seed, args.sft_steps)


if __name__ == "__main__":
    cli()
