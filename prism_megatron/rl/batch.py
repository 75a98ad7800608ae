"""One RL step's responses: ``RolloutBatch``, and this rank's micro-batches of it.

A ``RolloutBatch`` is built once, after generation, and gains fields as the step flows (the same
type in RLVR and alignment):

    generate     prompts, samples, group, behaviour_step (rollout log-probs are in the samples)
    reward       rewards, accuracy, format_ok            (RLVR: rule rewards, spec §5)
      or score   caption, reasoning, valid, segments     (alignment: discriminator, spec §3.3)
    advantages   advantages                              (group-normalised, spec §4 / §6)
    train        micro-batches (``plan_micro_batches``) that carry, per token, the advantages,
                 rollout / old / reference log-probs in [B, S] loss coordinates

Every per-sample field is a tensor over the samples (group-major: sample ``g * n + j`` is sample
j of prompt g). Per-token quantities are placed once into a micro-batch's [B, S] positions when
they become known (collation for advantages and rollout log-probs, the log-prob pass for the old
and reference log-probs), never re-scattered per use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prism_megatron.data.collate import collate, pack_greedy, padded_length, rank_share
from prism_megatron.data.encode import Encoded


@dataclass
class RemoteSample:
    """A sample another data-parallel rank trains on (``Policy.receive`` scatters the samples):
    what every rank needs of it (lengths, metrics, the log-prob check), not its tokens."""

    length: int
    finish_reason: str
    has_log_probs: bool

    def __len__(self) -> int:
        return self.length


def is_local(sample) -> bool:
    """Whether this rank holds the sample's tokens (it trains on it, or the batch was broadcast)."""
    return not isinstance(sample, RemoteSample)


