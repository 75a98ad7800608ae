"""Prompt datasets of the RL stages: sharegpt rows -> encoded prompts (+ answer / teacher text).

RLVR rows carry ``answer`` (the verifiable ground truth); alignment rows carry ``teacher_caption``
and ``teacher_cot`` (spec §1.2). Prompts are encoded once with ``encode_prompt`` (the one prompt
builder); those longer than ``max_prompt_length`` are skipped and counted, as the reference's
``filter_overlong_prompts`` does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from prism_megatron.data.encode import Encoded, encode_prompt
from prism_megatron.data.sft import read_rows
from prism_megatron.data.sharegpt import BadRow, SkipStats, count_placeholders, load_images, row_messages

log = logging.getLogger(__name__)


@dataclass
class RLPrompt:
    encoded: Encoded                 # chat-templated prompt with the generation prompt
    images: list[Any]                # raw images, for engines that preprocess themselves
    answer: str | None = None        # RLVR ground truth
    teacher: dict[str, str] = field(default_factory=dict)   # teacher_caption / teacher_cot
    id: str = ""

    def rollout_prompt(self):
        from prism_megatron.rollout.base import RolloutPrompt

        return RolloutPrompt.from_encoded(self.encoded, self.images)


def load_rl_prompts(files: list[str], processor, *, max_prompt_length: int,
                    require: tuple[str, ...] = ("answer",), max_skip_fraction: float = 0.01,
                    progress: bool = True) -> tuple[list[RLPrompt], SkipStats]:
    """Every usable row of ``files``; ``require`` names the row fields the stage needs."""
    if not files:
        raise ValueError("data.train_files is empty: give at least one JSONL/parquet prompt file")
    prompts, stats = [], SkipStats()
    for path in files:
        for row in tqdm(read_rows(path), desc=f"encoding {Path(path).name}", disable=not progress,
                        leave=False):
            stats.seen += 1
            try:
                missing = [k for k in require if row.get(k) is None or str(row[k]) == ""]
                if missing:
                    raise BadRow("missing_" + missing[0])
                messages = [m for m in row_messages(row) if m["role"] != "assistant"]
                images = load_images(row, Path(path).parent, count_placeholders(messages))
                encoded = encode_prompt(processor, messages, images)
                if len(encoded.input_ids) > max_prompt_length:
                    raise BadRow("prompt_too_long")
            except BadRow as bad:
                stats.skipped[bad.reason] += 1
                continue
            teacher = {k: row[k] for k in ("teacher_caption", "teacher_cot") if row.get(k)}
            answer = None if row.get("answer") is None else str(row["answer"])
            prompts.append(RLPrompt(encoded, images, answer, teacher,
                                    str(row.get("id", len(prompts)))))
    log.info("RL prompts: %s", stats.summary())
    stats.check(max_skip_fraction)
    return prompts, stats
