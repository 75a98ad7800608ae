"""Prompt datasets of the RL stages: rows of any layout -> encoded prompts (+ answer / teacher).

RLVR rows carry the verifiable ground truth as ``answer`` or, in verl parquets,
``reward_model.ground_truth``; alignment rows carry ``teacher_caption`` and ``teacher_cot``
(spec §1.2), which are tagged here once (``rows.tagged_teacher``: untagged texts get their tags,
an untagged cot needs the row's answer) so that a row the alignment stage cannot use is a
counted bad row, never an error at start-up. Prompts are encoded once with ``encode_prompt`` (the
one prompt builder); those longer than ``max_prompt_length`` are skipped and counted, as the
reference's ``filter_overlong_prompts`` does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from prism_megatron.data.encode import Encoded, encode_prompt
from prism_megatron.data.prompt import RolloutPrompt
from prism_megatron.data.rows import (
    Row, open_tables, prompt_messages, row_images, tagged_teacher)
from prism_megatron.data.sharegpt import BadRow, DataError, SkipStats

log = logging.getLogger(__name__)
TEACHER_FIELDS = ("teacher_caption", "teacher_cot")


@dataclass
class RLPrompt:
    encoded: Encoded                 # chat-templated prompt with the generation prompt
    images: list[Any]                # raw images, for engines that preprocess themselves
    answer: str | None = None        # RLVR ground truth
    teacher: dict[str, str] = field(default_factory=dict)   # teacher_caption / teacher_cot
    id: str = ""
    data_source: str | None = None
    meta: dict | None = None         # the synthetic task's ground truth (grid + question), if any

    def rollout_prompt(self) -> RolloutPrompt:
        return RolloutPrompt.from_encoded(self.encoded, self.images)


def row_prompt(row: Row, processor, *, max_prompt_length: int,
               require: tuple[str, ...] = ("answer",)) -> RLPrompt:
    """One row -> an ``RLPrompt``, or ``BadRow`` (missing field, images, too long)."""
    for name in require:
        if getattr(row, name, None) is None:
            raise BadRow("missing_" + name, row.where)
    teacher = {}
    if row.teacher_caption is not None and row.teacher_cot is not None:
        try:
            caption, cot = tagged_teacher(row.teacher_caption, row.teacher_cot, row.answer,
                                          row.where)
            teacher = {"teacher_caption": caption, "teacher_cot": cot}
        except BadRow:
            if any(f in require for f in TEACHER_FIELDS):
                raise
    messages = prompt_messages(row)
    images = row_images(row)
    encoded = encode_prompt(processor, messages, images)
    if len(encoded.input_ids) > max_prompt_length:
        raise BadRow("prompt_too_long", f"{row.where}: {len(encoded.input_ids)} tokens")
    return RLPrompt(encoded, images, row.answer, teacher, row.id, row.data_source)


def load_rl_prompts(files: list, processor, *, max_prompt_length: int,
                    require: tuple[str, ...] = ("answer",), max_skip_fraction: float = 0.01,
                    progress: bool = True, data_cfg: Any = None,
                    ) -> tuple[list[RLPrompt], SkipStats]:
    """Every usable row of ``files`` (paths or ``rows.RowSource``s, any layout); ``require``
    names the fields the stage needs; ``data_cfg`` gives the row options (system prompt, image
    root) for plain paths."""
    if not files:
        raise DataError("data.train_files is empty: give at least one JSONL/parquet prompt file")
    prompts, stats = [], SkipStats()
    for table in open_tables(files, data_cfg, stats):
        for i in tqdm(range(len(table)), desc=f"encoding {table.path.name}",
                      disable=not progress, leave=False):
            stats.seen += 1
            try:
                prompt = row_prompt(table[i], processor, max_prompt_length=max_prompt_length,
                                    require=require)
            except BadRow as bad:
                stats.skip(bad)
                continue
            meta = table.raw(i).get("meta")    # kept for the per-step fidelity metrics
            if isinstance(meta, dict) and "grid" in meta and "question" in meta:
                prompt.meta = meta
            prompts.append(prompt)
    log.info("RL prompts: %s", stats.summary())
    stats.check(max_skip_fraction, ", ".join(map(str, files)))
    return prompts, stats
