"""SFT data at scale: rows read lazily, encoded on demand, each data-parallel rank only its share.

Start-up opens every train source (``data.train_files`` and the ``data.datasets`` of a
LLaMA-Factory ``data.dataset_info``) as a random-access row table of any published layout
(data/rows.py: a byte-offset index of the lines for JSONL, ``datasets``' memory-mapped Arrow table
for JSON arrays and parquet) and concatenates them by a cumulative length; no row is parsed or
encoded then.

Per step (``stages/sft.py``): the resumable sampler draws the global batch's indices identically
on every rank; data-parallel rank r takes positions r, r + dp, ... of it (``rank_share``), and a
DataLoader worker reads and encodes only those rows (``encode_row``, the one per-row function),
packs them within that share (a buffer of at most one step's rows) and collates them at the
share's own sequence length (``StepShards``). The main process then agrees with the other
data-parallel ranks on the step's sequence length and micro-batch count with one small
all-gather (``agree_step``) and pads to it (``pad_step``): TP/PP ranks of one data-parallel rank
encode the same rows, so they build identical batches.

Bad rows (``BadRow``) are dropped from their step: the step trains on fewer rows and its loss is
still the token mean over every loss token of the global batch (megatron divides by the global
token count, trainer.py). ``SkipMonitor`` sums rows seen/skipped over the data-parallel ranks
and fails with one line once enough rows were read and too many of them were unusable.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from prism_megatron.data.collate import (
    collate, empty_batch, pack_greedy, pad_batch, padded_length, rank_share)
from prism_megatron.data.encode import Encoded, encode_conversation
from prism_megatron.data.rows import RowTable, open_tables, row_example
from prism_megatron.data.sharegpt import BadRow, DataError, SkipStats
from prism_megatron.errors import PrismError

log = logging.getLogger(__name__)

# The skip threshold is judged once this many rows were read (or the whole dataset, if smaller):
# a handful of bad rows among the first few must not abort a run that is 99.9% clean.
SKIP_CHECK_MIN_ROWS = 1000
SEQ_MULTIPLE = 8               # sequence lengths are padded to a multiple of this


class TooManyBadRows(PrismError, ValueError):
    """More than ``data.max_skip_fraction`` of the rows read so far were unusable."""


# ---- the one per-row function ---------------------------------------------------------------

@dataclass(frozen=True)
class EncodeLimits:
    max_prompt_length: int
    max_response_length: int


def encode_row(table: RowTable, index: int, processor, limits: EncodeLimits) -> Encoded:
    """Row ``index`` of ``table`` (any published layout, data/rows.py) -> model inputs; raises
    ``BadRow`` (counted and skipped) when unusable. The one per-row function of SFT training."""
    messages, images = row_example(table, index)
    return encode_conversation(processor, messages, images,
                               max_prompt_length=limits.max_prompt_length,
                               max_response_length=limits.max_response_length)


class SFTDataset:
    """The rows of ``files`` as one index space; ``encode(i)`` reads and encodes row i."""

    def __init__(self, sources: Sequence, processor, limits: EncodeLimits, data_cfg=None):
        if not sources:
            raise DataError("no SFT data: set data.train_files (JSONL/JSON/parquet) or "
                            "data.dataset_info + data.datasets")
        self.layouts = SkipStats()
        self.tables = open_tables(sources, data_cfg, self.layouts)   # one line if one is empty
        self.files = [str(t.path) for t in self.tables]
        self._ends = np.cumsum([len(t) for t in self.tables]).tolist()
        self.processor, self.limits = processor, limits

    def describe(self) -> str:
        return ", ".join(f"{Path(t.path).name} ({t.layout}, {len(t)} rows)" for t in self.tables)

    def __len__(self) -> int:
        return self._ends[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, row within that file) of global row ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        file_no = bisect.bisect_right(self._ends, index)
        return file_no, index - (self._ends[file_no - 1] if file_no else 0)

    def encode(self, index: int) -> Encoded:
        file_no, local = self.locate(index)
        return encode_row(self.tables[file_no], local, self.processor, self.limits)


def load_sft_samples(files: Sequence, processor, *, max_prompt_length: int,
                     max_response_length: int, max_skip_fraction: float = 0.01,
                     progress: bool = True, data_cfg=None) -> tuple[list[Encoded], SkipStats]:
    """Encode every usable row of ``files`` in memory (small files: tests, benchmarks); training
    streams with ``StepShards`` instead. Raises if too many rows are unusable."""
    from tqdm import tqdm

    dataset = SFTDataset(files, processor, EncodeLimits(max_prompt_length, max_response_length),
                         data_cfg)
    samples, stats = [], dataset.layouts
    for index in tqdm(range(len(dataset)), desc="encoding SFT rows", disable=not progress,
                      leave=False):
        stats.seen += 1
        try:
            samples.append(dataset.encode(index))
        except BadRow as bad:
            stats.skip(bad)
    log.info("SFT data: %s", stats.summary())
    stats.check(max_skip_fraction)
    return samples, stats


# ---- one step's share of a data-parallel rank -----------------------------------------------

@dataclass(frozen=True)
class StepRequest:
    step: int
    indices: tuple[int, ...]                    # this rank's share of the step's global batch
    sampler_state: dict                         # the sampler once this global batch was drawn


@dataclass
class StepShard:
    """One rank's encoded share of one step, collated at the share's own length."""

    step: int
    batches: list[dict]
    seq_length: int                             # 0 when every row of the share was bad
    seen: int
    skipped: Counter
    tokens: int                                 # loss tokens
    sampler_state: dict

    def vector(self) -> torch.Tensor:
        return torch.tensor([self.seq_length, len(self.batches), self.seen,
                             sum(self.skipped.values()), self.tokens], dtype=torch.long)


class StepRequests(Sampler):
    """Yields one ``StepRequest`` per step: the sampler draws the whole global batch (identical
    on every rank, so resuming and changing the layout between runs keep the data order), this
    rank keeps its share. Runs in the main process, ahead of training by the prefetch depth:
    each request carries the sampler state to checkpoint once its step has been trained."""

    def __init__(self, sampler, steps: range, global_batch_size: int, dp_rank: int, dp_size: int):
        self.sampler, self.steps = sampler, steps
        self.global_batch_size, self.dp_rank, self.dp_size = global_batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[StepRequest]:
        for step in self.steps:
            indices = self.sampler.next_indices(self.global_batch_size)
            yield StepRequest(step, tuple(rank_share(indices, self.dp_rank, self.dp_size)),
                              self.sampler.state_dict())


class StepShards(Dataset):
    """Map-style dataset keyed by ``StepRequest``: encodes the request's rows (and nothing else),
    packs them when ``packing`` (first-fit-decreasing within this share, capacity = its longest
    row) and collates them into micro-batches of ``micro_batch_size`` rows. Deterministic: no
    RNG, so worker processes give the same tensors as the main process."""

    def __init__(self, dataset: SFTDataset, *, micro_batch_size: int, packing: bool, pad_id: int,
                 position_fn):
        self.dataset, self.micro_batch_size, self.packing = dataset, micro_batch_size, packing
        self.pad_id, self.position_fn = pad_id, position_fn
        self.warnings = SkipStats()   # names the first bad rows (file:line) per process

    def __getitem__(self, request: StepRequest) -> StepShard:
        samples, skipped = [], Counter()
        for index in request.indices:
            try:
                samples.append(self.dataset.encode(index))
            except BadRow as bad:
                skipped[bad.reason] += 1
                self.warnings.skip(bad)
        lengths = [len(s.input_ids) for s in samples]
        if self.packing and samples:
            rows = pack_greedy(lengths, max(lengths))
        else:
            rows = [[k] for k in range(len(samples))]
        seq_length = padded_length(max(sum(lengths[k] for k in r) for r in rows)) if rows else 0
        micro = self.micro_batch_size
        rows += [[]] * (-len(rows) % micro)
        batches = [collate(samples, rows[k:k + micro], pad_id=self.pad_id,
                           position_fn=self.position_fn, length=seq_length)
                   for k in range(0, len(rows), micro)]
        tokens = int(sum(b["loss_mask"].sum() for b in batches))
        return StepShard(request.step, batches, seq_length, len(request.indices), skipped, tokens,
                         request.sampler_state)


def _keep(item):
    return item


def step_loader(shards: StepShards, requests: StepRequests, *, num_workers: int,
                prefetch_steps: int) -> DataLoader:
    """Encoding in ``num_workers`` processes (0 = in the main process), at most
    ``prefetch_steps`` steps (rounded up to a multiple of the workers) encoded ahead."""
    kwargs = {}
    if num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fork after tokenizer use
        kwargs = dict(num_workers=num_workers,
                      prefetch_factor=max(1, math.ceil(prefetch_steps / num_workers)))
    return DataLoader(shards, sampler=requests, batch_size=None,
                                       collate_fn=_keep, **kwargs)


# ---- agreeing on the step's shapes across data-parallel ranks ---------------------------------

@dataclass(frozen=True)
class StepTotals:
    seq_length: int                             # every rank pads to this
    micro_batches: int                          # every rank runs this many
    seen: int                                   # summed over the data-parallel ranks
    skipped: int
    tokens: int

    @classmethod
    def from_vectors(cls, vectors: torch.Tensor) -> "StepTotals":
        """From the ranks' ``StepShard.vector()``s stacked as [dp, 5]."""
        top, total = vectors.max(dim=0).values.tolist(), vectors.sum(dim=0).tolist()
        return cls(max(top[0], SEQ_MULTIPLE), max(top[1], 1), total[2], total[3], total[4])


