"""Warm-up pair files whose students are the policy's own samples (spec §3.6), and the command
line that writes pair files:

    python -m prism_megatron.pipeline.pairs --data-dir D --out-dir O [--policy-dir P]

writes ``pairs_{train,heldout}.jsonl`` from the synthetic task (teacher = the dense
demonstration, student = an sft_public-style response to the same prompt; ``data.pairs``); with
``--policy-dir`` the training students are the policy's own samples (local rollout engine).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from prism_megatron.data.encode import encode_prompt
from prism_megatron.data.pairs import prompt_messages, write_synthetic_pairs
from prism_megatron.data.rows import Row, normalise, row_images, sharegpt_dict, tagged_teacher
from prism_megatron.data.sharegpt import BadRow, DataError, SkipStats
from prism_megatron.rewards.response import SYSTEM_PROMPT
from prism_megatron.rewards.response import split_segments
from prism_megatron.rollout import RolloutPrompt

log = logging.getLogger(__name__)


def policy_pair_rows(rows: list, base_dir: Path, engine, processor, params, n: int = 1,
                     system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """Pair rows whose students are the policy's own samples (spec §3.6: the SFT policy's
    responses to the same prompts), ``n`` per prompt, from a rollout engine
    (``prism_megatron.rollout.make_engine``). ``rows`` (``rows.Row``s or stored dicts of any
    layout, e.g. verl alignment rows) carry the teacher fields; their teacher texts are tagged
    and their images made self-contained in the written rows. A format-invalid sample is kept
    (its fallback halves): the warm-up runs it and leaves it out of the loss."""
    prompts, kept, stats = [], [], SkipStats()
    for k, row in enumerate(rows):
        stats.seen += 1
        try:
            if not isinstance(row, Row):
                row = normalise(row, where=f"{base_dir}[row {k}]", base_dirs=(base_dir,),
                                system_prompt=system_prompt)
            if row.teacher_caption is None or row.teacher_cot is None:
                raise BadRow("missing_teacher", f"{row.where}: no teacher_caption/teacher_cot")
            caption, cot = tagged_teacher(row.teacher_caption, row.teacher_cot, row.answer,
                                          row.where)
            images = row_images(row)
            encoded = encode_prompt(processor, prompt_messages(row), images)
        except BadRow as bad:
            stats.skip(bad)
            continue
        prompts.append(RolloutPrompt.from_encoded(encoded, images))
        plain = sharegpt_dict(row)
        kept.append({"id": row.id, "messages": [m for m in plain["messages"]
                                                if m["role"] != "assistant"],
                     "images": plain["images"], "teacher_caption": caption,
                     "teacher_cot": cot, "answer": row.answer})
    log.info("pair prompts: %s", stats.summary())
    if not kept:
        raise DataError(f"no usable pair prompts ({stats.summary()})")
    out = []
    for row, samples in zip(kept, engine.generate(prompts, params, n=n)):
        for j, sample in enumerate(samples):
            parts = split_segments(sample.text)
            out.append(dict(row, id=f"{row['id']}-s{j}", student_caption=parts.caption,
                            student_cot=parts.reasoning))
    return out


def write_policy_pairs(data_dir: str | Path, out_dir: str | Path, policy_dir: str | Path, *,
                       n: int = 1, seed: int = 0, max_new_tokens: int = 256) -> Path:
    """``pairs_train.jsonl`` with the policy's samples as students for the align split."""
    from prism_megatron.config import RolloutConfig
    from prism_megatron.data.encode import load_processor
    from prism_megatron.rollout import make_engine, sampling_params

    data_dir = Path(data_dir)
    rows = [json.loads(x) for x in (data_dir / "align.jsonl").read_text().splitlines() if x.strip()]
    cfg = RolloutConfig(engine="local")
    processor = load_processor(policy_dir)
    engine = make_engine(cfg, policy_dir)
    try:
        params = sampling_params(cfg, seed=seed, max_new_tokens=max_new_tokens)
        pair_rows = policy_pair_rows(rows, data_dir, engine, processor, params, n)
    finally:
        engine.shutdown()
    path = Path(out_dir) / "pairs_train.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for row in pair_rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write discriminator warm-up pair files (teacher demo vs sft_public-style "
                    "student response for the same prompt) from the synthetic task.")
    parser.add_argument("--data-dir", required=True, help="synthetic dataset directory")
    parser.add_argument("--out-dir", required=True, help="where pairs_{train,heldout}.jsonl go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy-dir", default=None,
                        help="HF policy directory: the training students become the policy's own "
                             "samples for the align-split prompts (local CPU rollout engine)")
    parser.add_argument("--samples", type=int, default=1, help="policy samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    try:
        paths = write_synthetic_pairs(args.data_dir, args.out_dir, args.seed)
        if args.policy_dir:
            paths["train"] = write_policy_pairs(args.data_dir, args.out_dir, args.policy_dir,
                                                n=args.samples, seed=args.seed,
                                                max_new_tokens=args.max_new_tokens)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    for name, path in paths.items():
        print(f"{name}: {sum(1 for _ in open(path))} rows -> {path}")
    return 0


if __name__ == "__main__":
    from prism_megatron.errors import run_cli

    raise SystemExit(run_cli(main))
