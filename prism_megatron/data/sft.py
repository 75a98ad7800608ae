"""SFT dataset: sharegpt JSONL/parquet files -> encoded samples, bad rows skipped and counted."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from prism_megatron.data.encode import Encoded, encode_conversation
from prism_megatron.data.sharegpt import BadRow, SkipStats, count_placeholders, load_images, row_messages

log = logging.getLogger(__name__)


def read_rows(path, data_cfg=None) -> Iterator[dict]:
    """Rows of one data file in any published layout, as sharegpt dicts
    (``prism_megatron.data.rows.read_rows``; ``path`` may be a ``RowSource``)."""
    from prism_megatron.data.rows import read_rows as _read_rows

    yield from _read_rows(path, data_cfg)


def load_sft_samples(files: list[str], processor, *, max_prompt_length: int,
                     max_response_length: int, max_skip_fraction: float = 0.01,
                     progress: bool = True) -> tuple[list[Encoded], SkipStats]:
    """Encode every usable row of ``files``; raise if too many rows are unusable."""
    if not files:
        raise ValueError("data.train_files is empty: give at least one JSONL/parquet file")
    samples, stats = [], SkipStats()
    for path in files:
        rows = read_rows(path)
        for row in tqdm(rows, desc=f"encoding {Path(path).name}", disable=not progress,
                        leave=False):
            stats.seen += 1
            try:
                messages = row_messages(row)
                images = load_images(row, Path(path).parent, count_placeholders(messages))
                samples.append(encode_conversation(
                    processor, messages, images, max_prompt_length=max_prompt_length,
                    max_response_length=max_response_length))
            except BadRow as bad:
                stats.skipped[bad.reason] += 1
    log.info("SFT data: %s", stats.summary())
    stats.check(max_skip_fraction)
    return samples, stats
