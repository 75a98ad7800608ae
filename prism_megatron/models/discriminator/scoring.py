"""Scoring with the discriminator: ``score(prompts, segments)`` and whole responses (spec §3.3).

Batched without gradients. Because rows are right-padded, attention is causal and MoE routing is
per token (no capacity limit), a sequence's score does not depend on which other sequences share
its batch or on the padding (spec §9.4): the reference's per-sample scoring pass and its batched
training pass read the same number. Sequences are sorted by length and cut into batches of at most
``max_rows`` rows / ``max_tokens`` padded tokens; each batch goes through megatron's forward-only
schedule, so a pipelined discriminator works too (scores are then broadcast from the last stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch
import torch.distributed as dist

from prism_megatron.data.encode import Encoded
from prism_megatron.models.discriminator.batching import (
    clean_scores, collate_sequences, padded_length, read_scores)
from prism_megatron.models.discriminator.routing import CAPTION, REASONING
from prism_megatron.models.discriminator.segments import (
    SegmentIds, build_sequence, response_segments)


@dataclass
class ResponseScores:
    caption: torch.Tensor        # [N] fp32, 0 for format-invalid responses (spec §3.3)
    reasoning: torch.Tensor      # [N]
    format_valid: torch.Tensor   # [N] bool
    segments: list[SegmentIds]


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


class Scorer:
    def __init__(self, model, pad_id: int, *, score_clip: float | None = 10.0, max_rows: int = 16,
                 max_tokens: int = 16384):
        self.model = model
        self.disc = _unwrap(model)
        self.pad_id = pad_id
        self.score_clip = score_clip
        self.max_rows, self.max_tokens = max_rows, max_tokens

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches, current = [], []
        for i in order:
            rows = len(current) + 1
            if current and (rows > self.max_rows
                            or rows * padded_length([lengths[current[0]]]) > self.max_tokens):
                batches.append(current)
                current = []
            current.append(i)
        return batches + ([current] if current else [])

    def _run(self, batch: dict) -> torch.Tensor:
        """Scores [B] of one collated batch, on every rank of the pipeline."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        found = []

        def forward_step(data_iterator, model):
            b = next(data_iterator)
            values = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                           attention_mask=b["attention_mask"], kind=b["kind"],
                           valid_tokens=b["valid_tokens"], pixel_values=b.get("pixel_values"),
                           image_grid_thw=b.get("image_grid_thw"))

            def loss_fn(values):
                found.append(read_scores(values, b["score_index"]).float())
                return values.sum() * 0, torch.tensor(1, dtype=torch.int), {}

            return values, loss_fn

        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=[self.model],
            num_microbatches=1, seq_length=batch["input_ids"].shape[1],
            micro_batch_size=batch["input_ids"].shape[0], forward_only=True)
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
        out = torch.zeros(len(seqs))
        was_training = self.model.training
        self.model.eval()
        try:
            for rows in self._batches([len(s.input_ids) for s in seqs]):
                chunk = [seqs[i] for i in rows]
                batch = collate_sequences(chunk, pad_id=self.pad_id,
                                          position_fn=self.disc.position_fn,
                                          length=padded_length([len(s.input_ids) for s in chunk]))
                out[rows] = self._run(batch)
        finally:
            self.model.train(was_training)
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