@dataclass
class RolloutBatch:
    prompts: list[Any]                       # RLPrompt per group
    samples: list[Any]                       # rollout.base.Sample, group-major
    group: list[int]                         # prompt (group) index of every sample
    rewards: torch.Tensor | None = None      # [N] RLVR reward
    accuracy: torch.Tensor | None = None     # [N] RLVR answer accuracy
    format_ok: torch.Tensor | None = None    # [N] bool, RLVR format check
    caption: torch.Tensor | None = None      # [N] discriminator caption score (0 if invalid)
    reasoning: torch.Tensor | None = None    # [N] discriminator reasoning score
    valid: torch.Tensor | None = None        # [N] bool, format-valid for the discriminator
    segments: list[Any] = field(default_factory=list)   # data.segments.SegmentIds per sample
    advantages: torch.Tensor | None = None   # [N] per-response advantage
    # [N] the policy version that generated each sample: the number of trained steps of the
    # weights the engine held (one-step-off-policy: the trained step's version - 1)
    behaviour_step: torch.Tensor | None = None

    @classmethod
    def from_groups(cls, prompts: list, groups: list[list]) -> "RolloutBatch":
        """The batch of ``groups[g]`` = the samples of ``prompts[g]``."""
        samples = [s for group in groups for s in group]
        index = [g for g, group in enumerate(groups) for _ in group]
        return cls(list(prompts), samples, index)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_groups(self) -> int:
        return len(self.prompts)

    def select_groups(self, keep: list[int]) -> "RolloutBatch":
        """The groups ``keep`` (in that order), with every per-sample field that is set."""
        rows = [i for g in keep for i, gi in enumerate(self.group) if gi == g]
        new_group = [k for k, g in enumerate(keep) for gi in self.group if gi == g]

        def take(value):
            if value is None:
                return None
            if isinstance(value, torch.Tensor):
                return value[rows]
            return [value[i] for i in rows] if value else value

        return RolloutBatch([self.prompts[g] for g in keep], [self.samples[i] for i in rows],
                            new_group, **{name: take(getattr(self, name)) for name in
                                          ("rewards", "accuracy", "format_ok", "caption",
                                           "reasoning", "valid", "segments", "advantages",
                                           "behaviour_step")})

    @staticmethod
    def concat(batches: list["RolloutBatch"]) -> "RolloutBatch":
        """Groups of several batches, in order (each per-sample field set in all of them)."""
        out = RolloutBatch([], [], [])
        for b in batches:
            offset = out.num_groups
            out.prompts += b.prompts
            out.samples += b.samples
            out.group += [g + offset for g in b.group]
        for name in ("rewards", "accuracy", "format_ok", "caption", "reasoning", "valid",
                     "advantages", "behaviour_step"):
            parts = [getattr(b, name) for b in batches]
            if parts and all(p is not None for p in parts):
                setattr(out, name, torch.cat(parts))
        out.segments = [s for b in batches for s in b.segments]
        return out

    # ---- derived ----------------------------------------------------------------------
    def prompt_of(self, i: int):
        return self.prompts[self.group[i]]

    def response_lengths(self) -> torch.Tensor:
        return torch.tensor([len(s) for s in self.samples], dtype=torch.float32)

    def rollout_log_probs(self, i: int) -> torch.Tensor:
        return torch.tensor(self.samples[i].logprobs, dtype=torch.float32)

    def sequence_length(self, i: int) -> int:
        """Tokens of ``[prompt ; response]`` of sample i (known on every rank)."""
        return len(self.prompt_of(i).encoded.input_ids) + len(self.samples[i])

    def tokens(self) -> int:
        """Real (unpadded) tokens of the ``[prompt ; response]`` sequences."""
        return sum(self.sequence_length(i) for i in range(len(self)))

    def sequence(self, i: int) -> Encoded:
        """``[prompt ; response]`` of sample i, the response tokens trainable."""
        prompt = self.prompt_of(i).encoded
        response = torch.tensor(self.samples[i].token_ids, dtype=torch.long)
        return Encoded(torch.cat([prompt.input_ids, response]),
                       torch.cat([torch.zeros(len(prompt.input_ids), dtype=torch.bool),
                                  torch.ones(len(response), dtype=torch.bool)]),
                       prompt.pixel_values, prompt.image_grid_thw)

    def minibatches(self, prompts_per_minibatch: int) -> list[list[int]]:
        """Sample indices of each mini-batch: ``prompts_per_minibatch`` whole groups each."""
        per = prompts_per_minibatch * max(1, len(self) // max(1, self.num_groups))
        return [list(range(k, min(k + per, len(self)))) for k in range(0, len(self), per)]


# ------------------------------------------------------------------------------ micro-batches

@dataclass
class MicroBatches:
    """This rank's micro-batches of one mini-batch, all of one shape and as many on every
    data-parallel rank. ``batch["token_sample"]`` [B, S] names the sample of every position (-1:
    padding or a filler row); ``batch["unpack"]`` [N, L] (packed micro-batches only) gathers each
    packed sample's loss positions into a row of its own, so per-sequence losses see sequences."""

    batches: list[dict]
    seq_length: int
    indices: list[int]

    def per_sample(self, key: str) -> dict[int, torch.Tensor]:
        """The response-token values of ``key`` of every sample here: {sample: [R]}."""
        out = {}
        for batch in self.batches:
            if key not in batch:
                continue
            mask = batch["loss_mask"].bool()
            for i in batch["token_sample"].unique().tolist():
                if i >= 0:
                    out[i] = batch[key][(batch["token_sample"] == i) & mask]
        return out

    def efficiency(self) -> tuple[int, int]:
        """(real tokens, computed positions) of these micro-batches."""
        real = sum(int((b["token_sample"] >= 0).sum()) for b in self.batches)
        return real, sum(b["input_ids"].numel() for b in self.batches)


def response_positions(seq: Encoded, hf_config) -> torch.Tensor:
    """``[3, S]`` M-RoPE positions as generation assigns them: the prompt's (images spread over
    t/h/w), then the response as text continuing after the prompt's largest position. Vision
    tokens the policy happens to sample are plain text tokens there, and here."""
    from prism_megatron.models.qwen3_vl.rope import rope_index_for_sample

    prompt_length = seq.prompt_length
    prompt = rope_index_for_sample(seq.input_ids[:prompt_length], seq.image_grid_thw,
                                   hf_config=hf_config)
    response = prompt.max() + 1 + torch.arange(len(seq.input_ids) - prompt_length)
    return torch.cat([prompt, response.expand(3, -1)], dim=1)


def place(batch: dict, per_sample, fill: float = 0.0) -> torch.Tensor:
    """Per-sample values ([R] per response token, or a scalar; indexed by sample) -> [B, S] at
    the samples' loss positions."""
    mask = batch["loss_mask"].bool()
    out = torch.full(mask.shape, fill, dtype=torch.float32)
    if "token_sample" not in batch:          # one sample per row, named by batch["index"]
        for r, i in enumerate(batch["index"].tolist()):
            if i >= 0:
                out[r][mask[r]] = torch.as_tensor(per_sample[i], dtype=torch.float32)
        return out
    owner = batch["token_sample"]
    for i in owner.unique().tolist():
        if i >= 0:
            where = (owner == i) & mask
            out[where] = torch.as_tensor(per_sample[i], dtype=torch.float32)
    return out


def balance_by_tokens(indices: list[int], lengths: dict[int, int], dp_size: int) -> list[list[int]]:
    """Each data-parallel rank's samples: longest first to the rank with the fewest tokens
    (ties: the lower rank), so ranks get about the same tokens, not the same count."""
    shares: list[list[int]] = [[] for _ in range(dp_size)]
    load = [0] * dp_size
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        r = min(range(dp_size), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += lengths[i]
    return shares


def dp_shares(lengths: dict[int, int], indices: list[int], *, dp_size: int,
              micro_batch_size: int, max_tokens: int) -> list[list[int]]:
    """Every data-parallel rank's samples of the mini-batch ``indices``, as
    ``plan_micro_batches`` assigns them (by tokens when packing, round-robin otherwise)."""
    if max_tokens:
        return balance_by_tokens(indices, lengths, dp_size)
    return [rank_share(indices, r, dp_size) for r in range(dp_size)]


def sample_owners(batch: RolloutBatch, *, prompts_per_minibatch: int, dp_size: int,
                  micro_batch_size: int, max_tokens: int) -> list[int]:
    """The data-parallel rank that trains on each sample of ``batch`` (every mini-batch)."""
    lengths = {i: batch.sequence_length(i) for i in range(len(batch))}
    owner = [0] * len(batch)
    for indices in batch.minibatches(prompts_per_minibatch):
        for r, share in enumerate(dp_shares(lengths, indices, dp_size=dp_size,
                                            micro_batch_size=micro_batch_size,
                                            max_tokens=max_tokens)):
            for i in share:
                owner[i] = r
    return owner


def fit_rows(shares: list[list[int]], longest: int, budget: int
             ) -> tuple[int, list[list[list[int]]]]:
    """(row length, every rank's first-fit-decreasing rows of its ``shares`` lengths): the
    shortest row (a multiple of 8, ``longest`` .. ``budget``) that packs each rank's share into
    no more rows than the budget does: as many micro-batches, fewer padded positions."""
    def pack(capacity: int) -> list[list[list[int]]]:
        return [pack_greedy(share, capacity) if share else [] for share in shares]

    best = pack(budget)
    count = max(len(b) for b in best)
    low, high = longest // 8, budget // 8          # in units of 8; ``high`` always fits
    while low < high:
        mid = (low + high) // 2
        rows = pack(mid * 8)
        if max(len(b) for b in rows) <= count:
            high, best = mid, rows
        else:
            low = mid + 1
    return high * 8, best


def plan_micro_batches(batch: RolloutBatch, indices: list[int], *, micro_batch_size: int,
                       pad_id: int, hf_config, dp_rank: int, dp_size: int,
                       max_tokens: int = 0) -> MicroBatches:
    """This rank's share of the samples ``indices`` as micro-batches, with positions, image
    mask, advantages and rollout log-probs in place.

    ``max_tokens`` 0: round-robin shares, ``micro_batch_size`` sequences per micro-batch padded
    to the mini-batch's longest (a multiple of 8). ``max_tokens`` > 0: shares balanced by tokens,
    each micro-batch ONE row of at most ``max_tokens`` positions (at least the longest sequence;
    the shortest row that needs no more micro-batches, ``fit_rows``) packed first-fit-decreasing,
    samples kept apart by the block attention mask; every rank computes
    every rank's packing, so the micro-batch counts agree without a collective."""
    lengths = {i: batch.sequence_length(i) for i in indices}
    longest = padded_length(max(lengths.values()))
    if max_tokens:
        shares = dp_shares(lengths, indices, dp_size=dp_size, micro_batch_size=micro_batch_size,
                           max_tokens=max_tokens)
        seq_length, bins = fit_rows([[lengths[i] for i in share] for share in shares], longest,
                                    max(longest, padded_length(max_tokens)))
        count = max(len(b) for b in bins)
        rows = [[[shares[dp_rank][k] for k in row]] for row in bins[dp_rank]]
        rows += [[[]] for _ in range(count - len(rows))]    # filler micro-batches
    else:
        seq_length = longest
        mine = rank_share(indices, dp_rank, dp_size, micro_batch_size)
        rows = [[[i] if i is not None else [] for i in mine[k:k + micro_batch_size]]
                for k in range(0, len(mine), micro_batch_size)]
    members = [i for mb in rows for row in mb for i in row]
    seqs = {i: batch.sequence(i) for i in members}      # collate indexes them by sample
    positions = {i: response_positions(seqs[i], hf_config) for i in members}
    rollout = {i: batch.rollout_log_probs(i) for i in members}
    out = []
    for mb_rows in rows:
        mb = collate(seqs, mb_rows, pad_id=pad_id, position_fn=None, length=seq_length,
                     positions=positions)
        owner = torch.full_like(mb["input_ids"], -1)
        image_mask = torch.zeros_like(mb["input_ids"], dtype=torch.bool)
        for r, row in enumerate(mb_rows):
            start = 0
            for i in row:
                seq = seqs[i]
                owner[r, start:start + lengths[i]] = i
                p = seq.prompt_length
                image_mask[r, start:start + p] = seq.input_ids[:p] == hf_config.image_token_id
                start += lengths[i]
        mb["token_sample"], mb["image_mask"] = owner, image_mask
        if max_tokens:
            mb["unpack"] = unpack_index(mb, [i for row in mb_rows for i in row])
        if batch.advantages is not None:
            mb["advantages"] = place(mb, batch.advantages)
        mb["rollout_log_probs"] = place(mb, rollout)
        out.append(mb)
    return MicroBatches(out, seq_length, list(indices))


def unpack_index(mb: dict, samples: list[int]) -> torch.Tensor:
    """[N, L] flat positions (into [B * S]) of each sample's loss positions, -1 past its end;
    one row per sample (at least one row, all -1, for a filler micro-batch)."""
    mask = mb["loss_mask"].bool().reshape(-1)
    owner = mb["token_sample"].reshape(-1)
    spans = [((owner == i) & mask).nonzero().squeeze(1) for i in samples] or [torch.zeros(0)]
    width = max(1, max(len(s) for s in spans))
    index = torch.full((len(spans), width), -1, dtype=torch.long)
    for r, span in enumerate(spans):
        index[r, :len(span)] = span
    return index


def unpacked(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, S] per-token values -> [N, L] rows of one sample each (0 past a sample's end)."""
    flat = x.reshape(-1)[index.clamp(min=0)]
    return torch.where(index >= 0, flat, torch.zeros_like(flat))
