"""The pipeline's tool steps (conversion, warm-up pairs, upcycling), each run in its own process
as ``python -m prism_megatron.pipeline --step NAME JSON`` (see ``Pipeline.command``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prism_megatron.errors import PrismError

def _convert_step(hf_dir: str, out: str) -> None:
    from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron

    convert_hf_to_megatron(hf_dir, out, fmt="torch_dist", force=True, progress=False)
    print(f"converted {hf_dir} -> {out} (torch_dist, loadable at any TP/PP)")


def _upcycle_step(hf_dir, out, num_experts, top_k, noise_std, seed) -> None:
    from prism_megatron.convert.upcycle import upcycle

    upcycle(hf_dir, out, num_experts=num_experts, top_k=top_k, noise_std=noise_std, seed=seed,
            force=True, progress=False)


def _pairs_step(policy, hf_dir, align_file, out, seed, samples, heldout_rows, max_rows,
                max_new_tokens, rollout_config, overrides) -> None:
    """Export the SFT checkpoint to HF, sample it on the align prompts (students) and pair the
    samples with the teacher demos: pairs_train.jsonl and, from the last ``heldout_rows`` rows
    (not trained on), pairs_heldout.jsonl."""
    from prism_megatron.config import PrismConfig, load_config
    from prism_megatron.convert.megatron_to_hf import convert_megatron_to_hf
    from prism_megatron.data.encode import load_processor
    from prism_megatron.data.rows import read_rows
    from prism_megatron.pipeline.pairs import policy_pair_rows
    from prism_megatron.rollout import make_engine, sampling_params

    out = Path(out)
    policy_hf = out / "policy_hf"
    convert_megatron_to_hf(policy, policy_hf, hf_config_dir=hf_dir, force=True, progress=False)
    print(f"exported {policy} -> {policy_hf}")
    rows = [dict(r) for r in read_rows(align_file)]
    rows = rows[:max_rows] if max_rows else rows
    if len(rows) <= heldout_rows:
        raise PrismError(f"{align_file} has {len(rows)} rows: not enough for "
                         f"pairs.heldout_rows={heldout_rows} plus training pairs")
    cfg = load_config(rollout_config, overrides) if rollout_config else PrismConfig()
    rollout = cfg.rollout
    if not rollout_config:
        rollout.engine = "local"
    processor = load_processor(policy_hf, cfg.data.min_pixels, cfg.data.max_pixels)
    engine = make_engine(rollout, policy_hf, cfg.data)
    base = Path(align_file).parent
    try:
        for name, part, n in (("train", rows[:-heldout_rows], samples),
                              ("heldout", rows[-heldout_rows:], 1)):
            params = sampling_params(rollout, seed=seed + (name == "heldout"),
                                     max_new_tokens=max_new_tokens)
            pair_rows = policy_pair_rows(part, base, engine, processor, params, n)
            path = out / f"pairs_{name}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in pair_rows)
            print(f"{name}: {len(pair_rows)} pairs ({len(part)} prompts x {n}) -> {path}")
    finally:
        engine.shutdown()


def _export_step(policy, hf_dir, out) -> None:
    """A stage's Megatron checkpoint -> an HF directory (what `prism eval` and SGLang load)."""
    from prism_megatron.convert.megatron_to_hf import convert_megatron_to_hf

    convert_megatron_to_hf(policy, out, hf_config_dir=hf_dir, force=True, progress=False)
    print(f"exported {policy} -> {out}")


STEPS = {"convert": _convert_step, "pairs": _pairs_step, "upcycle": _upcycle_step,
         "export": _export_step}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "--step" or argv[1] not in STEPS:
        print(f"usage: python -m prism_megatron.pipeline --step {{{','.join(STEPS)}}} JSON "
              "(internal; run `prism pipeline CONFIG` instead)", file=sys.stderr)
        return 2
    try:
        STEPS[argv[1]](**json.loads(argv[2]))
    except (PrismError, FileNotFoundError) as exc:
        print(f"pipeline step {argv[1]}: error: {exc}", file=sys.stderr)
        return 2
    return 0
