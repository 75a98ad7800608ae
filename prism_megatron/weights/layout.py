"""Parallel layout: decoder layers per pipeline stage, where each tensor lives, vocab padding
(its size and the padding columns of a logits shard)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prism_megatron.weights.errors import ConversionError
from prism_megatron.weights.table import Entry, ModelInfo, fill


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's rule: round up to a multiple of ``make_vocab_size_divisible_by * TP``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def vocab_padding(start: int, width: int, vocab_size: int, device=None) -> torch.Tensor | None:
    """Which of the logit columns ``start .. start + width`` (this TP rank's shard of the padded
    vocabulary, or all of it with ``start=0``) are padding rows, beyond the real ``vocab_size``;
    None when the shard has none. Padding must never enter a softmax: the HF model and the
    rollout engines have no such tokens."""
    if start + width <= vocab_size:
        return None
    return torch.arange(start, start + width, device=device) >= vocab_size


def stage_layer_counts(num_layers: int, pp: int, pp_layers: list[int] | None = None,
                       first: int | None = None, last: int | None = None) -> list[int]:
    """Decoder layers on each pipeline stage.

    ``pp_layers`` gives every stage explicitly (``--pp-layers 1,3``). ``first``/``last`` follow
    megatron's ``decoder_first/last_pipeline_num_layers``: the remaining layers are spread evenly
    over the other stages. Without either, the layers must divide evenly.
    """
    if pp < 1:
        raise ConversionError(f"--pp must be >= 1, got {pp}")
    if num_layers < pp:
        raise ConversionError(
            f"the model has {num_layers} decoder layers, fewer than pp={pp} pipeline stages; "
            f"every stage needs at least one layer")
    if pp_layers is not None:
        if first is not None or last is not None:
            raise ConversionError("give either --pp-layers or --decoder-first/last-pipeline-"
                                  "num-layers, not both")
        counts = list(pp_layers)
        if len(counts) != pp:
            raise ConversionError(f"--pp-layers lists {len(counts)} stages but pp={pp}")
    else:
        fixed = {0: first, pp - 1: last} if pp > 1 else {}
        fixed = {s: n for s, n in fixed.items() if n is not None}
        if pp == 1 and (first is not None or last is not None):
            raise ConversionError("decoder first/last pipeline layer counts need pp > 1")
        free = [s for s in range(pp) if s not in fixed]
        remaining = num_layers - sum(fixed.values())
        if free and remaining % len(free):
            what = "decoder layers" if not fixed else "layers left after the first/last stage"
            raise ConversionError(
                f"{remaining} {what} do not split evenly over {len(free)} pipeline stages; "
                f"pass --pp-layers (e.g. {','.join(map(str, _suggest(remaining, len(free))))})")
        per = remaining // len(free) if free else 0
        counts = [fixed.get(s, per) for s in range(pp)]
    if sum(counts) != num_layers or min(counts) < 1:
        raise ConversionError(
            f"pipeline split {counts} must give every stage >= 1 layer and sum to the "
            f"model's {num_layers} decoder layers")
    if len(set(counts[1:-1])) > 1:
        # megatron-core (num_layers_in_first/last_pipeline_stage) can only make the first and
        # last stage differ; a checkpoint with another split could never be loaded.
        raise ConversionError(f"pipeline split {counts}: the middle stages must hold equal layer "
                              f"counts (only the first and last stage may differ)")
    return counts


def stage_layer_counts_of(config) -> list[int]:
    """Decoder layers on each pipeline stage of a model built from megatron ``config`` (a
    TransformerConfig: ``num_layers``, ``pipeline_model_parallel_size`` and the uneven split's
    ``num_layers_in_first/last_pipeline_stage``) — what a rank needs to place another stage's
    layers without parsing parameter names."""
    return stage_layer_counts(config.num_layers, config.pipeline_model_parallel_size or 1,
                              first=getattr(config, "num_layers_in_first_pipeline_stage", None),
                              last=getattr(config, "num_layers_in_last_pipeline_stage", None))


def _suggest(n: int, k: int) -> list[int]:
    return [n // k + (1 if s < n % k else 0) for s in range(k)]


@dataclass(frozen=True)
class PipelineLayout:
    """Placement of entries on stages, and global <-> stage-local layer renaming."""

    counts: tuple[int, ...]
    pipelined: str  # the placeholder distributed over stages, e.g. "layer"

    @property
    def pp(self) -> int:
        return len(self.counts)

    def offset(self, stage: int) -> int:
        return sum(self.counts[:stage])

    def stage_of_layer(self, layer: int) -> int:
        for stage in range(self.pp):
            if layer < self.offset(stage + 1):
                return stage
        raise ConversionError(f"layer {layer} is beyond the {sum(self.counts)} decoder layers")

    def stage_of(self, entry: Entry) -> int:
        if entry.placeholder == self.pipelined:
            return self.stage_of_layer(entry.index)
        stage = entry.rule.stage or "first"
        if stage not in ("first", "last"):
            raise ConversionError(f"rule {entry.rule.megatron!r}: unknown stage {stage!r}")
        return 0 if stage == "first" else self.pp - 1

    def local_name(self, entry: Entry) -> str:
        """The name in a legacy per-stage state_dict: decoder layers numbered from 0 per stage."""
        if entry.placeholder != self.pipelined:
            return entry.megatron
        local = entry.index - self.offset(self.stage_of_layer(entry.index))
        return fill(entry.rule.megatron, entry.placeholder, local)

    def global_index(self, stage: int, local: int) -> int:
        return self.offset(stage) + local


def make_layout(info: ModelInfo, pp: int, pp_layers=None, first=None, last=None
                ) -> PipelineLayout:
    counts = stage_layer_counts(info.num_layers, pp, pp_layers, first, last)
    return PipelineLayout(tuple(counts), info.pipelined_index)


def check_tensor_parallel(info: ModelInfo, tp: int) -> None:
    """Megatron splits attention by heads and key/value groups: both must divide by TP."""
    if tp < 1:
        raise ConversionError(f"--tp must be >= 1, got {tp}")
    problems = []
    for name, h in info.heads.items():
        label = info.head_labels.get(name, name)
        if h.num_heads % tp:
            problems.append(f"{label} has {h.num_heads} attention heads")
        if h.num_groups != h.num_heads and h.num_groups % tp:
            problems.append(f"{label} has {h.num_groups} key/value heads (num_key_value_heads)")
    if problems:
        raise ConversionError(f"tp={tp} does not divide the attention heads: "
                              + "; ".join(problems) + " — choose a tp that divides them")
