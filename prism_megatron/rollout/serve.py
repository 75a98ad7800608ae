"""A CPU server speaking the subset of SGLang's native HTTP API that the rollout client uses.

    python -m prism_megatron.rollout.serve --model-path DIR [--host 127.0.0.1] [--port 30000]

It runs the CPU engine (``local.py``) behind the same endpoints and JSON shapes as
``python -m sglang.launch_server``, so ``SGLangEngine`` is exercised for real on machines without
a GPU:

    GET  /health, /health_generate (one greedy token), /get_model_info, /server_info
         (= /get_server_info: tp_size 1, version, image_token_id, memory state)
    POST /generate                      input_ids | text, image_data, sampling_params, return_logprob
    POST /flush_cache                   400 "Flush cache failed." while requests are in flight
    POST /release_memory_occupation, /resume_memory_occupation   {"tags": [weights, kv_cache]}
    POST /begin_weight_update, /end_weight_update                 the weight-update session
    POST /update_weights_from_disk      {"model_path": DIR}
    POST /update_weights_from_tensor    {"serialized_named_tensors": [B64], "load_format":
                                         "prism_safetensors", "flush_cache": true}
    POST /init_weights_update_group     {master_address, master_port, rank_offset, world_size,
                                         group_name, backend: "gloo"}: joins the trainer's group
    POST /update_weights_from_distributed  {names, dtypes, shapes, group_name, load_format:
                                         "flattened_bucket" | null}: receives rank 0's broadcast
    POST /get_weights_by_name           {name, truncate_size}: the first rows of a tensor (fp32)

It refuses what SGLang 0.5.23 refuses, with SGLang's messages: tensor updates outside a
``/begin_weight_update`` .. ``/end_weight_update`` session (400); an ``input_ids`` prompt with
more ``<|image_pad|>`` tokens than images (SGLang counts every pad as one image and fails with an
IndexError, HTTP 500; one pad per image is the only form it takes); ``/flush_cache`` while
requests are queued or decoding (400); memory release while requests run (400); resuming a tag
that is not released (SGLang's KeyError, 400). Distributed updates are refused (400, before any
broadcast is received, so the sender fails instead of hanging) outside a session or for a group
not initialised; the group is joined as SGLang joins it (a TCP rendezvous at the trainer's
``master_address:master_port``, a ``PrefixStore(group_name)``, torch's group helper) with gloo
instead of NCCL, and a bucket is received in the worker thread between batches. Unknown tensor
names in a tensor or distributed update are skipped with a warning, as SGLang's loaders skip
them; ``/get_weights_by_name`` of an unknown name is SGLang's 400 "Get parameter by name
failed".

Memory (``--enable-memory-saver``, as SGLang's): releasing ``weights`` zeroes them (what a GPU
gives back after the memory saver is garbage; here it is zeros, so a missed sync is visible as
uniform log-probs ``-log(vocab)``), unless ``--enable-weights-cpu-backup`` keeps a copy that the
resume restores; while ``weights`` are released, updates and generation are refused; while
``kv_cache`` is released, generation is refused. Without the memory saver, release only flushes
the cache (SGLang's no-op adapter).

Tensor wire format of this server (SGLang's own pickles CUDA IPC handles, useless on CPU): each
element of ``serialized_named_tensors`` is the base64 of a safetensors file
(``safetensors.torch.save({hf_name: tensor})``), one bucket per request; only the first element is
read (SGLang sends one copy per TP rank). ``load_format`` must be ``"prism_safetensors"``.

Sampling-param differences from SGLang, all documented: ``sampling_seed`` is always honoured
(the CPU engine's generator; real SGLang uses it only under ``--enable-deterministic-inference``,
with its own RNG, so the two never draw the same samples); with ``n > 1`` sample j is seeded with
``derive_seed(sampling_seed, j)`` (distinct samples); ``stop`` strings, penalties
and ``min_p`` are refused with a 400 rather than ignored.

Concurrency: handler threads parse and validate (images included) and hand jobs to one worker
thread, which merges the generate jobs queued at that moment into one batch (one forward per
token for all of them) and runs weight updates between batches, never during one. Malformed
requests get a 4xx JSON error ``{"object": "error", "message": ..., "code": ...}``, never a
traceback.

Limits (flags): a request whose prompt + ``max_new_tokens`` exceeds ``--context-length`` (default
the model's ``max_position_embeddings``) gets SGLang's answer, HTTP 400
``{"error": {"message": "Requested token count exceeds the model's maximum context length ..."}}``;
a request still queued or decoding after ``--request-timeout-s`` (or whose client closed the
connection) is cancelled, its rows leave the batch at the next decode step, and it is answered
with HTTP 504; bodies over ``--max-body-mb`` (``--max-update-body-mb`` for the weight-update
routes) get HTTP 413 before they are read; the listen backlog is ``--listen-backlog`` (Python's
default of 5 resets connections beyond a handful of concurrent clients). SIGTERM/SIGINT end the
running decode at its next step, answer waiting requests with 503 and exit.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import queue
import select
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prism_megatron.rollout.base import (
    RolloutError, RolloutPrompt, SamplingParams, WeightUpdateError, derive_seed)
from prism_megatron.rollout.images import (
    BadImage, expand_image_pads, preprocess_images, tokens_per_image)
from prism_megatron.rollout.groups import FLATTENED, broadcast, bucket_bytes, join_group, unflatten
from prism_megatron.rollout.local import ContextLengthError, GenRequest, LocalEngine, context_error

log = logging.getLogger("prism_megatron.rollout.serve")

MB = 1 << 20
DEFAULT_MAX_BODY_MB = 64             # /generate and the small routes
# Weight buckets arrive as base64 inside JSON: a rollout.weight_bucket_mb=512 bucket is ~683 MiB.
DEFAULT_MAX_UPDATE_BODY_MB = 1024
UPDATE_ROUTES = ("/update_weights_from_tensor", "/update_weights_from_disk")
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")    # SGLang's GPU_MEMORY_ALL_TYPES
# SGLang 0.5.23's messages (managers/scheduler_components/weight_updater.py)
NO_SESSION = ("update_weights_from_tensor must run between begin_weight_update() and "
              "end_weight_update()")
NO_SESSION_DISTRIBUTED = NO_SESSION.replace("update_weights_from_tensor",
                                            "update_weights_from_distributed")
SESSION_OPEN = "a weight-update session is already open; call end_weight_update() first"
SESSION_CLOSED = "no weight-update session is open; call begin_weight_update() first"
NOT_IDLE = "release_memory_occupation should be called only when server is idle."
DEFAULT_REQUEST_TIMEOUT_S = 600.0    # = rollout.request_timeout_s, the client's own limit
DEFAULT_LISTEN_BACKLOG = 1024        # pending connections; the kernel caps it at somaxconn
TENSOR_LOAD_FORMAT = "prism_safetensors"

# sampling_params keys and the only values this server accepts for the ones it does not implement.
_SAMPLING_KEYS = {"temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "n",
                  "sampling_seed", "ignore_eos", "skip_special_tokens",
                  "spaces_between_special_tokens", "no_stop_trim"}
_NEUTRAL = {"min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
            "repetition_penalty": 1.0, "min_new_tokens": 0, "stop": None}
# /generate keys that are accepted and ignored (meaningless or fixed on this server).
_IGNORED_GENERATE_KEYS = {"rid", "logprob_start_len", "return_text_in_logprobs", "modalities",
                          "lora_path", "custom_logit_processor", "top_logprobs_num"}


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ContextTooLong(BadRequest):
    """Answered as SGLang's /generate answers a ValueError: HTTP 400 {"error": {"message": ...}}."""