def _device_for(group) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_step(shard: StepShard, group=None) -> StepTotals:
    """One all-gather of 5 numbers over the data-parallel group (a no-op alone)."""
    import torch.distributed as dist

    local = shard.vector()
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return StepTotals.from_vectors(local[None])
    local = local.to(_device_for(group))
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return StepTotals.from_vectors(torch.stack(parts).cpu())


def pad_step(shard: StepShard, totals: StepTotals, *, micro_batch_size: int,
             pad_id: int) -> list[dict]:
    """This rank's micro-batches at the agreed length, plus all-padding micro-batches up to the
    agreed count (no loss tokens: they change nothing but keep the schedule in step)."""
    batches = [pad_batch(b, totals.seq_length, pad_id=pad_id) for b in shard.batches]
    batches += [empty_batch(micro_batch_size, totals.seq_length, pad_id=pad_id)
                for _ in range(totals.micro_batches - len(batches))]
    return batches


# ---- the skip threshold -----------------------------------------------------------------------

@dataclass
class SkipMonitor:
    """Running rows seen/skipped summed over the data-parallel ranks (checkpointed), and this
    rank's skips by reason since start-up (for the log and the error message)."""

    max_skip_fraction: float
    min_rows: int
    seen: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)

    def update(self, totals: StepTotals, shard: StepShard) -> None:
        self.seen += totals.seen
        self.skipped += totals.skipped
        self.reasons.update(shard.skipped)

    def exceeded(self) -> bool:
        return (self.seen >= self.min_rows and self.seen > 0
                and self.skipped / self.seen > self.max_skip_fraction)

    def check(self, reasons: Counter | None = None) -> None:
        """Raise ``TooManyBadRows`` (one line) when the threshold is exceeded; ``reasons``: the
        skips by reason of every rank (default: this rank's)."""
        if not self.exceeded():
            return
        reasons = self.reasons if reasons is None else reasons
        detail = ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())) or "none"
        raise TooManyBadRows(
            f"too many unusable SFT rows: {self.skipped} of the first {self.seen} rows read from "
            f"data.train_files were skipped ({self.skipped / self.seen:.1%} > "
            f"data.max_skip_fraction={self.max_skip_fraction}; by reason: {detail}); fix or "
            f"remove those rows, or raise data.max_skip_fraction")

    def state_dict(self) -> dict:
        return {"seen": self.seen, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.skipped = int(state.get("seen", 0)), int(state.get("skipped", 0))


def gather_reasons(reasons: Counter, group=None) -> Counter:
    """Every data-parallel rank's skips by reason, summed (only on the failing path)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return Counter(reasons)
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, dict(reasons), group=group)
    return sum((Counter(p) for p in parts), Counter())
