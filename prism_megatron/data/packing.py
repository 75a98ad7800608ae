"""How a packed micro-batch keeps its samples apart in attention: one owner for both layouts.

A micro-batch from ``collate`` is ``[B, S]`` with ``segment_ids`` (1.. per packed sample, 0 =
padding) and per-sample M-RoPE positions ``[3, B, S]`` that already restart for every sample
(``collate`` takes each sample's positions from the rope index, ``models/qwen3_vl/rope.py``).

* ``mask`` (the local spec): a dense block-diagonal causal mask ``[B, 1, S, S]``, which the torch
  softmax of megatron's DotProductAttention honours.
* ``thd`` (the Transformer Engine spec): TE's causal layers ignore an explicit mask, so the rows
  are flattened into ONE sequence ``[1, B * S]`` (row-major: position ``b * S + s``) and the
  attention gets megatron's ``PackedSeqParams(qkv_format="thd", cu_seqlens...)``: every sample
  is a variable-length sequence of its own, and so is each row's padding tail, so the packed
  length ``cu_seqlens[-1]`` equals the flattened length. Megatron's unfused THD rotary then reads
  the angles at each token's own offset (``freqs.size(0) == cu_seqlens[-1]``), i.e. the
  per-sample M-RoPE positions; the image features and DeepStack maps are scattered in the same
  row-major order the images were collated in, so every sample gets its own.
"""

from __future__ import annotations

from typing import Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from prism_megatron.data.collate import segment_attention_mask  # noqa: F401 (the mask layout)

LAYOUTS = ("mask", "thd")


def layout_for_spec(spec: str) -> str:
    """The packed-attention layout a layer spec can honour."""
    return "thd" if spec == "transformer_engine" else "mask"


def segment_lengths(segment_ids: torch.Tensor) -> list[int]:
    """Lengths of the THD sequences of a ``[B, S]`` micro-batch in flattened row-major order:
    every maximal run of one segment id within a row (a sample, or a row's padding tail)."""
    batch, seq = segment_ids.shape
    ids = segment_ids.detach().cpu()
    starts = torch.ones(batch, seq, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]         # a new run; column 0 starts every row
    bounds = torch.nonzero(starts.reshape(-1)).flatten().tolist() + [batch * seq]
    return [e - s for s, e in zip(bounds[:-1], bounds[1:])]


def cu_seqlens(lengths: Sequence[int], device=None) -> torch.Tensor:
    """[n + 1] int32 cumulative lengths, starting at 0 (TE's and flash-attention's layout)."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(torch.tensor(list(lengths), dtype=torch.int32), 0)
    return out.to(device) if device is not None else out


def packed_seq_params(lengths: Sequence[int], device=None) -> PackedSeqParams:
    """Megatron's THD parameters for sequences of ``lengths`` laid end to end (self-attention:
    the same boundaries for queries and keys)."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"THD packing needs sequence lengths >= 1, got {list(lengths)}")
    cu = cu_seqlens(lengths, device)
    longest = int(max(lengths))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def thd_params(segment_ids: torch.Tensor) -> PackedSeqParams:
    """``packed_seq_params`` of a ``[B, S]`` micro-batch flattened to ``[1, B * S]``."""
    return packed_seq_params(segment_lengths(segment_ids), segment_ids.device)


def flatten_rows(x: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """``[..., B, S, ...]`` -> ``[..., 1, B * S, ...]`` (the THD token order)."""
    shape = list(x.shape)
    shape[batch_dim:batch_dim + 2] = [1, shape[batch_dim] * shape[batch_dim + 1]]
    return x.reshape(shape)


def sbh_to_thd(x: torch.Tensor) -> torch.Tensor:
    """Hidden states ``[S, B, H]`` -> ``[B * S, 1, H]`` (row-major tokens)."""
    return x.transpose(0, 1).reshape(-1, 1, x.shape[-1])


def thd_to_sbh(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B * S, 1, H]`` -> ``[S, B, H]`` (what pipeline stages exchange)."""
    return x.reshape(batch, -1, x.shape[-1]).transpose(0, 1).contiguous()
