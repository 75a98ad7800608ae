"""HF safetensors -> Megatron checkpoint (legacy per-rank files or torch_dist)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from prism_megatron.weights import ckpt_layout as lay
from prism_megatron.weights.errors import ConversionError, name_list
from prism_megatron.convert.fsutil import atomic_output_dir, check_output
from prism_megatron.convert.hf_io import HFReader, load_hf_config
from prism_megatron.weights.layout import (
    PipelineLayout, check_tensor_parallel, make_layout, padded_vocab_size)
from prism_megatron.weights.legacy import write_rank_file
from prism_megatron.weights.rules import Dims
from prism_megatron.convert.families import get_family
from prism_megatron.weights.table import (
    Entry, Family, ModelInfo, check_table_covers, expand, expected_hf_names, hf_reference_shapes)

FORMATS = ("legacy", "torch_dist")


@dataclass
class HFSource:
    """An HF checkpoint opened and validated against its family's mapping table."""

    dir: Path
    config: object
    family: Family
    info: ModelInfo
    entries: list[Entry]
    reader: HFReader

    def source(self, entry: Entry) -> tuple[Entry, list[torch.Tensor]]:
        """The entry whose HF tensors feed ``entry`` (a tied output layer copies the
        embedding), and those tensors."""
        if entry.rule.tied_to and self.info.tie_word_embeddings:
            entry = next(e for e in self.entries if e.megatron == entry.rule.tied_to)
        return entry, [self.reader.get(h) for h in entry.hf]

    def full_tensor(self, entry: Entry, dims: Dims) -> torch.Tensor:
        """The full (TP=1) Megatron tensor of ``entry``."""
        entry, tensors = self.source(entry)
        return entry.rule.to_megatron(tensors, dims)

    def shards(self, entry: Entry, tp: int, dims: Dims) -> list[torch.Tensor]:
        """``entry``'s TP shards, built from the HF tensors with a single copy."""
        entry, tensors = self.source(entry)
        return entry.rule.shards(tensors, tp, dims)


def open_hf_source(hf_dir: str | Path) -> HFSource:
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"HF checkpoint directory {hf_dir} does not exist")
    config = load_hf_config(hf_dir)
    family = get_family(config.model_type)
    info = family.describe(config)
    entries = expand(family.rules, info)
    reader = HFReader(hf_dir)
    src = HFSource(hf_dir, config, family, info, entries, reader)
    _validate(src)
    return src


def _validate(src: HFSource) -> None:
    """Names first (missing / unexpected, each listed), then shapes against transformers' own
    model for this config — all before anything is written."""
    expected = expected_hf_names(src.entries, src.info)
    present = set(src.reader.names())
    # A tied checkpoint may still carry a redundant lm_head; it is ignored, not an error.
    ignorable = ({h for e in src.entries if e.rule.tied_to for h in e.hf}
                 if src.info.tie_word_embeddings else set())
    missing = [n for n in expected if n not in present]
    unexpected = present - set(expected) - ignorable
    problems = []
    if missing:
        problems.append(f"missing tensors: {name_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {name_list(unexpected)}")
    if problems:
        raise ConversionError(f"{src.dir} does not match a {src.family.model_type} model with "
                              f"this config.json — " + "; ".join(problems))
    reference = hf_reference_shapes(src.family, src.config)
    check_table_covers(src.family, src.entries, src.info, reference)
    bad = [f"{n} has shape {src.reader.shape(n)}, config.json implies {reference[n]}"
           for n in expected if src.reader.shape(n) != reference[n]]
    if bad:
        raise ConversionError("shape mismatch: " + "; ".join(bad[:20])
                              + (f" (+{len(bad) - 20} more)" if len(bad) > 20 else ""))


def _write_legacy(ckpt: Path, src: HFSource, layout: PipelineLayout, tp: int, dims: Dims,
                  iteration: int, progress: bool) -> None:
    """One pipeline stage at a time: all TP shards of that stage are built (1/PP of the model),
    written, and dropped before the next stage is read."""
    tied = src.info.tie_word_embeddings
    bar = tqdm(total=len(src.entries), desc="hf->legacy", unit="tensor", disable=not progress)
    for stage in range(layout.pp):
        shards: list[dict] = [{} for _ in range(tp)]
        for entry in src.entries:
            if layout.stage_of(entry) != stage:
                continue
            bar.update(1)
            name = layout.local_name(entry)
            # Tied output layer: only a PP>1 last stage owns a copy of the embedding (megatron
            # syncs it from the first stage); with PP=1 the embedding itself is used.
            if not (entry.rule.tied_to and tied and layout.pp == 1):
                parts = src.shards(entry, tp, dims)
                for r in range(tp):
                    shards[r][name] = parts[r]
            if entry.rule.extra_state:
                module = name.rsplit(".", 1)[0]
                for r in range(tp):
                    shards[r][f"{module}._extra_state"] = None
        for r in range(tp):
            write_rank_file(ckpt, r, stage, layout.pp, shards[r], iteration,
                            extra={"prism_convert": {"tp_rank": r, "pp_rank": stage,
                                                     "stage_layers": list(layout.counts)}})
        del shards
    bar.close()


def convert_hf_to_megatron(hf_dir: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1,
                           pp_layers: list[int] | None = None, first_stage_layers: int | None = None,
                           last_stage_layers: int | None = None, fmt: str = "legacy",
                           make_vocab_size_divisible_by: int = 128, iteration: int = 0,
                           release: bool = False, force: bool = False,
                           progress: bool = True) -> dict:
    """Convert; returns the manifest written to ``OUT/prism_convert.json``."""
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    check_output(out, force)  # fail before the (possibly slow) validation
    src = open_hf_source(hf_dir)
    check_tensor_parallel(src.info, tp)
    layout = make_layout(src.info, pp, pp_layers, first_stage_layers, last_stage_layers)
    padded = padded_vocab_size(src.info.vocab_size, tp, make_vocab_size_divisible_by)
    dims = src.info.dims(padded)
    manifest = {
        "format": fmt, "model_type": src.family.model_type, "tp": tp, "pp": pp,
        "pp_layers": list(layout.counts), "vocab_size": src.info.vocab_size,
        "padded_vocab_size": padded,
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "tie_word_embeddings": src.info.tie_word_embeddings, "iteration": iteration,
        "release": release, "source": str(Path(hf_dir).resolve()),
    }
    with atomic_output_dir(out, force) as tmp:
        ckpt = tmp / lay.iteration_dir_name(iteration, release)
        ckpt.mkdir()
        if fmt == "legacy":
            _write_legacy(ckpt, src, layout, tp, dims, iteration, progress)
        else:
            from prism_megatron.convert.torch_dist import write_torch_dist

            write_torch_dist(ckpt, src, dims, iteration, progress)
        lay.write_tracker(tmp, iteration, release)
        (tmp / lay.HF_CONFIG_DIR).mkdir()
        for name in ("config.json", "generation_config.json"):
            if (Path(hf_dir) / name).is_file():
                shutil.copy2(Path(hf_dir) / name, tmp / lay.HF_CONFIG_DIR / name)
        (tmp / lay.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    src.reader.close()
    return manifest
