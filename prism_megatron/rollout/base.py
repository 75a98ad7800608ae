"""The rollout-engine interface shared by the CPU engine and the SGLang client.

Both RL stages ask an engine for ``n`` responses per multimodal prompt (spec §1.2-1.4) and train
on them, so every engine returns the same thing: per sample the response token ids, their
log-probs, the decoded text and why generation stopped.

Log-prob convention (identical to SGLang's default, i.e. without SGLANG_RETURN_ORIGINAL_LOGPROB):
    logprob[t] = log_softmax(logits_t / temperature)[token_t]
computed in fp32 from the full-vocabulary, temperature-scaled logits BEFORE top-k / top-p
filtering (filtering decides which tokens can be drawn, it does not renormalise the reported
log-prob). With temperature 0 (greedy) the scale is 1: log_softmax(logits_t)[token_t]. For PRISM's
settings (temperature 1, top_p 1, top_k -1) this is exactly the policy log-prob the trainer
recomputes.

Stopping (SGLang's rule): generation ends after any of the model's eos tokens (the tokenizer's
eos ``<|im_end|>`` plus the checkpoint's ``generation_config.eos_token_id``) or of the extra
``stop_token_ids``; ``ignore_eos`` disables all token stops (benchmarks). The stop token is
INCLUDED in ``token_ids`` and ``logprobs`` (as in SGLang) and left out of ``text`` (decoded with
special tokens skipped); ``finish_reason`` is then ``"stop"``. Reaching ``max_new_tokens`` gives
``"length"``.

Seeds: a request with ``seed`` set is reproducible. Sample j of prompt i is drawn with its own
generator seeded by ``derive_seed(seed, i, j)``, so a sample does not depend on which other
prompts share its batch or on how many samples are asked for.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from prism_megatron.errors import PrismError


class RolloutError(PrismError, RuntimeError):
    """A rollout request or engine that cannot work; the message says what to change."""


class RolloutServerError(RolloutError):
    """A generation server that is unreachable, dead, or keeps failing (names the URL)."""


class RolloutRequestError(RolloutError):
    """A server rejected a request as malformed (HTTP 4xx); retrying will not help."""


class WeightUpdateError(RolloutError):
    """Weights that do not fit the engine's model (unknown names, wrong shapes)."""


@dataclass(frozen=True)
class SamplingParams:
    """What SGLang calls ``sampling_params`` (the subset PRISM uses).

    ``temperature`` 0 means greedy. ``top_k`` -1 / ``top_p`` 1.0 disable the filters.
    ``stop_token_ids`` are stop tokens in addition to the model's eos ids; ``ignore_eos`` turns
    every token stop off (only ``max_new_tokens`` ends a sample). ``seed`` None draws fresh
    randomness (from torch's global RNG in the CPU engine).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        problems = []
        if not self.temperature >= 0:
            problems.append(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            problems.append(f"top_k={self.top_k} must be -1 (off) or >= 1")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if problems:
            raise ValueError("bad sampling params: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


@dataclass
class RolloutPrompt:
    """One prompt: token ids from ``prism_megatron.data.encode.encode_prompt`` plus its images.

    ``input_ids`` are the trainer's ids, with every image already expanded to its run of
    ``<|image_pad|>`` tokens (engines also accept one pad per image and expand it, as SGLang
    does). ``images`` are the raw images (PIL images, file paths or encoded bytes): what SGLang
    takes. ``pixel_values`` / ``image_grid_thw`` are optional precomputed vision inputs; the CPU
    engine uses them as they are (no second image preprocessing), the HTTP client ignores them.
    """

    input_ids: list[int]
    images: list[Any] = field(default_factory=list)
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    def __post_init__(self):
        if isinstance(self.input_ids, torch.Tensor):
            self.input_ids = self.input_ids.tolist()
        self.input_ids = [int(t) for t in self.input_ids]
        if not self.input_ids:
            raise ValueError("a rollout prompt needs at least one token")

    @classmethod
    def from_encoded(cls, encoded, images: Sequence[Any] = ()) -> "RolloutPrompt":
        """From ``encode_prompt``'s ``Encoded`` (keeps its vision inputs) and the raw images."""
        return cls(encoded.input_ids.tolist(), list(images), encoded.pixel_values,
                   encoded.image_grid_thw)


@dataclass
class Sample:
    """One generated response."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str          # "stop" | "length"
    prompt_tokens: int = 0      # prompt length the engine saw (images expanded)

    def __len__(self) -> int:
        return len(self.token_ids)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``keys`` (stable across runs/machines)."""
    data = ",".join(str(int(k)) for k in (seed, *keys)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def sample_seeds(params: SamplingParams, prompt_index: int, n: int) -> list[int | None]:
    """Per-sample seeds of one prompt (None when the request is unseeded)."""
    if params.seed is None:
        return [None] * n
    return [derive_seed(params.seed, prompt_index, j) for j in range(n)]


class RolloutEngine(ABC):
    """A policy-sampling engine. Use as a context manager or call ``shutdown()``."""

    @abstractmethod
    def generate(self, prompts: Sequence[RolloutPrompt], params: SamplingParams,
                 n: int = 1) -> list[list[Sample]]:
        """``n`` samples for every prompt: ``result[i][j]`` is sample j of prompt i."""

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load one bucket of HF-named tensors in place; returns how many were loaded."""

    @abstractmethod
    def update_weights_from_disk(self, model_path: str | Path) -> None:
        """Reload every weight from an HF checkpoint directory (same architecture)."""

    @abstractmethod
    def health(self) -> dict[str, Any]:
        """``{"ok": bool, ...}``; never raises for a dead engine, it reports it."""

    def release_memory(self) -> None:
        """Free accelerator memory between phases (no-op unless the engine supports it)."""

    def resume_memory(self) -> None:
        """Undo ``release_memory`` before the next generation."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop servers / free the model. Safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
