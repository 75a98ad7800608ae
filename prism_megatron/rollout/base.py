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

Seeds: on the CPU engine (and the CPU server) a request with ``seed`` set is reproducible. Sample
j of prompt i is drawn with its own generator seeded by ``derive_seed(seed, i, j)``, so a sample
does not depend on which other prompts share its batch or on how many samples are asked for.
Real SGLang honours the per-sample seed only under ``--enable-deterministic-inference``
(``rollout.deterministic``), with its own RNG: reproducible on the same server configuration,
never equal to the CPU engine's draws; otherwise GPU rollouts are not reproducible.

Memory phases (``phase_train`` / ``phase_generate``): an engine sharing GPUs with the trainer
releases its weights and KV cache before training and, before the next generation, resumes the
weights, receives the trainer's weights, and only then resumes the KV cache (the order slime
uses; resumed weights are garbage until that sync unless the server keeps a CPU backup).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from prism_megatron.data.prompt import RolloutPrompt  # noqa: F401 (the engines' input type)
from prism_megatron.errors import PrismError


class RolloutError(PrismError, RuntimeError):
    """A rollout request or engine that cannot work; the message says what to change."""


class RolloutServerError(RolloutError):
    """A generation server that is unreachable, dead, or keeps failing (names the URL)."""


class RolloutRequestError(RolloutError):
    """A server rejected a request as malformed (HTTP 4xx); retrying will not help."""


class WeightUpdateError(RolloutError):
    """Weights that do not fit the engine's model (unknown names, wrong shapes)."""


class WeightReadbackUnsupported(WeightUpdateError):
    """The server cannot report a tensor (SGLang 0.5.23's Qwen models lack get_weights_by_name)."""


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

    def preferred_weight_sync(self) -> str:
        """What ``rollout.weight_sync=auto`` becomes for this engine (see ``weight_sync``)."""
        return "tensor"

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[torch.Tensor]:
        """The first ``truncate_size`` rows of the engine's tensor ``name`` as fp32, one per
        server (SGLang's ``/get_weights_by_name``); the weight sync's spot check reads it."""
        raise WeightUpdateError(f"{type(self).__name__} cannot report its weights")

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Free accelerator memory between phases (``weights`` / ``kv_cache``; None: all).
        A no-op unless the engine supports it."""

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Undo ``release_memory`` for ``tags`` (None: all) before the next generation."""

    def weight_update_session(self):
        """A context spanning one whole weight sync (SGLang's begin/end_weight_update)."""
        return nullcontext()

    @abstractmethod
    def shutdown(self) -> None:
        """Stop servers / free the model. Safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


# Memory phases: the two calls an RL stage makes around training (spec §1: generate -> train).
WEIGHTS, KV_CACHE = "weights", "kv_cache"


def phase_train(engine: RolloutEngine | None) -> None:
    """Before training: the engine releases its weights and KV cache (when configured).

    Call on every rank; ranks without the engine client pass None.
    """
    if engine is not None:
        engine.release_memory([WEIGHTS, KV_CACHE])


def phase_generate(engine: RolloutEngine | None, sync: Callable[[], Any]) -> Any:
    """Before generating: resume the weights, run ``sync()`` (the collective weight sync, on
    every rank), then resume the KV cache; returns what ``sync`` returns.

    Resuming the KV cache last keeps the trainer's memory free during the sync, and the
    weights must be resumed before they can be written (a released weight is unmapped).
    """
    if engine is not None:
        engine.resume_memory([WEIGHTS])
    result = sync()
    if engine is not None:
        engine.resume_memory([KV_CACHE])
    return result
