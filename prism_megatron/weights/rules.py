"""Typed conversion rules: how one Megatron tensor relates to one or more HF tensors.

A model family's mapping table is a list of these (see ``prism_megatron/models/*/mapping.py``).
Each rule knows four things and nothing about files, stages or ranks:

* ``to_megatron(hf_tensors)`` -> the *full* Megatron tensor (the TP=1 layout, which is also the
  global tensor megatron's ``dist_checkpointing`` stores);
* ``to_hf(full)`` -> the HF tensors, the exact inverse;
* ``split(full, tp)`` -> the per-TP-rank shards of megatron's tensor-parallel layers;
* ``merge(shards)`` -> the full tensor again.

All four only slice, reshape and concatenate, so a round trip is bit-exact. Names are patterns
that may contain one index placeholder (``{layer}``, ``{vision_layer}``, ...); expanding them is
the table machinery's job (``weights/table.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prism_megatron.weights.errors import ConversionError


@dataclass(frozen=True)
class HeadLayout:
    """Attention geometry a fused-QKV rule needs. Vision MHA: ``num_groups == num_heads``."""

    num_heads: int
    num_groups: int
    head_dim: int


@dataclass
class Dims:
    """Per-model numbers the rules need (filled by the family from the HF config)."""

    heads: dict[str, HeadLayout]
    vocab_size: int
    padded_vocab_size: int


def _own(t: torch.Tensor) -> torch.Tensor:
    """A tensor with its own compact storage.

    ``torch.save`` of a view writes the whole base storage and safetensors refuses tensors that
    share memory, so every shard / exported tensor that is a slice is copied once here (a
    tensor that already spans its whole storage, e.g. one read from safetensors, is not).
    """
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.clone(memory_format=torch.contiguous_format)
    return t


def _exact_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous slice as a tensor whose storage is exactly its bytes, without copying.

    Row blocks (dim-0 chunks) of a contiguous tensor are contiguous; re-wrapping their memory
    makes ``torch.save`` write just the block. This saves allocating (and page-faulting) a fresh
    copy of every column-parallel shard, the dominant cost of a conversion.
    """
    if t.numel() == 0 or not t.is_contiguous():
        return _own(t)
    raw = t.view(torch.uint8).reshape(-1).numpy()
    return torch.frombuffer(raw, dtype=t.dtype).view(t.shape)


def _chunk(full: torch.Tensor, tp: int, dim: int, name: str) -> list[torch.Tensor]:
    if full.dim() <= dim:
        raise ConversionError(f"{name}: a {full.dim()}-D tensor cannot be split along dim {dim}")
    if full.shape[dim] % tp:
        raise ConversionError(
            f"{name}: dimension {dim} of shape {tuple(full.shape)} is not divisible by tp={tp}")
    if tp == 1:
        return [_own(full)]
    return [(_exact_view if dim == 0 else _own)(c) for c in torch.chunk(full, tp, dim=dim)]


def _cat(shards: list[torch.Tensor], dim: int, name: str) -> torch.Tensor:
    shapes = {tuple(s.shape) for s in shards}
    if len(shapes) != 1:
        raise ConversionError(f"{name}: TP shards have different shapes {sorted(shapes)}")
    return torch.cat(shards, dim=dim) if len(shards) > 1 else shards[0]


