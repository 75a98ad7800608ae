"""Pairwise teacher-vs-student data for the discriminator warm-up (spec §3.6).

A row (JSONL or parquet) holds one prompt and one teacher and one student response, split:
    {"prompt" | "question": "...", "image": "a.png" (optional),       # spec §3.6 layout, or
     "messages": [{"role": "system", ...}, {"role": "user", ...}], "images": [...],
     "teacher_caption": "...", "teacher_cot": "...", "student_caption": "...", "student_cot": "..."}
Rows with ``teacher_response`` / ``student_response`` instead are split with the response parser.
Each usable row gives two comparisons (caption, reasoning). Teacher texts get their tags when they
lack them (spec §9.2; an untagged cot needs the row's ``answer``) and must then be format-valid,
else the row is skipped; a student is kept as written and is marked invalid when its format is
wrong (it still runs through the model, its pairs are excluded from the loss).

``python -m prism_megatron.models.discriminator.pairs --data-dir D --out-dir O`` writes pair files
from the synthetic task: teacher = the dense demonstration of each prompt, student = an
sft_public-style (terse, sometimes wrong) response to the SAME prompt; with ``--policy-dir P`` the
training students are instead the policy's own samples (rollout engine), as in spec §3.6.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from prism_megatron.data.encode import Encoded, encode_prompt
from prism_megatron.data.sharegpt import (
    BadRow, SkipStats, count_placeholders, load_images, row_messages)
from prism_megatron.data.template import IMAGE_PLACEHOLDER, SYSTEM_PROMPT
from prism_megatron.models.discriminator.segments import (
    SegmentIds, ensure_caption_tags, ensure_reasoning_tags, text_segments)
from prism_megatron.rewards.response import split_segments

PAIR_FIELDS = ("teacher_caption", "teacher_cot", "student_caption", "student_cot")


@dataclass
class PairSample:
    """One prompt with its teacher and student segments (ids), ready for batching."""

    id: str
    prompt: Encoded
    teacher: SegmentIds
    student: SegmentIds


def prompt_messages(row: dict) -> list[dict]:
    """The prompt turns of a row: its own ``messages`` (assistant turns dropped) or, for the
    spec §3.6 layout, the format system prompt + one user turn (image placeholder + question)."""
    if row.get("messages") or row.get("conversations"):
        messages = [m for m in row_messages(row) if m["role"] != "assistant"]
    else:
        question = row.get("prompt") or row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise BadRow("no_prompt")
        image = IMAGE_PLACEHOLDER if row.get("image") and IMAGE_PLACEHOLDER not in question else ""
        messages = row_messages({"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                              {"role": "user", "content": image + question}]})
    if not any(m["role"] == "user" for m in messages):
        raise BadRow("no_user_turn")
    return messages


def _student_text(caption: str, cot: str) -> str:
    """A student is kept as written: a missing or malformed tag makes it format-invalid (its
    pairs leave the loss) instead of being repaired into a valid-looking response."""
    return f"{caption.strip()}\n{cot.strip()}"


def row_texts(row: dict) -> tuple[str, str]:
    """(teacher response text, student response text) of a row, tags ensured for the teacher."""
    if all(isinstance(row.get(f), str) and row[f].strip() for f in PAIR_FIELDS):
        answer = row.get("answer") if isinstance(row.get("answer"), str) else None
        teacher = (f"{ensure_caption_tags(row['teacher_caption'])}\n"
                   f"{ensure_reasoning_tags(row['teacher_cot'], answer)}")
        return teacher, _student_text(row["student_caption"], row["student_cot"])
    if all(isinstance(row.get(f), str) for f in ("teacher_response", "student_response")):
        return row["teacher_response"], row["student_response"]
    raise BadRow("missing_pair_fields")


def encode_pair_row(row: dict, base_dir: Path, processor) -> PairSample:
    teacher_text, student_text = row_texts(row)
    tokenizer = processor.tokenizer
    teacher = text_segments(teacher_text, tokenizer)
    if not teacher.valid:
        raise BadRow("invalid_teacher", teacher_text[:80])
    student = text_segments(student_text, tokenizer)
    messages = prompt_messages(row)
    image_row = dict(row, images=row.get("images") or ([row["image"]] if row.get("image") else []))
    images = load_images(image_row, base_dir, count_placeholders(messages))
    prompt = encode_prompt(processor, messages, images)
    return PairSample(str(row.get("id", "")), prompt, teacher, student)


def load_pairs(files: list[str], processor, *, max_length: int = 8192,
               max_skip_fraction: float = 0.01) -> tuple[list[PairSample], SkipStats]:
    """Every usable row of ``files``; rows whose longest sequence exceeds ``max_length`` are
    skipped (spec §3.6 truncates at 8192; truncation would cut the scored closing tag)."""
    from prism_megatron.data.sft import read_rows

    samples, stats = [], SkipStats()
    for path in files:
        for row in read_rows(path):
            stats.seen += 1
            try:
                sample = encode_pair_row(row, Path(path).parent, processor)
                longest = max(len(s) for s in (sample.teacher.caption, sample.teacher.reasoning,
                                               sample.student.caption, sample.student.reasoning))
                if len(sample.prompt.input_ids) + longest > max_length:
                    raise BadRow("too_long")
                samples.append(sample)
            except BadRow as bad:
                stats.skipped[bad.reason] += 1
    stats.check(max_skip_fraction)
    return samples, stats


# --------------------------------------------------------------------- synthetic pair builder

def synthetic_pair_rows(rows: list[dict], seed: int, image_root: Path) -> list[dict]:
    """Pair rows for synthetic-task rows: the teacher demonstration and an sft_public-style
    response of the same (grid, question), both rebuilt from the row's ``meta``."""
    from prism_megatron.data import synthetic as syn

    out = []
    for row in rows:
        grid = tuple(tuple(r) for r in row["meta"]["grid"])
        q = row["meta"]["question"]
        question = syn.Question(q["kind"], tuple(q["colours"]), q["k"], tuple(q["options"]))
        answer = syn.solve(question, {c: syn.count(grid, c) for c in syn.COLOURS})
        rng = random.Random(f"prism-pairs:{seed}:{row['id']}")
        student, _ = syn.public_response(rng, question, grid)
        student_parts = split_segments(student)
        out.append({
            "id": row["id"],
            "messages": [m for m in row["messages"] if m["role"] != "assistant"],
            "images": [str((image_root / p).resolve()) for p in row["images"]],
            "teacher_caption": f"<caption>{syn.teacher_caption(grid)}</caption>",
            "teacher_cot": f"<think>{syn.teacher_think(question, grid)}</think>\n"
                           f"<answer>{answer}</answer>",
            "student_caption": student_parts.caption,
            "student_cot": student_parts.reasoning,
            "answer": row["answer"],
        })
    return out