class RequestAborted(Exception):
    """A generate job ended before its samples were complete (deadline, shutdown)."""

    def __init__(self, message: str, status: int = HTTPStatus.GATEWAY_TIMEOUT):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------ request parsing

def _sampling(sp: Any, where: str, default_max_new: int):
    """SGLang sampling_params dict -> (SamplingParams, n, sampling_seed)."""
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise BadRequest(f"{where}: sampling_params must be a JSON object")
    for key, neutral in _NEUTRAL.items():
        if key in sp and sp[key] not in (neutral, [], None):
            raise BadRequest(f"{where}: sampling_params.{key}={sp[key]!r} is not supported by this "
                             f"CPU server")
    unknown = sorted(set(sp) - _SAMPLING_KEYS - set(_NEUTRAL))
    if unknown:
        raise BadRequest(f"{where}: unknown sampling_params {unknown}; supported: "
                         f"{sorted(_SAMPLING_KEYS)}")
    if sp.get("skip_special_tokens", True) is not True:
        raise BadRequest(f"{where}: only skip_special_tokens=true is supported")
    try:
        n = int(sp.get("n", 1))
        seed = sp.get("sampling_seed")
        params = SamplingParams(
            temperature=float(sp.get("temperature", 1.0)), top_p=float(sp.get("top_p", 1.0)),
            top_k=int(sp.get("top_k", -1)),
            max_new_tokens=int(sp.get("max_new_tokens", default_max_new)),
            stop_token_ids=tuple(int(t) for t in (sp.get("stop_token_ids") or ())),
            ignore_eos=bool(sp.get("ignore_eos", False)),
            seed=None if seed is None else int(seed))
    except (TypeError, ValueError) as e:
        raise BadRequest(f"{where}: bad sampling_params ({e})") from None
    if n < 1:
        raise BadRequest(f"{where}: sampling_params.n={n} must be >= 1")
    return params, n


def _as_batch(value: Any, batch: bool, size: int, name: str) -> list:
    """A per-request field in single or batch form -> one entry per request."""
    if not batch:
        return [value]
    if isinstance(value, list) and len(value) == size:
        return value
    if isinstance(value, list) and name == "image_data" and not value:
        return [None] * size
    if isinstance(value, (dict, bool)) or value is None:
        return [value] * size
    raise BadRequest(f"{name} must be one value or a list with one entry per prompt ({size})")


