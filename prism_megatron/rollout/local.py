"""The CPU rollout engine: batched KV-cache generation on transformers' Qwen3-VL.

Generation for a batch of prompts with ``n`` samples each:

1. prefill every distinct prompt once (left-padded, images through the vision tower, 3-D M-RoPE
   positions from the model's own ``get_rope_index``), keeping only the last position's logits;
2. repeat each prompt's KV cache for its samples (``n`` prefills would cost ``n`` times more);
3. decode one token per step for all unfinished rows with our own sampler (``sampler.py``), so
   the returned log-probs are exactly the documented ones; finished rows are dropped from the
   cache so the batch shrinks as samples end.

Decode positions: after the prompt, Qwen3-VL continues all three M-RoPE axes from
``max(prompt positions) + 1``, i.e. ``len(prompt) + rope_delta`` where ``rope_delta`` (negative
for image prompts, whose pads share positions) comes from ``get_rope_index``. Every row carries
its own position counter, so left padding never shifts positions.

Weights can be replaced in place from HF-named tensors (``update_weights``) or from an HF
directory (``update_weights_from_disk``); names and shapes are checked before anything is copied.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from prism_megatron.data.encode import load_processor
from prism_megatron.rollout.base import (
    RolloutEngine, RolloutError, RolloutPrompt, Sample, SamplingParams, WeightUpdateError,
    sample_seeds)
from prism_megatron.rollout.images import expand_image_pads, preprocess_images, tokens_per_image
from prism_megatron.rollout.sampler import RowSampler, sample_tokens

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ContextLengthError(RolloutError):
    """Prompt + max_new_tokens beyond the model's context (SGLang's wording, see ``context_error``)."""


def context_error(prompt_tokens: int, max_new_tokens: int, context_length: int) -> str | None:
    """SGLang's validation message for a request that does not fit the context, else None.

    Same checks and wording as SGLang's ``TokenizerManager._validate_one_request``
    (python/sglang/srt/managers/tokenizer_manager.py), so clients see one message for both
    engines.
    """
    if prompt_tokens >= context_length:
        return (f"The input ({prompt_tokens} tokens) is longer than the model's context length "
                f"({context_length} tokens).")
    total = prompt_tokens + max_new_tokens
    if total > context_length:
        return (f"Requested token count exceeds the model's maximum context length of "
                f"{context_length} tokens. You requested a total of {total} tokens: "
                f"{prompt_tokens} tokens from the input messages and {max_new_tokens} tokens for "
                f"the completion. Please reduce the number of tokens in the input messages or the "
                f"completion to fit within the limit.")
    return None


@dataclass
class GenRequest:
    """One prompt with its sampling params and one seed per wanted sample.

    ``deadline`` (``time.monotonic()``) and ``cancel`` end its rows early (finish ``"abort"``)
    so a request nobody waits for any more stops taking decode steps.
    """

    prompt: RolloutPrompt
    params: SamplingParams
    seeds: list[int | None]
    deadline: float | None = None
    cancel: threading.Event | None = None

    def aborted(self, now: float) -> bool:
        return (self.deadline is not None and now > self.deadline) or \
            (self.cancel is not None and self.cancel.is_set())


@dataclass
class _Prepared:
    ids: list[int]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None


@dataclass
class _Row:
    """A sequence being decoded."""

    sampler: RowSampler
    stop: frozenset[int]
    max_new: int
    tokens: list[int]
    logprobs: list[float]
    finish: str | None = None
    request: GenRequest | None = None


@functools.lru_cache(maxsize=None)
def _growing_layer_class():
    """A KV-cache layer that appends into spare capacity (doubling when full).

    transformers' ``DynamicLayer`` re-concatenates the whole cache for every new token, the
    largest cost of CPU decoding; here an append writes only the new token, and the keys /
    values handed to attention are views of the filled part. (Defined lazily: transformers is
    imported on first use only.)
    """
    from transformers.cache_utils import DynamicLayer

    class GrowingKVLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            self._k = self._v = None
            self._len = 0

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self._len + key_states.shape[-2]
            if self._k is None or end > self._k.shape[-2]:
                capacity = max(end, 2 * (0 if self._k is None else self._k.shape[-2]))
                self._k = self._grown(self._k, key_states, capacity)
                self._v = self._grown(self._v, value_states, capacity)
            self._k[..., self._len:end, :] = key_states
            self._v[..., self._len:end, :] = value_states
            self._len = end
            self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
            return self.keys, self.values

        def _grown(self, old, like, capacity):
            new = like.new_empty((*like.shape[:-2], capacity, like.shape[-1]))
            if old is not None:
                new[..., :self._len, :] = old[..., :self._len, :]
            return new

        def batch_select_indices(self, indices):
            if self.is_initialized and self._k is not None:
                self._k, self._v = self._k[indices], self._v[indices]
                self.keys, self.values = self._k[..., :self._len, :], self._v[..., :self._len, :]

    return GrowingKVLayer


def _new_cache(text_config):
    from transformers import DynamicCache

    cache = DynamicCache(config=text_config)
    cache.layers = [_growing_layer_class()() for _ in range(text_config.num_hidden_layers)]
    return cache


def default_stop_ids(tokenizer, generation_config) -> tuple[int, ...]:
    """The tokenizer's eos (``<|im_end|>``) plus generation_config's eos ids, in that order."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    extra = getattr(generation_config, "eos_token_id", None)
    ids += extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else []
    return tuple(dict.fromkeys(int(i) for i in ids))


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of an HF directory (sharded with an index, or plain)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    missing = [f for f in files if not f.is_file()]
    if missing or not files:
        raise WeightUpdateError(f"{model_dir}: no safetensors weights found"
                                + (f" (missing {', '.join(f.name for f in missing)})" if missing else ""))
    return files