def write_synthetic_pairs(data_dir: str | Path, out_dir: str | Path, seed: int = 0,
                          train_splits=("align", "sft_teacher", "rl"),
                          heldout_splits=("test",)) -> dict[str, Path]:
    """``pairs_train.jsonl`` (prompts of ``train_splits``) and ``pairs_heldout.jsonl`` (the test
    split, whose images occur nowhere else) under ``out_dir``; returns their paths."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, splits in (("train", train_splits), ("heldout", heldout_splits)):
        rows = []
        for split in splits:
            path = data_dir / f"{split}.jsonl"
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist (make it with "
                                        f"tools/make_synthetic_data.py)")
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        paths[name] = out_dir / f"pairs_{name}.jsonl"
        with open(paths[name], "w", encoding="utf-8") as f:
            for row in synthetic_pair_rows(rows, seed, data_dir):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return paths


def policy_pair_rows(rows: list[dict], base_dir: Path, engine, processor, params,
                     n: int = 1) -> list[dict]:
    """Pair rows whose students are the policy's own samples (spec §3.6: the SFT policy's
    responses to the same prompts), ``n`` per prompt, from a rollout engine
    (``prism_megatron.rollout.make_engine``). ``rows`` carry the teacher fields (e.g. the
    synthetic ``align`` split). A format-invalid sample is kept (its fallback halves): the warm-up
    runs it and leaves it out of the loss."""
    from prism_megatron.rollout import RolloutPrompt

    prompts, kept = [], []
    for row in rows:
        messages = prompt_messages(row)
        images = load_images(row, base_dir, count_placeholders(messages))
        encoded = encode_prompt(processor, messages, images)
        prompts.append(RolloutPrompt.from_encoded(encoded, images))
        kept.append(row)
    out = []
    for row, samples in zip(kept, engine.generate(prompts, params, n=n)):
        for j, sample in enumerate(samples):
            parts = split_segments(sample.text)
            out.append({"id": f"{row.get('id', '')}-s{j}",
                        "messages": [m for m in row["messages"] if m["role"] != "assistant"],
                        "images": [str((base_dir / p).resolve()) for p in row.get("images", [])],
                        "teacher_caption": row["teacher_caption"],
                        "teacher_cot": row["teacher_cot"],
                        "student_caption": parts.caption, "student_cot": parts.reasoning,
                        "answer": row.get("answer")})
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
    raise SystemExit(main())
