"""Pairwise teacher-vs-student data for the discriminator warm-up (spec §3.6).

A row holds one prompt and one teacher and one student response, split, in any layout that
``prism_megatron.data.rows`` reads (the spec §3.6 warm-up layout ``{"prompt" | "question",
"image", "teacher_caption", "teacher_cot", "student_caption", "student_cot"}`` with image paths
relative to ``data.image_root``, or sharegpt/verl prompts with the same four fields). Rows with
``teacher_response`` / ``student_response`` instead are split with the response parser. Each
usable row gives two comparisons (caption, reasoning). Teacher texts get their tags when they lack
them (``rows.tagged_teacher``: an untagged cot needs the row's answer, ``answer`` or
``reward_model.ground_truth``) and must then be format-valid, else the row is skipped; an untagged
student caption is wrapped, the student's cot is kept as written and a format-invalid student is
marked invalid (it still runs through the model, its pairs are excluded from the loss). When more
than ``data.max_skip_fraction`` of the pairs have no valid student the warm-up refuses to start:
it would otherwise train on the teacher-only fallback term alone.

``write_synthetic_pairs`` writes pair files from the synthetic task: teacher = the dense
demonstration of each prompt, student = an sft_public-style (terse, sometimes wrong) response to
the SAME prompt. Pairs whose students are the policy's own samples (spec §3.6) need a rollout
engine: ``prism_megatron.pipeline.pairs`` (also the command line).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from prism_megatron.data.encode import Encoded, encode_prompt
from prism_megatron.data.rows import (  # noqa: F401 (PAIR_FIELDS: this layout's fields)
    PAIR_FIELDS, Row, normalise, open_tables, pair_texts, row_images)
from prism_megatron.data.rows import prompt_messages as _row_prompt_messages
from prism_megatron.data.sharegpt import BadRow, DataError, SkipStats
from prism_megatron.data.segments import SegmentIds, text_segments
from prism_megatron.rewards.response import SYSTEM_PROMPT
from prism_megatron.rewards.response import split_segments

log = logging.getLogger(__name__)

__all__ = ["PAIR_FIELDS", "PairSample", "encode_pair_row", "load_pairs", "write_synthetic_pairs"]


@dataclass
class PairSample:
    """One prompt with its teacher and student segments (ids), ready for batching."""

    id: str
    prompt: Encoded
    teacher: SegmentIds
    student: SegmentIds


def prompt_messages(row: Row | dict, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """The prompt turns of a row (a ``Row`` or a stored dict of any layout): its own messages,
    assistant turns dropped, the system prompt rule applied."""
    if not isinstance(row, Row):
        row = normalise(row, system_prompt=system_prompt)
    return _row_prompt_messages(row)


def encode_pair_row(row: Row, processor) -> PairSample:
    """A pair row -> its prompt and segments, or ``BadRow``."""
    teacher_text, student_text = pair_texts(row)
    tokenizer = processor.tokenizer
    teacher = text_segments(teacher_text, tokenizer)
    if not teacher.valid:
        raise BadRow("invalid_teacher", f"{row.where}: {teacher_text[:80]!r}")
    student = text_segments(student_text, tokenizer)
    prompt = encode_prompt(processor, prompt_messages(row), row_images(row))
    return PairSample(row.id, prompt, teacher, student)


def load_pairs(files: list, processor, *, max_length: int = 8192,
               max_skip_fraction: float = 0.01, data_cfg=None,
               ) -> tuple[list[PairSample], SkipStats]:
    """Every usable row of ``files`` (paths or ``rows.RowSource``s); rows whose longest sequence
    exceeds ``max_length`` are skipped (spec §3.6 truncates at 8192; truncation would cut the
    scored closing tag). ``DataError`` when too many rows are unusable or when more than
    ``max_skip_fraction`` of the pairs have no format-valid student."""
    samples, stats = [], SkipStats()
    for table in open_tables(files, data_cfg, stats):
        for i in range(len(table)):
            stats.seen += 1
            try:
                sample = encode_pair_row(table[i], processor)
                longest = max(len(s) for s in (sample.teacher.caption, sample.teacher.reasoning,
                                               sample.student.caption, sample.student.reasoning))
                if len(sample.prompt.input_ids) + longest > max_length:
                    raise BadRow("too_long", table.where(i))
                samples.append(sample)
            except BadRow as bad:
                stats.skip(bad)
    what = ", ".join(map(str, files))
    stats.check(max_skip_fraction, what)
    invalid = sum(not s.student.valid for s in samples)
    if invalid / len(samples) > max_skip_fraction:
        raise DataError(f"{invalid}/{len(samples)} pairs in {what} have no format-valid student "
                        "(<caption>..</caption> <think>..</think> <answer>..</answer>); the "
                        "warm-up would train on the teacher-only fallback term. Fix the student "
                        f"texts or raise data.max_skip_fraction={max_skip_fraction}")
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