class LocalEngine(RolloutEngine):
    """Generation with the policy's own weights on CPU (fp32 by default)."""

    def __init__(self, hf_dir: str | Path, *, dtype: str = "fp32", max_batch_rows: int = 256,
                 processor=None, num_threads: int | None = None, min_pixels: int | None = None,
                 max_pixels: int | None = None, context_length: int | None = None):
        """``min_pixels`` / ``max_pixels``: the stage's ``data.min_pixels`` / ``data.max_pixels``,
        given to the processor that preprocesses raw images (as the trainer's is), so both see
        the same image tokens. ``context_length``: prompt + max_new_tokens limit; default the
        model's ``max_position_embeddings``."""
        from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

        self.model_path = str(hf_dir)
        if not (Path(hf_dir) / "config.json").is_file():
            raise RolloutError(f"{hf_dir} is not an HF model directory (no config.json)")
        if dtype not in _DTYPES:
            raise RolloutError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}")
        if num_threads:
            torch.set_num_threads(num_threads)
        t0 = time.time()
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(
            str(hf_dir), dtype=_DTYPES[dtype]).eval()
        self.processor = processor or load_processor(hf_dir, min_pixels, max_pixels)
        self.tokenizer = self.processor.tokenizer
        config = self.model.config
        self.image_token_id = config.image_token_id
        self.video_token_id = config.video_token_id
        self.merge_size = config.vision_config.spatial_merge_size
        try:
            gen_config = GenerationConfig.from_pretrained(str(hf_dir))
        except OSError:
            gen_config = self.model.generation_config
        self.stop_ids = default_stop_ids(self.tokenizer, gen_config)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (gen_config.pad_token_id or 0)
        self.max_batch_rows = max_batch_rows
        model_context = config.text_config.max_position_embeddings
        self.context_length = int(context_length or model_context)
        if self.context_length > model_context:
            raise RolloutError(f"context_length={self.context_length} is over the model's "
                               f"max_position_embeddings={model_context}")
        self.stop_event = threading.Event()   # set: every decode ends at its next step (shutdown)
        self._lock = threading.RLock()   # generation and weight updates never interleave
        self._targets = self._weight_targets()
        log.info("local rollout engine: %s loaded in %.1fs (%s)", hf_dir, time.time() - t0, dtype)

    # ---------------------------------------------------------------------------- generation
    def generate(self, prompts: Sequence[RolloutPrompt], params: SamplingParams,
                 n: int = 1) -> list[list[Sample]]:
        if n < 1:
            raise ValueError(f"n={n} must be >= 1")
        return self.run([GenRequest(p, params, sample_seeds(params, i, n))
                         for i, p in enumerate(prompts)])

    def run(self, requests: Sequence[GenRequest]) -> list[list[Sample]]:
        """Generate for requests that may each have their own params (the HTTP server's batches)."""
        prepared = [self.prepare(r.prompt) for r in requests]   # validate everything first
        for r, p in zip(requests, prepared):
            message = context_error(len(p.ids), r.params.max_new_tokens, self.context_length)
            if message:
                raise ContextLengthError(message)
        results: list[list[Sample]] = []
        chunk: list[int] = []
        for i, r in enumerate(requests):
            if chunk and sum(len(requests[j].seeds) for j in chunk) + len(r.seeds) > self.max_batch_rows:
                results += self._run_chunk([requests[j] for j in chunk], [prepared[j] for j in chunk])
                chunk = []
            chunk.append(i)
        if chunk:
            results += self._run_chunk([requests[j] for j in chunk], [prepared[j] for j in chunk])
        return results

    def prepare(self, prompt: RolloutPrompt) -> _Prepared:
        """Expanded ids + vision inputs of one prompt (images preprocessed if not given)."""
        ids = prompt.input_ids
        if self.video_token_id in ids:
            raise RolloutError("video inputs are not supported by the rollout engines")
        pixels, grid = prompt.pixel_values, prompt.image_grid_thw
        if pixels is None and prompt.images:
            pixels, grid = preprocess_images(self.processor.image_processor, prompt.images)
        if grid is not None:
            ids = expand_image_pads(ids, self.image_token_id, tokens_per_image(grid, self.merge_size))
        elif self.image_token_id in ids:
            raise RolloutError("the prompt has image placeholders but no images")
        return _Prepared(ids, pixels, grid)

    @torch.inference_mode()
    def _run_chunk(self, requests: list[GenRequest], prepared: list[_Prepared]) -> list[list[Sample]]:
        with self._lock:
            logits, cache, attn, next_pos = self._prefill(prepared)
            counts = [len(r.seeds) for r in requests]
            index = torch.repeat_interleave(torch.arange(len(requests)), torch.tensor(counts))
            cache.batch_select_indices(index)
            logits, attn, next_pos = logits[index], attn[index], next_pos[index]
            rows = [self._new_row(r, seed) for r in requests for seed in r.seeds]
            self._decode(rows, logits, cache, attn, next_pos)
        samples, k = [], 0
        for req, prep, count in zip(requests, prepared, counts):
            samples.append([self._to_sample(rows[k + j], len(prep.ids)) for j in range(count)])
            k += count
        return samples

    def _new_row(self, request: GenRequest, seed: int | None) -> _Row:
        params = request.params
        stop = () if params.ignore_eos else (*self.stop_ids, *params.stop_token_ids)
        return _Row(RowSampler.make(params.temperature, params.top_k, params.top_p, seed),
                    frozenset(stop), params.max_new_tokens, [], [], request=request)

    def _prefill(self, prepared: list[_Prepared]):
        """Left-padded prompt forward; returns last logits, cache, mask and next positions."""
        lengths = torch.tensor([len(p.ids) for p in prepared])
        width = int(lengths.max())
        input_ids = torch.full((len(prepared), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(prepared), width), dtype=torch.long)
        for i, p in enumerate(prepared):
            input_ids[i, width - len(p.ids):] = torch.tensor(p.ids)
            attn[i, width - len(p.ids):] = 1
        grids = [p.image_grid_thw for p in prepared if p.image_grid_thw is not None]
        pixels = [p.pixel_values for p in prepared if p.pixel_values is not None]
        grid = torch.cat(grids) if grids else None
        pixel_values = torch.cat(pixels).to(self.model.dtype) if pixels else None
        if grid is not None:
            mm_types = (input_ids == self.image_token_id).int()
            position_ids, deltas = self.model.model.get_rope_index(
                input_ids, mm_types, image_grid_thw=grid, attention_mask=attn)
            deltas = deltas[:, 0]
        else:  # text only: the three axes are the plain token index (pads get 0, masked anyway)
            position_ids = (attn.cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)
            deltas = torch.zeros(len(prepared), dtype=torch.long)
        cache = _new_cache(self.model.config.text_config)
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids,
                         pixel_values=pixel_values, image_grid_thw=grid, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), cache, attn, lengths + deltas

    def _decode(self, rows: list[_Row], logits, cache, attn, next_pos) -> None:
        active = list(range(len(rows)))
        t0 = last_note = time.monotonic()
        step = 0
        while True:
            step += 1
            if time.monotonic() - last_note > 30:   # long CPU rollouts: show they progress
                last_note = time.monotonic()
                log.info("decoding: step %d, %d/%d sequences active, %.0fs", step, len(active),
                         len(rows), last_note - t0)
            tokens, logprobs = sample_tokens(logits, [rows[a].sampler for a in active])
            keep = []
            now, stopping = time.monotonic(), self.stop_event.is_set()
            for k, (a, tok, lp) in enumerate(zip(active, tokens.tolist(), logprobs.tolist())):
                row = rows[a]
                row.tokens.append(tok)
                row.logprobs.append(lp)
                if stopping or (row.request is not None and row.request.aborted(now)):
                    row.finish = "abort"   # deadline passed / client gone / shutting down
                elif tok in row.stop:
                    row.finish = "stop"
                elif len(row.tokens) >= row.max_new:
                    row.finish = "length"
                else:
                    keep.append(k)
            if not keep:
                return
            if len(keep) < len(active):   # drop finished rows from every batched state
                sel = torch.tensor(keep)
                cache.batch_select_indices(sel)
                attn, next_pos, tokens = attn[sel], next_pos[sel], tokens[sel]
                active = [active[k] for k in keep]
            attn = torch.cat([attn, attn.new_ones((len(active), 1))], dim=1)
            position_ids = next_pos.view(1, -1, 1).expand(3, -1, 1)
            out = self.model(input_ids=tokens[:, None], attention_mask=attn,
                             position_ids=position_ids, past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1].float()
            next_pos = next_pos + 1

    def _to_sample(self, row: _Row, prompt_tokens: int) -> Sample:
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        return Sample(row.tokens, row.logprobs, text, row.finish, prompt_tokens)

    # --------------------------------------------------------------------------- weights
    def _weight_targets(self) -> dict[str, torch.Tensor]:
        """HF name -> parameter; tied names (lm_head <-> embed_tokens) both resolve."""
        return dict(self.model.state_dict(keep_vars=True))

    def _check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        unknown = sorted(n for n in shapes if n not in self._targets)
        wrong = [f"{n}: got {tuple(s)}, model has {tuple(self._targets[n].shape)}"
                 for n, s in shapes.items()
                 if n in self._targets and tuple(self._targets[n].shape) != tuple(s)]
        problems = []
        if unknown:
            problems.append(f"{len(unknown)} unknown tensor name(s): {', '.join(unknown[:8])}"
                            + (" ..." if len(unknown) > 8 else "")
                            + " (expected transformers Qwen3-VL names such as "
                              "model.language_model.layers.0.self_attn.q_proj.weight)")
        if wrong:
            problems.append(f"shape mismatch: {'; '.join(wrong[:8])}")
        if problems:
            raise WeightUpdateError("weight update rejected, nothing was loaded: " + "; ".join(problems))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        items = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
        self._check({n: tuple(t.shape) for n, t in items})
        with self._lock, torch.no_grad():
            for name, tensor in items:
                self._targets[name].copy_(tensor)
        return len(items)

    def update_weights_from_disk(self, model_path: str | Path) -> None:
        from safetensors import safe_open

        model_dir = Path(model_path)
        files = safetensors_files(model_dir)
        shapes, where = {}, {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    shapes[name] = tuple(h.get_slice(name).get_shape())
                    where[name] = f
        self._check(shapes)
        covered = {id(self._targets[n]) for n in shapes}
        missing = sorted(n for n, t in self._targets.items() if id(t) not in covered)
        if missing:
            raise WeightUpdateError(f"weight update rejected, nothing was loaded: {model_dir} lacks "
                                    f"{len(missing)} tensor(s) of the model: {', '.join(missing[:8])}")
        with self._lock, torch.no_grad():
            for f in files:   # one tensor in memory at a time
                with safe_open(str(f), framework="pt") as h:
                    for name in h.keys():
                        self._targets[name].copy_(h.get_tensor(name))
        self.model_path = str(model_dir)
        log.info("local rollout engine: weights reloaded from %s", model_dir)

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[torch.Tensor]:
        """The first ``truncate_size`` rows of the loaded ``name`` (fp32), as SGLang's route."""
        if name not in self._targets:
            raise WeightUpdateError(f"the local engine's model has no tensor {name}")
        with self._lock:
            return [self._targets[name].detach()[:truncate_size].float().clone()]

    # ------------------------------------------------------------------------------ misc
    def health(self) -> dict:
        return {"ok": True, "engine": "local", "model_path": self.model_path}

    def shutdown(self) -> None:
        pass
