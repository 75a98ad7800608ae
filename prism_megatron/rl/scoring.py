"""Scoring with the discriminator: ``score(prompts, segments)`` and whole responses (spec §3.3).

Batched without gradients. Because rows are right-padded, attention is causal and MoE routing is
per token (no capacity limit), a sequence's score does not depend on which other sequences share
its batch or on the padding (spec §9.4): the reference's per-sample scoring pass and its batched
training pass read the same number. Sequences are sorted by length and cut into batches of at most
``max_rows`` rows / ``max_tokens`` padded tokens; each batch goes through megatron's forward-only
schedule, so a pipelined discriminator works too (scores are then broadcast from the last stage).
Data-parallel ranks split the sequences (like the update) and all-gather the scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch
import torch.distributed as dist

from prism_megatron.data.collate import padded_length
from prism_megatron.data.encode import Encoded
from prism_megatron.data.segments import (
    CAPTION, REASONING, SegmentIds, build_sequence, collate_sequences, response_segments)
from prism_megatron.models import unwrap_model
from prism_megatron.schedule import forward_only


def _data_parallel():
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return None, 0, 1
    return (ps.get_data_parallel_group(), ps.get_data_parallel_rank(),
            ps.get_data_parallel_world_size())


@dataclass
class ResponseScores:
    caption: torch.Tensor        # [N] fp32, 0 for format-invalid responses (spec §3.3)
    reasoning: torch.Tensor      # [N]
    format_valid: torch.Tensor   # [N] bool
    segments: list[SegmentIds]


def read_scores(values: torch.Tensor, score_index: torch.Tensor) -> torch.Tensor:
    """values [B, S] -> the score of each row at its segment's last token, [B]."""
    return values.gather(1, score_index.to(values.device)[:, None]).squeeze(1)


def clean_scores(scores: torch.Tensor, score_clip: float | None) -> torch.Tensor:
    """Spec §3.3: NaN/Inf -> 0, then clamp to [-clip, clip] (no clamp when clip is None)."""
    scores = torch.nan_to_num(scores.float(), nan=0.0, posinf=0.0, neginf=0.0)
    return scores if score_clip is None else scores.clamp(-score_clip, score_clip)


def discriminator_forward(batch: dict, model) -> torch.Tensor:
    """The discriminator's value per token [B, S] (or hidden states before the last stage)."""
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                 attention_mask=batch["attention_mask"], kind=batch["kind"],
                 valid_tokens=batch["valid_tokens"], pixel_values=batch.get("pixel_values"),
                 image_grid_thw=batch.get("image_grid_thw"))


class Scorer:
    def __init__(self, model, pad_id: int, *, score_clip: float | None = 10.0, max_rows: int = 16,
                 max_tokens: int = 16384):
        self.model = model
        self.disc = unwrap_model(model)
        self.pad_id = pad_id
        self.score_clip = score_clip
        self.max_rows, self.max_tokens = max_rows, max_tokens

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches, current = [], []
        for i in order:
            rows = len(current) + 1
            if current and (rows > self.max_rows
                            or rows * padded_length(lengths[current[0]]) > self.max_tokens):
                batches.append(current)
                current = []
            current.append(i)
        return batches + ([current] if current else [])

    def run(self, batch: dict) -> torch.Tensor:
        """Scores [B] of one collated batch (no gradient, eval mode), on every pipeline rank."""
        from megatron.core import parallel_state as ps

        found = []

        def forward(b, model):
            def loss_fn(values):
                found.append(read_scores(values, b["score_index"]).float())
                return values.sum() * 0, torch.tensor(1, dtype=torch.int), {}

            return discriminator_forward(b, model), loss_fn

        forward_only(self.model, [batch], forward, batch["input_ids"].shape[1])
        rows = batch["input_ids"].shape[0]
        scores = found[0] if found else torch.zeros(rows)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            scores = scores.contiguous()
            dist.broadcast(scores, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return scores.cpu()

    @torch.no_grad()
    def score(self, prompts: Seq[Encoded], segments: Seq[list[int]],
              kinds: int | Seq[int]) -> torch.Tensor:
        """Score of each ``[prompts[i] ; segments[i]]`` read at the segment's last token (its
        closing tag), NaN/Inf -> 0 and clamped to +-score_clip. ``kinds``: CAPTION / REASONING
        per sequence (or one for all): it picks the expert half in ``segment`` routing."""
        if isinstance(kinds, int):
            kinds = [kinds] * len(prompts)
        if not len(prompts) == len(segments) == len(kinds):
            raise ValueError("prompts, segments and kinds must have the same length")
        seqs = [build_sequence(p, list(s), k) for p, s, k in zip(prompts, segments, kinds)]
        # Data-parallel ranks share the work: rank r scores every dp-th sequence by length
        # (balanced tokens), all ranks run as many forwards (EP all-to-alls, TP/PP collectives
        # inside), and the scores are all-gathered.
        group, dp_rank, dp_size = _data_parallel()
        by_length = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].input_ids))
        mine = by_length[dp_rank::dp_size]
        plan = [[mine[j] for j in rows]
                for rows in self._batches([len(seqs[i].input_ids) for i in mine])]
        count = torch.tensor([len(plan)])
        if dp_size > 1:
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
        plan += [None] * (int(count) - len(plan))   # filler forwards, results dropped
        found: dict[int, float] = {}
        for rows in plan:
            chunk = [seqs[i] for i in (rows or by_length[:1])]
            batch = collate_sequences(chunk, pad_id=self.pad_id, position_fn=self.disc.position_fn,
                                      length=padded_length(max(len(s.input_ids) for s in chunk)))
            scores = self.run(batch)
            if rows:
                found.update(zip(rows, scores.tolist()))
        if dp_size > 1:
            parts = [None] * dp_size
            dist.all_gather_object(parts, found, group=group)
            found = {k: v for part in parts for k, v in part.items()}
        out = torch.tensor([found[i] for i in range(len(seqs))], dtype=torch.float32)
        return clean_scores(out, self.score_clip)

    def score_responses(self, prompts: Seq[Encoded], responses: Seq, tokenizer) -> ResponseScores:
        """Caption and reasoning scores of sampled responses (token ids, EOS/padding allowed).
        Invalid responses still run (every rank runs the same forwards) and score 0."""
        segments = [response_segments(r, tokenizer) for r in responses]
        n = len(segments)
        scores = self.score(list(prompts) * 2, [s.caption for s in segments]
                            + [s.reasoning for s in segments], [CAPTION] * n + [REASONING] * n)
        valid = torch.tensor([s.valid for s in segments])
        caption, reasoning = scores[:n], scores[n:]
        zero = torch.zeros_like(caption)
        return ResponseScores(torch.where(valid, caption, zero),
                              torch.where(valid, reasoning, zero), valid, segments)
