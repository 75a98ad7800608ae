"""Mapping tables: expansion of rule patterns, name lookup both ways, table coverage checks.

A family (one HF ``model_type``) contributes a list of rules and a ``describe(hf_config)``
function returning a ``ModelInfo`` (index counts, attention geometry, vocabulary, tying). All the
name handling lives here once: ``{placeholder}`` expansion, pipeline-local renaming, TE-spec
aliases, and the "stacked" names megatron's dist_checkpointing gives to TransformerBlock layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from prism_megatron.weights.errors import ConversionError
from prism_megatron.weights.rules import Dims, HeadLayout, Rule

_PLACEHOLDER = re.compile(r"\{(\w+)\}")

@dataclass(frozen=True)
class IndexSpec:
    """How many instances an index placeholder has and how megatron treats it.

    ``pipelined``: the decoder-layer index, distributed over pipeline stages (legacy checkpoints
    use stage-local numbering). ``stacked``: the layers of a megatron TransformerBlock, which
    ``dist_checkpointing`` stores as one tensor per parameter with a leading layer axis.
    """

    count: int
    pipelined: bool = False
    stacked: bool = False


@dataclass
class ModelInfo:
    """What a family reads from one HF config."""

    indices: dict[str, IndexSpec]
    heads: dict[str, HeadLayout]       # e.g. {"text": ..., "vision": ...}
    head_labels: dict[str, str]        # "text" -> "text_config" (for error messages)
    vocab_size: int
    tie_word_embeddings: bool

    @property
    def pipelined_index(self) -> str:
        names = [n for n, s in self.indices.items() if s.pipelined]
        if len(names) != 1:
            raise ConversionError(f"expected exactly one pipelined index, got {names}")
        return names[0]

    @property
    def num_layers(self) -> int:
        return self.indices[self.pipelined_index].count

    def dims(self, padded_vocab_size: int) -> Dims:
        return Dims(heads=self.heads, vocab_size=self.vocab_size,
                    padded_vocab_size=padded_vocab_size)


@dataclass
class Family:
    """A model family: its mapping table and the hooks the generic machinery calls."""

    model_type: str
    rules: list[Rule]
    describe: Callable[[object], ModelInfo]          # transformers config -> ModelInfo
    hf_model_class: str                              # transformers class, for expected shapes
    # Builds megatron's model for torch_dist templates and verification (may be None while a
    # family has no Megatron model yet): (hf_config, padded_vocab_size) -> MegatronModule.
    build_megatron_model: Callable | None = None
    _matchers: list = field(default_factory=list, repr=False)


# --- one rule instance ------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """A rule with its placeholder filled in: concrete (global) Megatron and HF names."""

    rule: Rule
    megatron: str
    hf: tuple[str, ...]
    placeholder: str | None = None
    index: int | None = None


def placeholder_of(pattern: str) -> str | None:
    found = _PLACEHOLDER.findall(pattern)
    if len(found) > 1:
        raise ConversionError(f"pattern {pattern!r} has more than one placeholder")
    return found[0] if found else None


def fill(pattern: str, placeholder: str | None, index: int | None) -> str:
    return pattern if placeholder is None else pattern.replace("{" + placeholder + "}", str(index))


def expand(rules: list[Rule], info: ModelInfo) -> list[Entry]:
    """Every concrete tensor of the model, in table order (layer-major within a rule)."""
    entries = []
    for rule in rules:
        ph = placeholder_of(rule.megatron)
        if ph is None:
            entries.append(Entry(rule, rule.megatron, rule.hf))
            continue
        if ph not in info.indices:
            raise ConversionError(f"rule {rule.megatron!r}: unknown placeholder {{{ph}}}")
        for i in range(info.indices[ph].count):
            entries.append(Entry(rule, fill(rule.megatron, ph, i),
                                 tuple(fill(h, ph, i) for h in rule.hf), ph, i))
    return entries


# --- reverse lookup: a Megatron name (or alias, or stacked dist key) -> rule ------------------

def _matcher(pattern: str) -> re.Pattern:
    ph = placeholder_of(pattern)
    if ph is None:
        return re.compile(re.escape(pattern) + r"\Z")
    head, tail = pattern.split("{" + ph + "}")
    return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + r"\Z")


class NameIndex:
    """Looks Megatron names up in a rule list. Names may be canonical or aliases; the index
    found is whatever the name carries (stage-local in legacy files)."""

    def __init__(self, rules: list[Rule]):
        self._exact: dict[str, Rule] = {}
        self._patterns: list[tuple[re.Pattern, Rule]] = []
        self._stacked: dict[str, Rule] = {}
        for rule in rules:
            for name in (rule.megatron, *rule.aliases):
                ph = placeholder_of(name)
                if ph is None:
                    self._exact[name] = rule
                else:
                    self._patterns.append((_matcher(name), rule))
                    self._stacked[name.replace("{" + ph + "}.", "")] = rule

    def lookup(self, name: str) -> tuple[Rule, int | None] | None:
        if name in self._exact:
            return self._exact[name], None
        for regex, rule in self._patterns:
            m = regex.match(name)
            if m:
                return rule, int(m.group(1))
        return None

    def lookup_stacked(self, key: str) -> Rule | None:
        """dist_checkpointing key of a stacked TransformerBlock parameter (no layer index)."""
        return self._stacked.get(key)


# --- expected HF tensors ----------------------------------------------------------------------

def expected_hf_names(entries: list[Entry], info: ModelInfo) -> list[str]:
    names = []
    for e in entries:
        if e.rule.tied_to and info.tie_word_embeddings:
            continue  # tied output layer: HF checkpoints have no lm_head
        names.extend(e.hf)
    return names


def hf_reference_shapes(family: Family, hf_config) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of transformers' own model for this config (built on the meta device,
    so nothing is allocated). This is the ground truth for HF-side name and shape checks."""
    import torch
    import transformers

    cls = getattr(transformers, family.hf_model_class)
    with torch.device("meta"):
        model = cls(hf_config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_table_covers(family: Family, entries: list[Entry], info: ModelInfo,
                       reference: dict[str, tuple[int, ...]]) -> None:
    """The table must map every parameter of transformers' model and nothing else."""
    mapped = set(expected_hf_names(entries, info))
    ref = set(reference)
    if info.tie_word_embeddings:
        ref -= {h for e in entries if e.rule.tied_to for h in e.hf}
    if mapped != ref:
        raise ConversionError(
            f"the {family.model_type} mapping table does not match transformers' "
            f"{family.hf_model_class}: unmapped HF parameters [{', '.join(sorted(ref - mapped))}]"
            f", mapped names that transformers lacks [{', '.join(sorted(mapped - ref))}]")