def parse_generate(body: Any, engine, default_max_new: int = 128):
    """Validate a /generate body; returns (requests, per-request info, batch?)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("stream"):
        raise BadRequest("stream=true is not supported by this server")
    known = {"input_ids", "text", "image_data", "sampling_params", "return_logprob", "stream"}
    unknown = sorted(set(body) - known - _IGNORED_GENERATE_KEYS)
    if unknown:
        raise BadRequest(f"unknown /generate fields {unknown}")
    if body.get("top_logprobs_num"):
        raise BadRequest("top_logprobs_num is not supported by this server")

    if body.get("input_ids") is not None:
        ids = body["input_ids"]
        batch = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
        id_lists = ids if batch else [ids]
    elif body.get("text") is not None:
        text = body["text"]
        batch = isinstance(text, list)
        texts = text if batch else [text]
        if not all(isinstance(t, str) for t in texts):
            raise BadRequest("text must be a string or a list of strings")
        id_lists = [engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    else:
        raise BadRequest("missing input_ids (or text)")
    vocab = engine.model.config.text_config.vocab_size
    for i, ids in enumerate(id_lists):
        if not isinstance(ids, list) or not ids or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise BadRequest(f"input_ids[{i}] must be a non-empty list of token ids in [0, {vocab})"
                             if batch else f"input_ids must be a non-empty list of token ids in "
                                           f"[0, {vocab})")
    size = len(id_lists)
    images = _as_batch(body.get("image_data"), batch, size, "image_data")
    sps = _as_batch(body.get("sampling_params"), batch, size, "sampling_params")
    logprob_flags = _as_batch(body.get("return_logprob", False), batch, size, "return_logprob")

    requests, info = [], []
    for i in range(size):
        where = f"prompt {i}" if batch else "request"
        params, n = _sampling(sps[i], where, default_max_new)
        imgs = images[i]
        imgs = [] if imgs is None else imgs if isinstance(imgs, list) else [imgs]
        ids = id_lists[i]
        pixels = grid = None
        try:
            pads = ids.count(engine.image_token_id)
            if imgs and pads > len(imgs):
                # SGLang's build_input_ids takes every pad for an image start and indexes the
                # grid of image `pads-1`: an expanded run fails there (an unhandled IndexError)
                raise BadRequest(f"internal error: IndexError: index {len(imgs)} is out of "
                                 f"bounds for dimension 0 with size {len(imgs)}",
                                 HTTPStatus.INTERNAL_SERVER_ERROR)
            if imgs:
                pixels, grid = preprocess_images(engine.processor.image_processor, imgs)
                ids = expand_image_pads(ids, engine.image_token_id,
                                        tokens_per_image(grid, engine.merge_size))
            elif engine.image_token_id in ids:
                raise BadImage("the prompt has image placeholders but image_data is empty")
        except BadImage as e:
            raise BadRequest(f"{where}: image_data: {e}") from None
        context = getattr(engine, "context_length", None)
        message = context and context_error(len(ids), params.max_new_tokens, context)
        if message:
            raise ContextTooLong(message)   # SGLang's exact text, batch or not
        seed = params.seed
        seeds = [None] * n if seed is None else [seed] if n == 1 else [
            derive_seed(seed, j) for j in range(n)]
        requests.append(GenRequest(RolloutPrompt(ids, [], pixels, grid), params, seeds))
        info.append({"return_logprob": bool(logprob_flags[i]), "max_new": params.max_new_tokens})
    return requests, info, batch


def sample_json(sample, return_logprob: bool, max_new: int, latency: float) -> dict:
    """One sample in SGLang's /generate response shape."""
    if sample.finish_reason == "stop":
        finish = {"type": "stop", "matched": sample.token_ids[-1]}
    else:
        finish = {"type": "length", "length": max_new}
    meta = {"id": uuid.uuid4().hex, "finish_reason": finish, "prompt_tokens": sample.prompt_tokens,
            "completion_tokens": len(sample.token_ids), "cached_tokens": 0,
            "e2e_latency": latency}
    if return_logprob:
        meta["output_token_logprobs"] = [[lp, tok, None]
                                         for lp, tok in zip(sample.logprobs, sample.token_ids)]
    return {"text": sample.text, "output_ids": sample.token_ids, "meta_info": meta}


def decode_tensor_bucket(body: Any) -> dict:
    """/update_weights_from_tensor body (this server's format, see the module doc) -> tensors."""
    from safetensors.torch import load as load_safetensors

    if not isinstance(body, dict) or "serialized_named_tensors" not in body:
        raise BadRequest("missing serialized_named_tensors")
    fmt = body.get("load_format")
    if fmt != TENSOR_LOAD_FORMAT:
        raise BadRequest(f"load_format={fmt!r}: this CPU server takes load_format="
                         f"'{TENSOR_LOAD_FORMAT}' (base64 safetensors bytes), not SGLang's "
                         f"pickled CUDA tensors")
    blobs = body["serialized_named_tensors"]
    if not isinstance(blobs, list) or not blobs or not isinstance(blobs[0], str):
        raise BadRequest("serialized_named_tensors must be a non-empty list of base64 strings")
    try:
        return load_safetensors(base64.b64decode(blobs[0], validate=True))
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"serialized_named_tensors[0] is not base64 safetensors data ({e})") from None
    except Exception as e:  # safetensors raises its own error type for corrupt headers
        raise BadRequest(f"serialized_named_tensors[0] is not a safetensors file ({e})") from None


def parse_init_group(body: Any) -> dict:
    """/init_weights_update_group fields (SGLang's InitWeightsUpdateGroupReqInput)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    out = {}
    for key, kind in (("master_address", str), ("master_port", int), ("rank_offset", int),
                      ("world_size", int)):
        value = body.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BadRequest(f"{key} must be a{'n integer' if kind is int else ' string'}")
        out[key] = value
    out["group_name"] = str(body.get("group_name") or "weight_update_group")
    out["backend"] = body.get("backend") or "nccl"
    if out["backend"] != "gloo":
        raise BadRequest(f"backend={out['backend']!r}: this CPU server joins gloo groups only "
                         f"(NCCL needs GPUs; a CPU trainer sends over gloo)")
    if not 1 <= out["rank_offset"] < out["world_size"]:
        raise BadRequest(f"rank_offset={out['rank_offset']} must be in [1, world_size="
                         f"{out['world_size']}) (rank 0 is the trainer)")
    return out


def parse_update_distributed(body: Any) -> dict:
    """/update_weights_from_distributed fields (SGLang's UpdateWeightsFromDistributedReqInput)."""
    import torch

    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)) \
            or not names or not len(names) == len(dtypes) == len(shapes):
        raise BadRequest("names, dtypes and shapes must be lists of one length")
    for dtype in dtypes:
        if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise BadRequest(f"dtype {dtype!r} is not a torch dtype name (e.g. 'bfloat16')")
    if not all(isinstance(x, list) and all(isinstance(d, int) and d >= 0 for d in x)
               for x in shapes):
        raise BadRequest("each shape must be a list of non-negative integers")
    fmt = body.get("load_format")
    if fmt not in (None, FLATTENED):
        raise BadRequest(f"load_format={fmt!r} must be null (one broadcast per tensor) or "
                         f"'{FLATTENED}'")
    return {"names": [str(n) for n in names], "dtypes": dtypes, "shapes": shapes,
            "group_name": str(body.get("group_name") or "weight_update_group"),
            "load_format": fmt}


def receive_bucket(group, request: dict) -> dict:
    """The tensors of one /update_weights_from_distributed call, received from rank 0."""
    import torch

    dtypes, shapes = request["dtypes"], request["shapes"]
    if request["load_format"] == FLATTENED:
        buffer = torch.empty(bucket_bytes(dtypes, shapes), dtype=torch.uint8)
        broadcast(group, buffer).wait()
        tensors = unflatten(buffer, dtypes, shapes)
    else:   # one broadcast per tensor, in order
        tensors = [torch.empty(shape, dtype=getattr(torch, d)) for d, shape in zip(dtypes, shapes)]
        for work in [broadcast(group, t) for t in tensors]:
            work.wait()
    return dict(zip(request["names"], tensors))


