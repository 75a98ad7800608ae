"""Geometry3K (HF dataset ``hiyouga/geometry3k``) -> the verl RLHF parquet the RL configs read.

Input: a local copy of the dataset's parquet files (columns ``images`` = a list of HF Image
structs ``{"bytes", "path"}``, ``problem`` = the question text with its ``<image>`` placeholder,
``answer``), e.g. ``huggingface-cli download hiyouga/geometry3k --repo-type dataset --local-dir
D``. Output per split: ``{out}/{split}.parquet`` in verl's ``RLHFDataset`` layout, as verl's own
geo3k preprocessing lays it out, but with PRISM's prompt: ``prompt`` = [system message (the
project's format prompt or ``--system-prompt``), user message (the problem, ``<image>`` first
when the problem has none)], ``images`` embedded as they came, ``data_source``,
``ability``, ``reward_model: {"style": "rule", "ground_truth": answer}``, ``extra_info``
(split, index, answer, question). Rows are streamed a record batch at a time.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from prism_megatron.data.sharegpt import DataError
from prism_megatron.data.template import IMAGE_PLACEHOLDER
from prism_megatron.rewards.response import SYSTEM_PROMPT

log = logging.getLogger(__name__)
DATA_SOURCE = "hiyouga/geometry3k"
COLUMNS = ("images", "problem", "answer")
_SPLIT = re.compile(r"^(train|validation|valid|val|test)\b")


def split_of(path: Path) -> str:
    """``data/train-00000-of-00001.parquet`` -> ``train`` (HF's parquet file naming)."""
    match = _SPLIT.match(path.name)
    if not match:
        raise DataError(f"{path}: cannot tell the split from the file name (expected "
                        "train-*.parquet, validation-*.parquet or test-*.parquet)")
    return {"valid": "validation", "val": "validation"}.get(match.group(1), match.group(1))


def source_files(src: str | Path) -> dict[str, list[Path]]:
    """Parquet files of a local dataset copy (a directory, searched recursively, or one file)
    grouped by split."""
    src = Path(src)
    files = sorted(src.rglob("*.parquet")) if src.is_dir() else [src]
    if not files or not all(f.is_file() for f in files):
        raise DataError(f"{src}: no parquet files (download hiyouga/geometry3k first)")
    splits: dict[str, list[Path]] = {}
    for f in files:
        splits.setdefault(split_of(f), []).append(f)
    return splits


def verl_rows(batch: pa.RecordBatch, split: str, start: int, system_prompt: str) -> list[dict]:
    rows = []
    for k, row in enumerate(batch.to_pylist()):
        problem, answer = str(row["problem"]), str(row["answer"])
        images = row["images"] or []
        user = problem if IMAGE_PLACEHOLDER in problem or not images else \
            IMAGE_PLACEHOLDER * len(images) + problem
        prompt = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
            [{"role": "user", "content": user}]
        rows.append({"data_source": DATA_SOURCE, "prompt": prompt, "images": images,
                     "ability": "math",
                     "reward_model": {"style": "rule", "ground_truth": answer},
                     "extra_info": {"split": split, "index": start + k, "answer": answer,
                                    "question": problem}})
    return rows


def prepare_geo3k(src: str | Path, out_dir: str | Path, *, system_prompt: str = SYSTEM_PROMPT,
                  splits: tuple[str, ...] = ("train", "validation", "test"),
                  batch_rows: int = 256) -> dict[str, tuple[Path, int]]:
    """Writes ``{out_dir}/{split}.parquet`` for each split present; returns {split: (path,
    rows)}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    found = source_files(src)
    written = {}
    for split in splits:
        if split not in found:
            continue
        path, count, writer = out_dir / f"{split}.parquet", 0, None
        try:
            for f in found[split]:
                try:
                    parquet = pq.ParquetFile(f)
                except (pa.ArrowInvalid, OSError) as exc:
                    raise DataError(f"{f} is not a readable parquet file: {exc}") from None
                missing = [c for c in COLUMNS if c not in parquet.schema_arrow.names]
                if missing:
                    raise DataError(f"{f} lacks the geometry3k columns {missing} (has "
                                    f"{parquet.schema_arrow.names})")
                for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(COLUMNS)):
                    table = pa.Table.from_pylist(verl_rows(batch, split, count, system_prompt))
                    if writer is None:
                        writer = pq.ParquetWriter(path, table.schema)
                    writer.write_table(table.cast(writer.schema))
                    count += batch.num_rows
        finally:
            if writer is not None:
                writer.close()
        written[split] = (path, count)
        log.info("%s: %d rows -> %s", split, count, path)
    if not written:
        raise DataError(f"{src}: none of the splits {list(splits)} found (have {sorted(found)})")
    return written
