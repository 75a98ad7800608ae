"""Megatron's legacy per-rank checkpoint: ``mp_rank_TT[_PPP]/model_optim_rng.pt`` files.

Each file holds ``{"model": state_dict, "checkpoint_version": 3.0, "iteration": N}`` where the
state_dict is exactly what that rank's module has: TP shards, and decoder layers numbered from
0 on every pipeline stage (megatron's TransformerBlock numbers its ModuleList locally).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import torch

from prism_megatron.weights.ckpt_layout import legacy_rank_dir_name, legacy_rank_dirs
from prism_megatron.weights.errors import ConversionError
from prism_megatron.weights.table import NameIndex, fill, placeholder_of

CHECKPOINT_VERSION = 3.0
FILE_NAME = "model_optim_rng.pt"


def write_rank_file(ckpt_dir: Path, tp_rank: int, pp_rank: int, pp: int, model_sd: dict,
                    iteration: int, extra: dict | None = None) -> Path:
    d = ckpt_dir / legacy_rank_dir_name(tp_rank, pp_rank, pp)
    d.mkdir(parents=True, exist_ok=True)
    payload = {"model": model_sd, "checkpoint_version": CHECKPOINT_VERSION,
               "iteration": iteration, **(extra or {})}
    # The zip CRC32 costs as much as the write itself and torch.load never checks it.
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(payload, d / FILE_NAME)
    finally:
        torch.serialization.set_crc32_options(crc)
    return d / FILE_NAME


def load_rank_file(path: Path) -> dict:
    """The "model" state_dict of one rank file, memory-mapped (tensors are read on use)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - Megatron-LM files also pickle argparse/numpy objects
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if "model" not in payload:
        if any(k.startswith("model") and k[5:].isdigit() for k in payload):
            raise ConversionError(f"{path}: virtual-pipeline checkpoints (model0, model1, ...) "
                                  f"are not supported")
        raise ConversionError(f"{path} has no 'model' state_dict")
    return payload["model"]


def is_extra_state(name: str) -> bool:
    return name.endswith("._extra_state")


class LegacyReader:
    """The TP shards of every Megatron tensor (globally numbered) of a legacy checkpoint, one
    pipeline stage at a time."""

    def __init__(self, ckpt_dir: Path, index: NameIndex, pipelined: str):
        self.dir = ckpt_dir
        self.index = index
        self.pipelined = pipelined
        self.ranks = legacy_rank_dirs(ckpt_dir)
        self.tp = max(t for t, _ in self.ranks) + 1
        self.pp = max(p for _, p in self.ranks) + 1
        self.unexpected: list[str] = []
        self.incomplete: list[str] = []  # present on some TP ranks only
        # Names are scanned on every rank up front (files are memory-mapped, so this reads only
        # the pickled key lists) so all problems are reported before anything is written.
        local, local_dtypes = [], []
        self._dtypes: dict[str, torch.dtype] = {}
        for stage in range(self.pp):
            sds = [load_rank_file(self._file(t, stage)) for t in range(self.tp)]
            per_rank = [set(sd) for sd in sds]
            dtypes = {k: v.dtype for k, v in sds[0].items() if isinstance(v, torch.Tensor)}
            del sds
            resolved = {}
            for raw in sorted(set().union(*per_rank)):
                if is_extra_state(raw):
                    continue
                hit = index.lookup(raw)
                if hit is None:
                    self.unexpected.append(f"{raw} (pipeline stage {stage})")
                    continue
                absent = [t for t in range(self.tp) if raw not in per_rank[t]]
                if absent:
                    self.incomplete.append(f"{raw} (pipeline stage {stage}, absent on "
                                           f"tensor-parallel rank(s) {absent})")
                    continue
                resolved[raw] = hit
            local.append(resolved)
            local_dtypes.append(dtypes)
        self.stage_counts = [
            1 + max((i for r, i in st.values() if placeholder_of(r.megatron) == pipelined),
                    default=-1) for st in local]
        offsets = [sum(self.stage_counts[:s]) for s in range(self.pp)]
        # raw (stage-local) name -> canonical global name, per stage.
        self._names: list[dict[str, str]] = []
        seen: dict[str, str] = {}
        for stage, st in enumerate(local):
            names = {}
            for raw, (rule, i) in st.items():
                ph = placeholder_of(rule.megatron)
                gi = i + offsets[stage] if ph == pipelined else i
                canonical = fill(rule.megatron, ph, gi)
                if canonical in seen and not rule.tied_to:
                    raise ConversionError(f"{canonical} appears twice in {ckpt_dir} (as "
                                          f"{seen[canonical]} and as {raw})")
                seen[canonical] = raw
                names[raw] = canonical
                self._dtypes[canonical] = local_dtypes[stage][raw]
            self._names.append(names)

    def _file(self, tp_rank: int, stage: int) -> Path:
        return self.ranks[(tp_rank, stage)] / FILE_NAME

    def names(self) -> list[str]:
        """Canonical names, in the order ``tensors()`` yields them."""
        return [n for st in self._names for n in st.values()]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def close(self) -> None:
        pass

    def tensors(self) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """``(canonical name, [TP shards])``, one pipeline stage's files mapped at a time."""
        for stage in range(self.pp):
            sds = [load_rank_file(self._file(t, stage)) for t in range(self.tp)]
            for raw, canonical in self._names[stage].items():
                yield canonical, [sd[raw] for sd in sds]
            del sds