# ------------------------------------------------------------ OpenAI-compatible chat completions

_CHAT_KEYS = {"messages", "model", "temperature", "top_p", "max_tokens", "max_completion_tokens",
              "seed", "n", "stop", "stream", "top_k", "presence_penalty", "frequency_penalty",
              "user", "logprobs", "response_format", "extra_body", "chat_template_kwargs"}
_CHAT_DEFAULT_MAX_TOKENS = 1024


def _chat_image(url: Any, where: str) -> Any:
    """An ``image_url`` part's url: a data: URI, a local path or a ``file://`` URI."""
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{where}: image_url.url must be a non-empty string")
    if url.startswith("file://"):
        url = url[len("file://"):]
    return url


def parse_chat(body: Any, engine, default_max_new: int = _CHAT_DEFAULT_MAX_TOKENS):
    """A ``/v1/chat/completions`` body -> (GenRequest, n, model name).

    Messages take OpenAI's content forms (a string, or ``text`` / ``image_url`` parts; image
    urls are data: URIs or local files, remote ones are refused offline); they are rendered with
    the checkpoint's own chat template plus the generation prompt, as SGLang does.
    """
    from prism_megatron.data.encode import encode_prompt
    from prism_megatron.rollout.images import load_image

    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("stream"):
        raise BadRequest("stream=true is not supported by this server")
    unknown = sorted(set(body) - _CHAT_KEYS)
    if unknown:
        raise BadRequest(f"unknown /v1/chat/completions fields {unknown}")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise BadRequest(f"{key}={body[key]!r} is not supported by this CPU server")
    if body.get("stop") not in (None, [], ""):
        raise BadRequest("stop strings are not supported by this CPU server")
    if body.get("logprobs"):
        raise BadRequest("logprobs are not supported on /v1/chat/completions by this server")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    hf_messages, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(f"{where} must be an object with role system|user|assistant")
        content = m.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    images.append(_chat_image(part.get("image_url"), f"{where}.content[{j}]"))
                    parts.append({"type": "image"})
                else:
                    raise BadRequest(f"{where}.content[{j}]: only text and image_url parts are "
                                     f"supported (got type {kind!r})")
        else:
            raise BadRequest(f"{where}.content must be a string or a list of parts")
        hf_messages.append({"role": m["role"], "content": parts})
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    try:
        n = int(body.get("n") or 1)
        seed = body.get("seed")
        params = SamplingParams(
            temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)), top_k=int(body.get("top_k", -1)),
            max_new_tokens=int(max_tokens if max_tokens is not None else default_max_new),
            seed=None if seed is None else int(seed))
    except (TypeError, ValueError) as e:
        raise BadRequest(f"bad sampling fields ({e})") from None
    if n < 1:
        raise BadRequest(f"n={n} must be >= 1")
    try:
        pil = [load_image(x) for x in images]
    except BadImage as e:
        raise BadRequest(f"image_url: {e}") from None
    try:
        enc = encode_prompt(engine.processor, hf_messages, pil)
    except Exception as e:  # noqa: BLE001 - the template/processor refused the messages
        raise BadRequest(f"cannot apply the chat template: {type(e).__name__}: {e}") from None
    ids = enc.input_ids.tolist()
    context = getattr(engine, "context_length", None)
    message = context and context_error(len(ids), params.max_new_tokens, context)
    if message:
        raise BadRequest(message)
    seeds = [params.seed] if n == 1 else [None] * n if params.seed is None else [
        derive_seed(params.seed, j) for j in range(n)]
    request = GenRequest(RolloutPrompt(ids, [], enc.pixel_values, enc.image_grid_thw), params,
                         seeds)
    return request, n, str(body.get("model") or engine.model_path)


def chat_completion_json(samples, model: str) -> dict:
    """OpenAI's (and SGLang's) ``chat.completion`` response for one prompt's samples."""
    prompt_tokens = samples[0].prompt_tokens if samples else 0
    completion = sum(len(s.token_ids) for s in samples)
    return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": j, "message": {"role": "assistant", "content": s.text},
                         "logprobs": None,
                         "finish_reason": "stop" if s.finish_reason == "stop" else "length"}
                        for j, s in enumerate(samples)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}}


# ------------------------------------------------------------------------------------- worker

_STOP = object()                 # the worker's end-of-queue sentinel


class _Job:
    def __init__(self, kind: str, payload: Any, deadline: float | None = None):
        self.kind, self.payload, self.future = kind, payload, Future()
        self.deadline = deadline
        self.cancel = threading.Event()      # the handler gave up (deadline, client gone)
        if kind == "generate":
            for r in payload:
                r.deadline, r.cancel = deadline, self.cancel

    def expired(self, now: float) -> bool:
        return self.cancel.is_set() or (self.deadline is not None and now > self.deadline)