@dataclass(frozen=True)
class Rule:
    """Base rule: one Megatron tensor <-> ``hf`` tensors (one unless the kind fuses several).

    ``aliases``: other Megatron names of the same tensor (the transformer-engine spec fuses the
    norms into the following linear: ``linear_qkv.layer_norm_weight``); readers accept them.
    ``stage``: pipeline placement, ``"first"``/``"last"``, or derived from a ``{layer}``
    placeholder. ``extra_state``: megatron's module writes ``<module>._extra_state`` (None on
    the local spec) into its state_dict; legacy checkpoints carry it so a strict load works.
    ``tied_to``: with ``tie_word_embeddings`` this tensor has no HF source and is a copy of
    that Megatron tensor (the output layer sharing the word embeddings).
    """

    megatron: str
    hf: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    stage: str | None = None
    extra_state: bool = False
    tied_to: str | None = None
    kind: str = field(default="replicated", init=False)

    # --- per-kind behaviour -------------------------------------------------------------------
    def to_megatron(self, hf: list[torch.Tensor], dims: Dims) -> torch.Tensor:
        (t,) = hf
        return t

    def to_hf(self, full: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
        return [full]

    def split(self, full: torch.Tensor, tp: int, dims: Dims) -> list[torch.Tensor]:
        return [full] * tp

    def merge(self, shards: list[torch.Tensor], dims: Dims) -> torch.Tensor:
        # Replicated: every TP rank holds the same tensor; megatron keeps them in sync.
        return shards[0]

    # --- fused paths the converters use: HF -> TP shards and back with one copy of the data.
    # Defaults compose the primitives; kinds override them where that saves a full copy.
    def shards(self, hf: list[torch.Tensor], tp: int, dims: Dims) -> list[torch.Tensor]:
        return self.split(self.to_megatron(hf, dims), tp, dims)

    def merge_to_hf(self, shards: list[torch.Tensor], dims: Dims) -> list[torch.Tensor]:
        return self.to_hf(self.merge(shards, dims), dims)


@dataclass(frozen=True)
class Replicated(Rule):
    """Same tensor on every TP rank: norms, biases of row-parallel layers, vision embeddings."""

    kind: str = field(default="replicated", init=False)

    def shards(self, hf, tp, dims):
        return [_own(hf[0])] * tp

    def merge_to_hf(self, shards, dims):
        return [_own(shards[0])]


@dataclass(frozen=True)
class Column(Rule):
    """Column-parallel linear (weight or bias): output features (dim 0) split across TP."""

    kind: str = field(default="column", init=False)

    def split(self, full, tp, dims):
        return _chunk(full, tp, 0, self.megatron)

    def merge(self, shards, dims):
        return _cat(shards, 0, self.megatron)


@dataclass(frozen=True)
class Row(Rule):
    """Row-parallel linear weight: input features (dim 1) split across TP.

    Its bias is added after the all-reduce, so it is a ``Replicated`` rule of its own.
    """

    kind: str = field(default="row", init=False)

    def split(self, full, tp, dims):
        return _chunk(full, tp, 1, self.megatron)

    def merge(self, shards, dims):
        return _cat(shards, 1, self.megatron)


@dataclass(frozen=True)
class QKV(Column):
    """Fused QKV in megatron's per-query-group layout (weight or bias).

    For each query group g: the rows of g's query heads, then g's key head, then g's value head.
    HF sources are either ``(q_proj, k_proj, v_proj)`` or one fused ``[q; k; v]`` tensor
    (``fused_hf=True``, the vision tower). ``heads`` names the ``Dims.heads`` entry to use.
    TP splits whole groups, so each rank gets complete (q..., k, v) groups.
    """

    heads: str = "text"
    fused_hf: bool = False
    kind: str = field(default="qkv", init=False)

    def _layout(self, dims: Dims) -> tuple[int, int, int]:
        h = dims.heads[self.heads]
        return h.num_groups, h.num_heads // h.num_groups, h.head_dim

    def to_megatron(self, hf, dims):
        ng, per_group, hd = self._layout(dims)
        if self.fused_hf:
            (fused,) = hf
            q, k, v = torch.split(fused, [ng * per_group * hd, ng * hd, ng * hd], dim=0)
        else:
            q, k, v = hf
        rest = q.shape[1:]
        groups = [q.reshape(ng, per_group * hd, *rest), k.reshape(ng, hd, *rest),
                  v.reshape(ng, hd, *rest)]
        return torch.cat(groups, dim=1).reshape(ng * (per_group + 2) * hd, *rest)

    def to_hf(self, full, dims):
        ng, per_group, hd = self._layout(dims)
        rest = full.shape[1:]
        q, k, v = torch.split(full.reshape(ng, (per_group + 2) * hd, *rest),
                              [per_group * hd, hd, hd], dim=1)
        q, k, v = (x.reshape(-1, *rest) for x in (q, k, v))
        if self.fused_hf:
            return [torch.cat([q, k, v], dim=0)]
        return [_own(q), _own(k), _own(v)]

    def shards(self, hf, tp, dims):
        ng, per_group, hd = self._layout(dims)
        if ng % tp:
            raise ConversionError(f"{self.megatron}: {ng} query groups are not divisible by "
                                  f"tp={tp}")
        if self.fused_hf:
            hf = torch.split(hf[0], [ng * per_group * hd, ng * hd, ng * hd], dim=0)
        q, k, v = hf
        rest = q.shape[1:]
        groups = [q.reshape(ng, per_group * hd, *rest), k.reshape(ng, hd, *rest),
                  v.reshape(ng, hd, *rest)]
        n = ng // tp
        return [torch.cat([g[r * n:(r + 1) * n] for g in groups], dim=1).reshape(-1, *rest)
                for r in range(tp)]

    def merge_to_hf(self, shards, dims):
        ng, per_group, hd = self._layout(dims)
        _cat(shards, 0, self.megatron)  # shape check only
        rest = shards[0].shape[1:]
        n = ng // len(shards)
        parts = [torch.split(s.reshape(n, (per_group + 2) * hd, *rest),
                             [per_group * hd, hd, hd], dim=1) for s in shards]
        q, k, v = (torch.cat([p[i] for p in parts], dim=0).reshape(-1, *rest) for i in range(3))
        if self.fused_hf:
            return [torch.cat([q, k, v], dim=0)]
        return [q, k, v]


@dataclass(frozen=True)
class GatedMLP(Column):
    """SwiGLU ``linear_fc1`` from HF ``(gate_proj, up_proj)``.

    Full tensor: ``[gate; up]`` (also what dist_checkpointing stores: megatron's swiglu factory
    saves the two halves as separate shards of one global ``[gate; up]`` tensor). TP rank r holds
    ``[gate_r; up_r]`` because megatron's activation chunks the *local* output in two.
    """

    kind: str = field(default="gated_mlp", init=False)

    def to_megatron(self, hf, dims):
        gate, up = hf
        if gate.shape != up.shape:
            raise ConversionError(f"{self.megatron}: gate {tuple(gate.shape)} and up "
                                  f"{tuple(up.shape)} projections differ in shape")
        return torch.cat([gate, up], dim=0)

    def to_hf(self, full, dims):
        return [_own(x) for x in torch.chunk(full, 2, dim=0)]

    def split(self, full, tp, dims):
        return self.shards(list(torch.chunk(full, 2, dim=0)), tp, dims)

    def merge(self, shards, dims):
        return torch.cat(self.merge_to_hf(shards, dims), dim=0)

    def shards(self, hf, tp, dims):
        gate, up = hf
        if gate.shape != up.shape:
            raise ConversionError(f"{self.megatron}: gate {tuple(gate.shape)} and up "
                                  f"{tuple(up.shape)} projections differ in shape")
        if gate.shape[0] % tp:
            raise ConversionError(f"{self.megatron}: {gate.shape[0]} rows per projection are "
                                  f"not divisible by tp={tp}")
        return [torch.cat([g, u], dim=0)
                for g, u in zip(torch.chunk(gate, tp, dim=0), torch.chunk(up, tp, dim=0))]

    def merge_to_hf(self, shards, dims):
        _cat(shards, 0, self.megatron)  # shape check only
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]


