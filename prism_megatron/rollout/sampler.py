"""Next-token sampling with per-row parameters and per-row random generators.

See ``base.py`` for the log-prob convention (SGLang's: temperature-scaled log-softmax, before
top-k/top-p filtering). Each row owns a ``torch.Generator`` and draws exactly one uniform number
from it per sampled token (inverse-CDF sampling), so a seeded sample is the same whatever else is
in the batch. Everything else is one vectorised op for the whole batch: per-row tiny ops are
what makes CPU decoding slow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowSampler:
    """Sampling state of one sequence."""

    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None   # None for greedy rows

    @classmethod
    def make(cls, temperature: float, top_k: int, top_p: float, seed: int | None) -> "RowSampler":
        if temperature == 0:
            return cls(0.0, -1, 1.0, None)
        if seed is None:  # unseeded: drawn from torch's global RNG (torch.manual_seed applies)
            seed = int(torch.randint(0, 2**62, (1,)).item())
        return cls(temperature, top_k, top_p, torch.Generator().manual_seed(seed))


def filter_probs_batch(probs: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Zero what lies outside each row's top-k tokens or top-p nucleus (``probs [B, V]``).

    Nucleus as SGLang computes it: keep a token when the probability mass ranked strictly
    before it is <= top_p (so the most likely token always survives).
    """
    vocab = probs.shape[-1]
    ks = torch.tensor([vocab if k == -1 else k for k in top_k], device=probs.device)
    ps = torch.tensor(top_p, dtype=probs.dtype, device=probs.device)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=probs.device)
    drop = (ranks[None] >= ks[:, None]) | ((sorted_p.cumsum(-1) - sorted_p) > ps[:, None])
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(drop, 0.0))


def filter_probs(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``filter_probs_batch`` for one row (``probs [V]``)."""
    return filter_probs_batch(probs[None], [top_k], [top_p])[0]


def sample_tokens(logits: torch.Tensor, rows: list[RowSampler]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [B], logprobs [B])`` for ``logits [B, V]``, one sampler per row."""
    logits = logits.float()
    temps = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in rows],
                         dtype=logits.dtype, device=logits.device)
    logp = torch.log_softmax(logits / temps[:, None], dim=-1)
    tokens = logits.argmax(-1)                     # greedy rows keep this
    drawn = [i for i, r in enumerate(rows) if r.generator is not None]
    if drawn:
        index = torch.tensor(drawn, device=logits.device)
        probs = logp[index].exp()
        ks, ps = [rows[i].top_k for i in drawn], [rows[i].top_p for i in drawn]
        if any(k != -1 for k in ks) or any(p < 1.0 for p in ps):
            probs = filter_probs_batch(probs, ks, ps)
        cdf = probs.cumsum(-1)
        uniform = torch.cat([torch.rand(1, generator=rows[i].generator) for i in drawn])
        target = (uniform.to(cdf.dtype) * cdf[:, -1])[:, None]
        # first token whose cumulative mass exceeds the target: zero-mass tokens never win
        picks = torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)
        tokens = tokens.index_put((index,), picks)
    return tokens, logp.gather(1, tokens[:, None])[:, 0]