class BatchWorker:
    """The one thread that touches the engine: merges queued generate jobs, serialises the rest.

    A generate job carries its deadline into the engine: its rows end at the first decode step
    past it (or once its handler cancels it), so the batch slot is freed; jobs whose deadline
    passed while queued are answered without running. ``stop()`` also ends a running decode at
    its next step.
    """

    def __init__(self, engine, max_rows: int = 256, wait_s: float = 0.005, *,
                 memory_saver: bool = False, weights_cpu_backup: bool = False):
        self.engine, self.max_rows, self.wait_s = engine, max_rows, wait_s
        self.queue: queue.Queue = queue.Queue()
        self.weight_version = 0
        self.memory_saver, self.weights_cpu_backup = memory_saver, weights_cpu_backup
        self.released: set[str] = set()       # SGLang's offload_tags
        self.weights_garbage = False           # resumed without a backup, not yet overwritten
        self._backup: dict | None = None
        self.session_open = False
        self.groups: dict = {}                 # weight-update process groups by name
        self.in_flight = 0                     # generate jobs submitted and not answered
        self._count_lock = threading.Lock()
        self.aborted = 0                  # generate jobs ended early (deadline, client gone, stop)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="rollout-worker", daemon=True)
        self.thread.start()

    def submit_job(self, kind: str, payload: Any, deadline: float | None = None) -> _Job:
        job = _Job(kind, payload, deadline)
        if kind == "generate":
            with self._count_lock:
                self.in_flight += 1
            job.future.add_done_callback(self._done)
        if self.stopping.is_set():
            job.future.set_exception(RequestAborted("the server is shutting down",
                                                    HTTPStatus.SERVICE_UNAVAILABLE))
        else:
            self.queue.put(job)
        return job

    def submit(self, kind: str, payload: Any, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.submit_job(kind, payload, deadline)
        try:
            return job.future.result(timeout)
        except TimeoutError:
            job.cancel.set()
            raise

    def _done(self, _future) -> None:
        with self._count_lock:
            self.in_flight -= 1

    def stop(self, timeout: float = 10.0) -> None:
        """End promptly: the running decode stops at its next step, queued jobs are refused."""
        self.stopping.set()
        stop_event = getattr(self.engine, "stop_event", None)
        if stop_event is not None:
            stop_event.set()
        self.queue.put(_STOP)
        self.thread.join(timeout=timeout)

    def _refuse(self, job: _Job, now: float) -> bool:
        """Answer a job that must not run (shutdown, expired while queued); True if answered."""
        if self.stopping.is_set():
            job.future.set_exception(RequestAborted("the server is shutting down",
                                                    HTTPStatus.SERVICE_UNAVAILABLE))
            return True
        if job.kind == "generate" and job.expired(now):
            self.aborted += 1
            job.future.set_exception(RequestAborted("the request's deadline passed while it "
                                                    "waited for a batch slot"))
            return True
        return False

    def _loop(self) -> None:
        held = None
        while True:
            job = held if held is not None else self.queue.get()
            held = None
            if job is _STOP:
                self._drain()
                return
            if self._refuse(job, time.monotonic()):
                continue
            if job.kind != "generate":
                self._run_one(job)
                continue
            batch, rows = [job], sum(len(r.seeds) for r in job.payload)
            deadline = time.monotonic() + self.wait_s
            while rows < self.max_rows:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is _STOP or nxt.kind != "generate":
                    held = nxt   # run after this batch, in arrival order
                    break
                if self._refuse(nxt, time.monotonic()):
                    continue
                batch.append(nxt)
                rows += sum(len(r.seeds) for r in nxt.payload)
            self._run_batch(batch)

    def _drain(self) -> None:
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP:
                self._refuse(job, time.monotonic())

    def _memory(self, op: str, tags: list[str]) -> None:
        """SGLang's release/resume_memory_occupation on the CPU engine's weights."""
        import torch

        if op == "release":
            self.released.update(tags)
            if "weights" in tags and self.memory_saver:
                targets = getattr(self.engine, "_targets", {})
                if self.weights_cpu_backup:
                    self._backup = {n: t.detach().clone() for n, t in targets.items()}
                with torch.no_grad():
                    for t in targets.values():
                        t.zero_()
            return
        missing = [t for t in tags if t not in self.released]
        if missing:   # SGLang: offload_tags.remove(tag) -> KeyError -> HTTP 400
            raise BadRequest(repr(missing[0]))
        self.released.difference_update(tags)
        if "weights" in tags and self.memory_saver:
            if self._backup is not None:
                targets = getattr(self.engine, "_targets", {})
                with torch.no_grad():
                    for n, t in targets.items():
                        t.copy_(self._backup[n])
                self._backup = None
            else:
                self.weights_garbage = True

    def _known(self, tensors: dict) -> dict:
        """SGLang's loaders skip names the model does not have: so does this server (warned)."""
        known = getattr(self.engine, "_targets", None)
        if known is None:
            return tensors
        unknown = sorted(n for n in tensors if n not in known)
        if unknown:
            log.warning("weight update: skipping %d unknown tensor name(s): %s", len(unknown),
                        ", ".join(unknown[:8]))
        return {n: t for n, t in tensors.items() if n in known}

    def refusal(self) -> str | None:
        """Why generation cannot run now (memory released), else None."""
        if not self.memory_saver:
            return None
        for tag in ("weights", "kv_cache"):
            if tag in self.released:
                return (f"the server's {tag} memory is released (release_memory_occupation); "
                        f"call resume_memory_occupation first")
        return None

    def _run_batch(self, batch: list[_Job]) -> None:
        requests = [r for job in batch for r in job.payload]
        try:
            results = self.engine.run(requests)
        except Exception as e:  # noqa: BLE001 - reported to the waiting request(s)
            if len(batch) > 1:   # one bad request must not fail the others merged with it
                for job in batch:
                    self._run_batch([job])
                return
            if not isinstance(e, RolloutError):
                log.exception("generation failed")
            batch[0].future.set_exception(e)
            return
        k = 0
        for job in batch:
            samples = results[k:k + len(job.payload)]
            k += len(job.payload)
            if any(s.finish_reason == "abort" for group in samples for s in group):
                self.aborted += 1
                job.future.set_exception(
                    RequestAborted("the server is shutting down", HTTPStatus.SERVICE_UNAVAILABLE)
                    if self.stopping.is_set() else
                    RequestAborted("the request's deadline passed while it was decoding; its "
                                   "batch slot was freed"))
            else:
                job.future.set_result(samples)

    def _run_one(self, job: _Job) -> None:
        try:
            if job.kind in ("update_tensor", "update_disk", "update_distributed") \
                    and "weights" in self.released and self.memory_saver:
                raise WeightUpdateError("the weights are released (release_memory_occupation): "
                                        "resume_memory_occupation with tags ['weights'] before "
                                        "updating them")
            if job.kind == "update_tensor":
                result = self.engine.update_weights(self._known(job.payload).items())
            elif job.kind == "update_distributed":
                request = job.payload
                tensors = receive_bucket(self.groups[request["group_name"]], request)
                result = self.engine.update_weights(self._known(tensors).items())
            elif job.kind == "update_disk":
                result = self.engine.update_weights_from_disk(job.payload)
                self.weights_garbage = False
            elif job.kind == "memory":
                job.future.set_result(self._memory(*job.payload))
                return
            else:
                raise ValueError(f"unknown job {job.kind}")
            self.weight_version += 1
            job.future.set_result(result)
        except Exception as e:  # noqa: BLE001
            job.future.set_exception(e)


# ------------------------------------------------------------------------------------ handler

_IN_FLIGHT = [0]                 # requests being handled (shutdown lets them answer first)
_IN_FLIGHT_LOCK = threading.Lock()


def _wait_in_flight(timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with _IN_FLIGHT_LOCK:
            if not _IN_FLIGHT[0]:
                return
        time.sleep(0.02)


class Handler(BaseHTTPRequestHandler):
    server_version = "prism-rollout/1"
    protocol_version = "HTTP/1.1"
    # set by make_server
    engine = None
    worker: BatchWorker = None
    default_max_new = 128
    max_body_bytes = DEFAULT_MAX_BODY_MB * MB
    max_update_body_bytes = DEFAULT_MAX_UPDATE_BODY_MB * MB
    request_timeout_s = DEFAULT_REQUEST_TIMEOUT_S

    def log_message(self, fmt, *args):   # route http.server's access log to logging
        log.debug("%s - %s", self.address_string(), fmt % args)

    # --- responses
    def _send(self, status: int, payload: Any = None, text: str | None = None) -> None:
        data = (text if text is not None else json.dumps(payload)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if text is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, sglang_generate: bool = False) -> None:
        kind = "BadRequestError" if status < 500 else "InternalServerError"
        self.close_connection = True   # the body may not have been read: do not reuse the socket
        if sglang_generate:   # SGLang's /generate ValueError answer (http_server.py)
            self._send(status, {"error": {"message": message}})
            return
        self._send(status, {"object": "error", "message": message, "type": kind, "param": None,
                            "code": status})

    def _wait(self, job: _Job):
        """The job's result; gives up at its deadline or when the client has gone, and cancels
        the job so the worker frees its batch slot."""
        late = RequestAborted(f"the request did not finish within the server's "
                              f"--request-timeout-s={self.request_timeout_s:g}; it was "
                              f"cancelled and its batch slot freed")
        while True:
            try:
                return job.future.result(timeout=0.25)
            except TimeoutError:
                pass
            except RequestAborted as e:    # the worker saw the deadline first
                raise late if e.status == HTTPStatus.GATEWAY_TIMEOUT else e from None
            if job.deadline is not None and time.monotonic() > job.deadline:
                job.cancel.set()
                raise late
            if self._client_gone():
                job.cancel.set()
                raise ConnectionResetError("client closed the connection")

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest("missing Content-Length", HTTPStatus.LENGTH_REQUIRED)
        try:
            length = int(length)
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        path = self.path.split("?", 1)[0].rstrip("/")
        update = path in UPDATE_ROUTES
        limit = self.max_update_body_bytes if update else self.max_body_bytes
        if length > limit:
            flag = "--max-update-body-mb" if update else "--max-body-mb"
            raise BadRequest(f"request body of {length} bytes is over this server's limit of "
                             f"{limit} bytes ({flag}={limit // MB})",
                             HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"malformed JSON body: {e}") from None

    # --- dispatch
    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT[0] += 1
        try:
            self._dispatch_one(method)
        finally:
            with _IN_FLIGHT_LOCK:
                _IN_FLIGHT[0] -= 1

    def _dispatch_one(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        route = ROUTES.get(path)
        try:
            body = self._body() if method == "POST" else {}
            if route is None:
                raise BadRequest(f"unknown endpoint {path}", HTTPStatus.NOT_FOUND)
            route(self, body)
        except ContextTooLong as e:
            self._error(int(e.status), str(e), sglang_generate=True)
        except BadRequest as e:
            self._error(int(e.status), str(e))
        except ContextLengthError as e:
            self._error(400, str(e), sglang_generate=True)
        except RequestAborted as e:
            self._error(int(e.status), str(e))
        except RolloutError as e:   # the engine refused the input (e.g. video tokens)
            self._error(400, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # noqa: BLE001 - the client gets a message, the log the traceback
            log.exception("%s %s failed", method, path)
            try:
                self._error(500, f"internal error: {type(e).__name__}: {e}")
            except OSError:
                pass

    # --- endpoints
    def health(self, body):
        self._send(200, text="")

    def health_generate(self, body):
        probe = GenRequest(RolloutPrompt([self.engine.stop_ids[0] if self.engine.stop_ids else 0]),
                           SamplingParams(temperature=0, max_new_tokens=1), [None])
        self._wait(self.worker.submit_job("generate", [probe], self._deadline()))
        self._send(200, text="")

    def _deadline(self) -> float | None:
        return time.monotonic() + self.request_timeout_s if self.request_timeout_s else None

    def generate(self, body):
        t0 = time.time()
        requests, info, batch = parse_generate(body, self.engine, self.default_max_new)
        refusal = self.worker.refusal()
        if refusal:
            raise ContextTooLong(refusal)   # SGLang's {"error": {"message"}} shape, 400
        results = self._wait(self.worker.submit_job("generate", requests, self._deadline()))
        latency = time.time() - t0
        out = [sample_json(s, i["return_logprob"], i["max_new"], latency)
               for samples, i in zip(results, info) for s in samples]
        single = not batch and len(out) == 1
        self._send(200, out[0] if single else out)

    def chat_completions(self, body):
        """POST /v1/chat/completions (OpenAI-compatible; what lmms-eval's ``openai`` model speaks)."""
        request, _, model = parse_chat(body, self.engine)
        results = self._wait(self.worker.submit_job("generate", [request], self._deadline()))
        self._send(200, chat_completion_json(results[0], model))

    def flush_cache(self, body):
        if self.worker.in_flight:   # SGLang flushes only when idle; else 400, empty message
            self._send(400, text="Flush cache failed.\n")
            return
        self._send(200, text="Cache flushed.\n")

    def _tags(self, body) -> list[str]:
        tags = body.get("tags") if isinstance(body, dict) else None
        if tags is None or tags == []:
            return list(MEMORY_TAGS)
        if not isinstance(tags, list) or any(t not in MEMORY_TAGS for t in tags):
            raise BadRequest(f"tags={tags!r}: each tag must be one of {list(MEMORY_TAGS)}")
        return tags

    def release_memory(self, body):
        tags = self._tags(body)
        if self.worker.in_flight:
            raise ContextTooLong(NOT_IDLE)
        self.worker.submit("memory", ("release", tags))
        self._send(200, None)

    def resume_memory(self, body):
        tags = self._tags(body)
        try:
            self.worker.submit("memory", ("resume", tags))
        except BadRequest as e:
            raise ContextTooLong(str(e)) from None
        self._send(200, None)

    def begin_session(self, body):
        if self.worker.session_open:
            self._send(400, {"success": False, "message": SESSION_OPEN})
            return
        self.worker.session_open = True
        self._send(200, {"success": True, "message": "Success"})

    def end_session(self, body):
        if not self.worker.session_open:
            self._send(400, {"success": False, "message": SESSION_CLOSED})
            return
        self.worker.session_open = False
        self._send(200, {"success": True, "message": "Success"})

    def model_info(self, body):
        self._send(200, {"model_path": self.engine.model_path, "tokenizer_path": self.engine.model_path,
                         "is_generation": True, "preferred_sampling_params": None,
                         "weight_version": str(self.worker.weight_version)})

    def server_info(self, body):
        self._send(200, {"engine": "prism-cpu", "model_path": self.engine.model_path,
                         "tp_size": 1, "image_token_id": self.engine.image_token_id,
                         "enable_memory_saver": self.worker.memory_saver,
                         "enable_weights_cpu_backup": self.worker.weights_cpu_backup,
                         "memory_released": sorted(self.worker.released),
                         "weights_garbage": self.worker.weights_garbage,
                         "weight_update_session": self.worker.session_open,
                         "weight_update_groups": sorted(self.worker.groups),
                         "in_flight_requests": self.worker.in_flight,
                         "max_batch_rows": self.worker.max_rows, "version": self.server_version,
                         "context_length": getattr(self.engine, "context_length", None),
                         "request_timeout_s": self.request_timeout_s,
                         "aborted_requests": self.worker.aborted,
                         "max_body_bytes": self.max_body_bytes,
                         "max_update_body_bytes": self.max_update_body_bytes})

    def update_disk(self, body):
        path = body.get("model_path") if isinstance(body, dict) else None
        if not isinstance(path, str) or not path:
            raise BadRequest("missing model_path")
        if not Path(path).is_dir():
            self._send(400, {"success": False, "message": f"model_path {path} is not a directory"})
            return
        try:
            self.worker.submit("update_disk", path)
        except WeightUpdateError as e:
            self._send(400, {"success": False, "message": str(e)})
            return
        self._send(200, {"success": True, "message": "Succeeded to update model weights.",
                         "num_paused_requests": 0})

    def update_tensor(self, body):
        tensors = decode_tensor_bucket(body)
        if not self.worker.session_open:
            self._send(400, {"success": False, "message": NO_SESSION})
            return
        try:
            count = self.worker.submit("update_tensor", tensors)
        except WeightUpdateError as e:
            self._send(400, {"success": False, "message": str(e)})
            return
        self.worker.weights_garbage = False
        self._send(200, {"success": True, "message": f"Succeeded to update {count} tensors."})

    def init_group(self, body):
        """SGLang's /init_weights_update_group: join the named group (blocks until it forms)."""
        try:
            fields = parse_init_group(body)
        except BadRequest as e:
            self._send(400, {"success": False, "message": str(e)})
            return
        timeout = self.request_timeout_s or DEFAULT_REQUEST_TIMEOUT_S
        try:
            group = join_group(fields["backend"], fields["master_address"],
                               fields["master_port"], fields["rank_offset"],
                               fields["world_size"], fields["group_name"], timeout)
        except Exception as e:  # noqa: BLE001 - a rendezvous that failed: the caller's message
            self._send(400, {"success": False,
                             "message": f"Failed to init process group: {type(e).__name__}: {e}"})
            return
        self.worker.groups[fields["group_name"]] = group
        log.info("joined weight-update group %s as rank %d of %d (%s:%d)", fields["group_name"],
                 fields["rank_offset"], fields["world_size"], fields["master_address"],
                 fields["master_port"])
        self._send(200, {"success": True,
                         "message": "Succeeded to initialize custom process group."})

    def update_distributed(self, body):
        """SGLang's /update_weights_from_distributed: receive one bucket broadcast by rank 0."""
        try:
            request = parse_update_distributed(body)
        except BadRequest as e:
            self._send(400, {"success": False, "message": str(e)})
            return
        if not self.worker.session_open:
            self._send(400, {"success": False, "message": NO_SESSION_DISTRIBUTED})
            return
        if request["group_name"] not in self.worker.groups:
            self._send(400, {"success": False, "message": (
                f"Group {request['group_name']} not in {sorted(self.worker.groups)}. Please call "
                f"`init_weights_update_group` first.")})
            return
        try:
            count = self.worker.submit("update_distributed", request)
        except WeightUpdateError as e:
            self._send(400, {"success": False, "message": str(e)})
            return
        self.worker.weights_garbage = False
        self._send(200, {"success": True, "message": f"Succeeded to update {count} tensors "
                                                     f"online."})

    def get_weights(self, body):
        """SGLang's /get_weights_by_name: the first ``truncate_size`` rows of a tensor, fp32."""
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise BadRequest("missing name")
        size = body.get("truncate_size", 100)
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise BadRequest(f"truncate_size={size!r} must be a positive integer")
        try:
            (tensor,) = self.engine.get_weights_by_name(body["name"], size)
        except WeightUpdateError:
            raise ContextTooLong("Get parameter by name failed") from None
        self._send(200, tensor.tolist())


ROUTES = {
    "/health": Handler.health,
    "/health_generate": Handler.health_generate,
    "/generate": Handler.generate,
    "/v1/chat/completions": Handler.chat_completions,
    "/flush_cache": Handler.flush_cache,
    "/release_memory_occupation": Handler.release_memory,
    "/resume_memory_occupation": Handler.resume_memory,
    "/begin_weight_update": Handler.begin_session,
    "/end_weight_update": Handler.end_session,
    "/get_model_info": Handler.model_info,
    "/get_server_info": Handler.server_info,
    "/server_info": Handler.server_info,
    "/update_weights_from_disk": Handler.update_disk,
    "/update_weights_from_tensor": Handler.update_tensor,
    "/init_weights_update_group": Handler.init_group,
    "/update_weights_from_distributed": Handler.update_distributed,
    "/get_weights_by_name": Handler.get_weights,
}


def make_server(engine, host: str, port: int, max_rows: int = 256, batch_wait_ms: float = 5.0,
                default_max_new: int = 128, *, request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                max_body_mb: float = DEFAULT_MAX_BODY_MB,
                max_update_body_mb: float = DEFAULT_MAX_UPDATE_BODY_MB,
                listen_backlog: int = DEFAULT_LISTEN_BACKLOG, memory_saver: bool = False,
                weights_cpu_backup: bool = False) -> tuple[ThreadingHTTPServer, BatchWorker]:
    worker = BatchWorker(engine, max_rows, batch_wait_ms / 1000, memory_saver=memory_saver,
                         weights_cpu_backup=weights_cpu_backup)
    handler = type("BoundHandler", (Handler,), {
        "engine": engine, "worker": worker, "default_max_new": default_max_new,
        "request_timeout_s": request_timeout_s, "max_body_bytes": int(max_body_mb * MB),
        "max_update_body_bytes": int(max_update_body_mb * MB)})
    # socketserver's default backlog is 5: concurrent clients beyond it get connection resets.
    server_class = type("BacklogHTTPServer", (ThreadingHTTPServer,),
                        {"request_queue_size": listen_backlog, "daemon_threads": True})
    try:
        httpd = server_class((host, port), handler)
    except BaseException:
        worker.stop(1)
        raise
    return httpd, worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prism_megatron.rollout.serve",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True, help="HF Qwen3-VL directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--max-batch-rows", type=int, default=256,
                        help="most sequences decoded together")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long the worker waits for more requests to batch")
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--context-length", type=int, default=None,
                        help="prompt + max_new_tokens limit (default: the model's "
                             "max_position_embeddings); longer requests get HTTP 400")
    parser.add_argument("--request-timeout-s", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                        help="a request still queued or decoding after this long is answered "
                             "with HTTP 504 and its batch slot freed (0: no limit)")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
                        help="largest request body, except the weight-update routes (HTTP 413)")
    parser.add_argument("--max-update-body-mb", type=float, default=DEFAULT_MAX_UPDATE_BODY_MB,
                        help="largest /update_weights_* body (a base64 bucket of "
                             "rollout.weight_bucket_mb is 4/3 of it)")
    parser.add_argument("--listen-backlog", type=int, default=DEFAULT_LISTEN_BACKLOG,
                        help="pending connections the socket holds (size it for the clients' "
                             "concurrency)")
    parser.add_argument("--min-pixels", type=int, default=None,
                        help="image processor pixel budget: the stage's data.min_pixels")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="image processor pixel budget: the stage's data.max_pixels")
    parser.add_argument("--enable-memory-saver", action="store_true",
                        help="release_memory_occupation really releases (SGLang's flag)")
    parser.add_argument("--enable-weights-cpu-backup", action="store_true",
                        help="released weights are kept in host memory and restored on resume")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [rollout-serve] %(message)s")

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        engine = LocalEngine(args.model_path, dtype=args.dtype, max_batch_rows=args.max_batch_rows,
                             num_threads=args.num_threads, min_pixels=args.min_pixels,
                             max_pixels=args.max_pixels, context_length=args.context_length)
    except (RolloutError, OSError, ValueError) as e:
        log.error("cannot load %s: %s", args.model_path, e)
        return 2
    if stop.is_set():
        return 0
    try:
        httpd, worker = make_server(engine, args.host, args.port, args.max_batch_rows,
                                    args.batch_wait_ms, request_timeout_s=args.request_timeout_s,
                                    max_body_mb=args.max_body_mb,
                                    max_update_body_mb=args.max_update_body_mb,
                                    listen_backlog=args.listen_backlog,
                                    memory_saver=args.enable_memory_saver,
                                    weights_cpu_backup=args.enable_weights_cpu_backup)
    except OSError as e:
        log.error("cannot listen on %s:%s: %s", args.host, args.port, e)
        return 2

    server_thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                     name="http", daemon=True)
    server_thread.start()
    log.info("serving %s on http://%s:%d (context %d tokens, request timeout %gs)",
             args.model_path, args.host, args.port, engine.context_length, args.request_timeout_s)
    while not stop.wait(0.5):
        pass
    log.info("shutting down")
    worker.stop(timeout=5)   # a running decode ends at its next step; waiting requests get 503
    _wait_in_flight(2.0)     # let their handlers send those answers
    httpd.shutdown()         # stop accepting
    httpd.server_close()
    return 0


if __name__ == "__main__":
    from prism_megatron.errors import run_cli

    sys.exit(run_cli(main))