@dataclass(frozen=True)
class Vocab(Column):
    """Vocab-parallel embedding / output layer: rows padded with zeros to
    ``dims.padded_vocab_size`` (a multiple of make_vocab_size_divisible_by * TP), split by rows;
    the padding is stripped again on export."""

    kind: str = field(default="vocab", init=False)

    def to_megatron(self, hf, dims):
        (t,) = hf
        pad = dims.padded_vocab_size - t.shape[0]
        if pad < 0:
            raise ConversionError(f"{self.megatron}: {t.shape[0]} rows exceed the padded "
                                  f"vocabulary {dims.padded_vocab_size}")
        if pad == 0:
            return t
        return torch.cat([t, t.new_zeros((pad, *t.shape[1:]))], dim=0)

    def to_hf(self, full, dims):
        if full.shape[0] < dims.vocab_size:
            raise ConversionError(f"{self.megatron}: {full.shape[0]} rows, fewer than the "
                                  f"vocabulary size {dims.vocab_size}")
        return [_own(full[: dims.vocab_size])]

    def shards(self, hf, tp, dims):
        (t,) = hf
        if dims.padded_vocab_size % tp or dims.padded_vocab_size < t.shape[0]:
            return self.split(self.to_megatron(hf, dims), tp, dims)  # (raises the clear error)
        rows = dims.padded_vocab_size // tp
        out = []
        for r in range(tp):
            real = t[r * rows:(r + 1) * rows]
            pad = rows - real.shape[0]
            out.append(torch.cat([real, real.new_zeros((pad, *t.shape[1:]))]) if pad
                       else _exact_view(real))
        return out

    def merge_to_hf(self, shards, dims):
        _cat(shards, 0, self.megatron)  # shape check only
        left, pieces = dims.vocab_size, []
        for s in shards:
            pieces.append(s[:left])
            left -= pieces[-1].shape[0]
        if left:
            return self.to_hf(torch.cat(shards), dims)  # (raises the clear error)
        return [torch.cat(pieces)]


# --- constructors used by the mapping tables (short, so a table reads like a table) -----------

def replicated(megatron: str, hf: str, **kw) -> Rule:
    return Replicated(megatron, (hf,), **kw)


def column(megatron: str, hf: str, **kw) -> Rule:
    kw.setdefault("extra_state", megatron.endswith(".weight"))
    return Column(megatron, (hf,), **kw)


def row(megatron: str, hf: str, **kw) -> Rule:
    kw.setdefault("extra_state", megatron.endswith(".weight"))
    return Row(megatron, (hf,), **kw)


def row_bias(megatron: str, hf: str, **kw) -> Rule:
    """The bias of a row-parallel linear is full on every rank."""
    return Replicated(megatron, (hf,), **kw)


def qkv(megatron: str, q: str, k: str, v: str, heads: str = "text", **kw) -> Rule:
    kw.setdefault("extra_state", megatron.endswith(".weight"))
    return QKV(megatron, (q, k, v), heads=heads, **kw)


def qkv_fused(megatron: str, hf: str, heads: str, **kw) -> Rule:
    kw.setdefault("extra_state", megatron.endswith(".weight"))
    return QKV(megatron, (hf,), heads=heads, fused_hf=True, **kw)


def gated_mlp(megatron: str, gate: str, up: str, **kw) -> Rule:
    kw.setdefault("extra_state", megatron.endswith(".weight"))
    return GatedMLP(megatron, (gate, up), **kw)


def vocab(megatron: str, hf: str, **kw) -> Rule:
    return Vocab(megatron, (hf,), **kw)
