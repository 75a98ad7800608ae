"""``SGLangEngine``: the rollout client for SGLang servers (and for the CPU server, ``serve.py``).

It either launches servers as managed subprocesses (``python -m sglang.launch_server`` on GPUs,
``python -m prism_megatron.rollout.serve`` on CPU: ``server="sglang" | "prism"``, or any
``launch_command``) and waits until ``/health_generate`` answers, or attaches to running ones
(``urls``; an sglang-router URL counts as one server). Several servers are used data-parallel:
prompts are dispatched balanced by expected tokens (prompt tokens + n x the running mean
response length, largest first onto the least loaded server; ``last_dispatch``), weight updates
go to all of them.

Requests use SGLang's native API. One ``/generate`` call per prompt carries its ``n`` samples in
batch form (the same ``input_ids`` / images ``n`` times), each with its own ``sampling_seed``
(``derive_seed(seed, prompt_index, j)``). What a seed reproduces depends on the engine:

* the CPU engine and the CPU server (``serve.py``) honour every seed: the same seed redraws the
  same samples (a resumed run redraws them);
* real SGLang uses ``sampling_seed`` only when launched with ``--enable-deterministic-inference``
  (``rollout.deterministic: true``; batch-invariant kernels, a large throughput cost), and then
  with its own RNG: its samples are reproducible run to run on the same server configuration, but
  they are NOT the CPU engine's samples for the same seed. Without that flag, GPU rollouts are
  not reproducible at all and the seed is ignored.

Prompts carry exactly one ``<|image_pad|>`` per image (SGLang >= 0.5.20 expands each pad from
its own preprocessing and fails on an expanded run); the image token id comes from the model's
config.json, else from the server (``/server_info``), else the request is refused. A different
expanded prompt length is reported (the trainer would then see other image tokens). Managed
servers are launched with the stage's pixel budget (``min_pixels`` / ``max_pixels`` =
``data.min_pixels`` / ``data.max_pixels``, see ``_sglang_pixel_args``) so that they expand the
images to the trainer's token counts.

Failures: connection errors, timeouts and 5xx are retried with exponential backoff; then a
managed server that died is relaunched when ``restart_on_failure`` is set (weights loaded from
disk are re-applied; tensor-pushed weights cannot be, which is an error), otherwise a
``RolloutServerError`` names the URL, the cause and the server's log. 4xx answers raise
``RolloutRequestError`` with the server's message at once; ``/flush_cache``, which SGLang
refuses (400) while requests run, is retried with backoff for up to ``flush_timeout_s``.

Weight updates: ``update_weights_from_disk(dir)``, or ``update_weights(bucket)`` through
``/update_weights_from_tensor`` in SGLang's format (its ``MultiprocessingSerializer``, one payload
per server TP rank, after ``monkey_patch_torch_reductions()`` so CUDA tensors are shared by device
UUID; a colocated trainer) or the CPU server's (base64 safetensors, see ``serve.py``). SGLang
>= 0.5.21 refuses tensor updates outside a weight-update session: ``weight_update_session()``
(used by ``weight_sync.sync_weights`` around a whole sync) calls ``/begin_weight_update`` before
and ``/end_weight_update`` (the post-load hooks) after; a lone ``update_weights`` opens its own.
A 404 on those routes means an older server without sessions: they are skipped from then on.
Attached servers report their ``tp_size`` and ``version`` through ``/server_info``. The
distributed path (``weight_sync``'s stage senders) calls ``/init_weights_update_group`` and, per
bucket, ``/update_weights_from_distributed`` on one server at a time (never retried: each is half
of a rendezvous or a broadcast); ``get_weights_by_name`` reads tensors back for the spot check;
``preferred_weight_sync()`` is what ``rollout.weight_sync=auto`` becomes. ``host`` is where
launched servers listen and are reached (a node's own address when servers run on every node,
``rollout.make_rank_engine``); ``owned`` engines are stopped with this one.

Memory: ``release_memory(tags)`` / ``resume_memory(tags)`` call SGLang's
``/release_memory_occupation`` / ``/resume_memory_occupation`` (tags ``weights``, ``kv_cache``;
all when None) when ``release_memory_between_phases`` is set (launched with
``--enable-memory-saver``; ``weights_cpu_backup`` adds ``--enable-weights-cpu-backup``). Released
weights come back as garbage unless backed up: use ``base.phase_train`` / ``base.phase_generate``,
which resume the weights, sync, and only then resume the KV cache.
"""

from __future__ import annotations

import atexit
import base64
import http.client
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prism_megatron.distributed import free_port
from prism_megatron.rollout.base import (
    KV_CACHE, WEIGHTS, RolloutEngine, RolloutError, RolloutPrompt, RolloutRequestError,
    RolloutServerError, Sample, SamplingParams, WeightReadbackUnsupported, WeightUpdateError,
    sample_seeds)
from prism_megatron.rollout.images import collapse_image_pads, image_to_data_url

log = logging.getLogger(__name__)

SERVER_MODULES = {"sglang": "sglang.launch_server", "prism": "prism_megatron.rollout.serve"}
_RETRYABLE = (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout,
              http.client.HTTPException)


@dataclass
class _Server:
    url: str
    command: list[str] | None = None        # None: attached, not ours to start or stop
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    info: dict = field(default_factory=dict)   # /server_info (tp_size, version, ...)
    sessions: bool = True                      # False: an older server without session routes

    @property
    def managed(self) -> bool:
        return self.command is not None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(text)


def _error_message(raw: bytes) -> str:
    """The human part of an error body (SGLang: {"message"} / {"error": {"message"}} / text)."""
    text = raw.decode(errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500] or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        for key in ("message", "detail", "error"):
            if key in data:
                return str(data[key])
    return text[:500]


class SGLangEngine(RolloutEngine):
    """Rollouts through SGLang's native HTTP API (managed or attached servers)."""

    def __init__(self, *, urls: Sequence[str] = (), model_path: str | Path | None = None,
                 server: str = "sglang", num_servers: int = 1, tp: int = 1,
                 mem_fraction: float = 0.5, launch_command: Callable[[int, int], list[str]] | None = None,
                 extra_server_args: Sequence[str] = (), launch_timeout_s: float = 900.0,
                 request_timeout_s: float = 600.0, max_retries: int = 3, backoff_s: float = 0.5,
                 restart_on_failure: bool = False, release_memory_between_phases: bool = False,
                 weights_cpu_backup: bool = False, deterministic: bool = False,
                 max_concurrency: int = 64, image_token_id: int | None = None,
                 wire_format: str | None = None, log_dir: str | Path | None = None,
                 env: dict[str, str] | None = None, min_pixels: int | None = None,
                 max_pixels: int | None = None, flush_timeout_s: float = 60.0,
                 host: str = "127.0.0.1", owned: Sequence["SGLangEngine"] = ()):
        self.tp, self.mem_fraction = tp, mem_fraction
        # host: the address launched servers listen on and are reached at (a node's own
        # address when other nodes dispatch to them); owned: engines whose servers this one
        # stops at shutdown (a node owner's, when the sender attaches to every node's servers)
        self.host, self.owned = host, list(owned)
        # the stage's data.min_pixels / max_pixels: launched servers preprocess raw images with
        # the same budget as the trainer's processor (attached servers are the operator's)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.request_timeout_s, self.max_retries, self.backoff_s = request_timeout_s, max_retries, backoff_s
        self.restart_on_failure = restart_on_failure
        self.release_between_phases = release_memory_between_phases
        self.weights_cpu_backup, self.deterministic = weights_cpu_backup, deterministic
        self.flush_timeout_s = flush_timeout_s
        self.max_concurrency = max_concurrency
        self.launch_timeout_s = launch_timeout_s
        self.model_path = str(model_path) if model_path else None
        self.env = env
        self._response_len = 0.0            # running mean response length (dispatch cost)
        self.last_dispatch: list[int] = []   # expected tokens sent to each server last call
        self._weights: tuple[str, str | None] = ("initial", None)   # what a restart must restore
        self._warned_prompt_len = False
        self._closed = False
        self._session_depth = 0
        self._released: set[str] = set()
        if image_token_id is None and model_path:
            image_token_id = _config_image_token(Path(model_path))
        self.image_token_id = image_token_id

        if urls:
            self.servers = [_Server(u.rstrip("/")) for u in urls]
            self._read_server_info(adopt_tp=True)
            self.wire_format = wire_format or self._detect_wire_format()
            return
        if not model_path:
            raise RolloutError("SGLangEngine needs urls of running servers or a model_path to launch")
        if launch_command is None:
            if server not in SERVER_MODULES:
                raise RolloutError(f"server={server!r} is not one of {sorted(SERVER_MODULES)}")
            if server == "sglang" and importlib.util.find_spec("sglang") is None:
                raise RolloutError(
                    "rollout.engine=sglang needs the sglang package, which is not installed "
                    "(GPU only): pip install -r requirements-gpu.txt, or set rollout.urls to "
                    "running servers, or use rollout.engine=local on CPU")
            launch_command = self._default_command(server, list(extra_server_args))
        self.wire_format = wire_format or ("prism" if server == "prism" else "sglang")
        self._log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="rollout-servers-"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self.servers = []
        for k in range(num_servers):
            port = free_port()
            self.servers.append(_Server(f"http://{self.host}:{port}", launch_command(k, port),
                                        log_path=self._log_dir / f"server{k}-{port}.log"))
        atexit.register(self.shutdown)
        try:
            for s in self.servers:
                self._start(s)
            for s in self.servers:
                self._wait_ready(s)
            self._read_server_info(adopt_tp=False)
        except BaseException:
            self.shutdown()
            raise

    def _read_server_info(self, adopt_tp: bool) -> None:
        """``/server_info`` of every server (``/get_server_info`` before SGLang 0.5.x renamed it).

        Attached servers are the operator's: their ``tp_size`` (how many tensor payloads an
        update carries) and image token come from the server, not from the config.
        """
        for s in self.servers:
            s.info = {}
            for route in ("/server_info", "/get_server_info"):
                try:
                    out = self._http(s.url + route, None, timeout=30, method="GET")
                except RolloutRequestError:
                    continue            # 404: the older name
                except (RolloutError, *_RETRYABLE):
                    break
                s.info = out if isinstance(out, dict) else {}
                break
        infos = [s.info for s in self.servers if s.info]
        if adopt_tp and infos:
            sizes = {int(i.get("tp_size") or 1) for i in infos}
            if len(sizes) > 1:
                raise RolloutError(f"the rollout servers {[s.url for s in self.servers]} report "
                                   f"different tp_size values {sorted(sizes)}; attach servers of "
                                   f"one shape")
            self.tp = sizes.pop()
        if self.image_token_id is None:
            for info in infos:
                token = info.get("image_token_id")
                if token is None and info.get("model_path"):
                    token = _config_image_token(Path(str(info["model_path"])))
                if token is not None:
                    self.image_token_id = int(token)
                    break

    def preferred_weight_sync(self) -> str:
        """``tensor`` when every server is on this node (launched here, or attached at a loopback
        url: CUDA-IPC / the CPU server's body reach it), else ``distributed`` (servers on other
        nodes: a broadcast over the weight-update group, no shared filesystem needed)."""
        from prism_megatron.rollout.groups import is_loopback

        if all(s.managed or is_loopback(s.url) for s in self.servers):
            return "tensor"
        return "distributed"

    @property
    def server_versions(self) -> dict[str, str | None]:
        return {s.url: s.info.get("version") for s in self.servers}

    # ------------------------------------------------------------------------ server processes
    def _default_command(self, server: str, extra: list[str]) -> Callable[[int, int], list[str]]:
        module = SERVER_MODULES[server]

        def command(k: int, port: int) -> list[str]:
            cmd = [sys.executable, "-m", module, "--model-path", self.model_path,
                   "--host", self.host, "--port", str(port)]
            if server == "sglang":
                cmd += ["--tp-size", str(self.tp), "--mem-fraction-static", str(self.mem_fraction),
                        "--base-gpu-id", str(k * self.tp)]
                if self.deterministic:
                    cmd.append("--enable-deterministic-inference")
                cmd += self._memory_flags()
                cmd += self._sglang_pixel_args()
            else:
                cmd += ["--request-timeout-s", f"{self.request_timeout_s:g}"]
                cmd += self._memory_flags()
                for flag, value in (("--min-pixels", self.min_pixels),
                                    ("--max-pixels", self.max_pixels)):
                    if value:
                        cmd += [flag, str(int(value))]
            return cmd + extra

        return command

    def _memory_flags(self) -> list[str]:
        """Release/resume needs the memory saver; the CPU weight backup keeps weights across it."""
        if not self.release_between_phases:
            return []
        return ["--enable-memory-saver"] + (["--enable-weights-cpu-backup"]
                                            if self.weights_cpu_backup else [])

    def _sglang_pixel_args(self) -> list[str]:
        """SGLang's image budget flags for ``data.min_pixels`` / ``data.max_pixels``.

        ``--mm-process-config '{"image": {...}}'``: SGLang's BaseMultimodalProcessor
        (python/sglang/srt/multimodal/processors/base_processor.py, ``process_mm_data``) passes
        the ``image`` dict as ``images_kwargs`` to the HF processor call; we send transformers 5's
        ``size={"shortest_edge", "longest_edge"}`` (both keys are required, so the one not set
        comes from the checkpoint's preprocessor_config.json). SGLang's Qwen-VL processor also
        pre-resizes PIL images on its own, capped by the ``SGLANG_IMAGE_MAX_PIXELS`` environment
        variable (qwen_vl.py ``resize_image``), which is set to the same ``max_pixels``.
        """
        if not (self.min_pixels or self.max_pixels):
            return []
        size = _processor_size(Path(self.model_path)) if self.model_path else {}
        if self.min_pixels:
            size["shortest_edge"] = int(self.min_pixels)
        if self.max_pixels:
            size["longest_edge"] = int(self.max_pixels)
            self.env = {**(self.env or {}), "SGLANG_IMAGE_MAX_PIXELS": str(int(self.max_pixels))}
        missing = {"shortest_edge", "longest_edge"} - set(size)
        if missing:
            raise RolloutError(f"{self.model_path}/preprocessor_config.json has no size."
                               f"{'/'.join(sorted(missing))}: set both data.min_pixels and "
                               f"data.max_pixels")
        return ["--mm-process-config", json.dumps({"image": {"size": size}})]

    def _start(self, s: _Server) -> None:
        log.info("launching rollout server: %s (log: %s)", " ".join(s.command), s.log_path)
        with open(s.log_path, "ab") as logf:
            s.proc = subprocess.Popen(s.command, stdout=logf, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True,
                                      env={**os.environ, **(self.env or {})})

    def _wait_ready(self, s: _Server) -> None:
        t0, last_note = time.monotonic(), 0.0
        while True:
            code = s.exit_code()
            if code is not None:
                raise RolloutServerError(f"rollout server {s.url} exited with code {code} while "
                                         f"starting; last log lines ({s.log_path}):\n{s.log_tail()}")
            try:
                self._http(s.url + "/health_generate", None, timeout=30, method="GET")
                log.info("rollout server %s ready after %.1fs", s.url, time.monotonic() - t0)
                return
            except RolloutRequestError:
                raise
            except (RolloutServerError, *_RETRYABLE):
                pass
            waited = time.monotonic() - t0
            if waited > self.launch_timeout_s:
                self._stop(s)
                raise RolloutServerError(f"rollout server {s.url} did not become healthy within "
                                         f"{self.launch_timeout_s:.0f}s; log ({s.log_path}):\n"
                                         f"{s.log_tail()}")
            if waited - last_note >= 15:
                log.info("waiting for rollout server %s (%.0fs)", s.url, waited)
                last_note = waited
            time.sleep(0.25)

    def _stop(self, s: _Server, timeout: float = 30.0) -> None:
        if s.proc is None or s.proc.poll() is not None:
            return
        try:  # the server's own process group: SGLang spawns scheduler/detokenizer children
            os.killpg(s.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            s.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(s.proc.pid, signal.SIGKILL)
            s.proc.wait()

    def _restart(self, s: _Server) -> None:
        log.warning("restarting rollout server %s (exit code %s)", s.url, s.exit_code())
        self._stop(s)
        self._start(s)
        self._wait_ready(s)
        kind, path = self._weights
        if kind == "disk":
            self._post(s, "/update_weights_from_disk", {"model_path": path}, retry=False)
        elif kind == "tensor":
            raise RolloutServerError(
                f"rollout server {s.url} was restarted, but the weights pushed to it with "
                f"update_weights (tensors) are lost; sync the weights again before generating")

    # ---------------------------------------------------------------------------------- HTTP
    def _http(self, url: str, payload: Any, timeout: float, method: str = "POST") -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            message = _error_message(e.read())
            if 400 <= e.code < 500:
                raise RolloutRequestError(f"{url} rejected the request (HTTP {e.code}): "
                                          f"{message}") from None
            raise RolloutServerError(f"{url} failed (HTTP {e.code}): {message}") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def _post(self, s: _Server, path: str, payload: Any, *, retry: bool = True,
              method: str = "POST") -> Any:
        """One call with retries/backoff; then restart (if configured) or a clear error."""
        attempts = self.max_retries + 1 if retry else 1
        last = ""
        for attempt in range(attempts):
            try:
                return self._http(s.url + path, payload, self.request_timeout_s, method)
            except RolloutRequestError:
                raise
            except (RolloutServerError, *_RETRYABLE) as e:
                last = str(getattr(e, "reason", None) or e) or type(e).__name__
            if s.exit_code() is not None:
                break   # the process is gone: waiting longer will not help
            if attempt + 1 < attempts:
                time.sleep(self.backoff_s * 2 ** attempt)
        if s.managed and self.restart_on_failure and not self._closed:
            with s.lock:
                if s.exit_code() is not None or not self._alive(s):
                    self._restart(s)
            try:
                return self._http(s.url + path, payload, self.request_timeout_s, method)
            except _RETRYABLE as e:
                raise RolloutServerError(f"rollout server {s.url} fails {path} even after a "
                                         f"restart: {e}; log: {s.log_path}") from None
        detail = f"; its process exited with code {s.exit_code()}" if s.exit_code() is not None else ""
        tail = s.log_tail()
        raise RolloutServerError(
            f"rollout server {s.url} is not responding to {path}: {last} (after {attempts} "
            f"attempt(s){detail})" + (f"\nlast log lines ({s.log_path}):\n{tail}" if tail else ""))

    def _alive(self, s: _Server) -> bool:
        try:
            self._http(s.url + "/health", None, timeout=5, method="GET")
            return True
        except (RolloutError, *_RETRYABLE):
            return False

    def _detect_wire_format(self) -> str:
        """CPU server or real SGLang? (Only matters for update_weights from tensors.)"""
        info = self.servers[0].info
        return "prism" if info.get("engine") == "prism-cpu" else "sglang"

    # ---------------------------------------------------------------------------- generation
    def generate(self, prompts: Sequence[RolloutPrompt], params: SamplingParams,
                 n: int = 1) -> list[list[Sample]]:
        if n < 1:
            raise ValueError(f"n={n} must be >= 1")
        if not prompts:
            return []
        base = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                "max_new_tokens": params.max_new_tokens}
        if params.stop_token_ids:
            base["stop_token_ids"] = list(params.stop_token_ids)
        if params.ignore_eos:
            base["ignore_eos"] = True
        expected = self._response_len or params.max_new_tokens
        costs = [len(p.input_ids) + n * expected for p in prompts]
        assignment, self.last_dispatch = balance(costs, len(self.servers))
        jobs = []
        for i, prompt in enumerate(prompts):
            seeds = sample_seeds(params, i, n)
            sps = [base if s is None else {**base, "sampling_seed": s} for s in seeds]
            jobs.append((self.servers[assignment[i]], prompt, sps))
        workers = max(1, min(self.max_concurrency, len(jobs)))
        with ThreadPoolExecutor(workers, thread_name_prefix="rollout-client") as pool:
            futures = [pool.submit(self._generate_one, *job) for job in jobs]
            try:
                results = [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        lengths = [len(s) for group in results for s in group]
        if lengths:   # what the next call expects per response (a running mean)
            mean = sum(lengths) / len(lengths)
            self._response_len = mean if not self._response_len else \
                0.5 * self._response_len + 0.5 * mean
        return results

    def _generate_one(self, s: _Server, prompt: RolloutPrompt, sps: list[dict]) -> list[Sample]:
        ids = prompt.input_ids
        if prompt.images:
            if self.image_token_id is None:
                raise RolloutError(
                    f"{s.url}: cannot send an image prompt without the model's image token id "
                    f"(one <|image_pad|> per image): neither the model's config.json nor the "
                    f"server's /server_info names it; pass image_token_id or a model path")
            ids = collapse_image_pads(ids, self.image_token_id)   # one pad per image, always
            images = [image_to_data_url(x) for x in prompt.images]
        elif prompt.pixel_values is not None:
            raise RolloutError("SGLangEngine sends raw images: build RolloutPrompt with images=[...] "
                               "(pixel_values alone cannot be sent to a server)")
        else:
            images = None
        n = len(sps)
        payload = {"input_ids": [ids] * n, "sampling_params": sps, "return_logprob": True}
        if images:
            payload["image_data"] = [images] * n
        out = self._post(s, "/generate", payload)
        if isinstance(out, dict):
            out = [out]
        if not isinstance(out, list) or len(out) != n:
            raise RolloutServerError(f"{s.url}/generate returned {type(out).__name__} "
                                     f"{'of length ' + str(len(out)) if isinstance(out, list) else ''}"
                                     f" for {n} samples")
        return [self._to_sample(s, o, len(prompt.input_ids)) for o in out]

    def _to_sample(self, s: _Server, out: dict, prompt_len: int) -> Sample:
        meta = out.get("meta_info", {})
        finish = meta.get("finish_reason") or {}
        kind = finish.get("type") if isinstance(finish, dict) else finish
        if kind not in ("stop", "length"):
            raise RolloutServerError(f"{s.url}/generate: sample finished with {finish!r}")
        lps = meta.get("output_token_logprobs")
        if lps is None:
            raise RolloutServerError(f"{s.url}/generate returned no output_token_logprobs")
        ids = out.get("output_ids")
        if ids is None:
            ids = [int(t) for _, t, *_ in lps]
        if len(ids) != len(lps):
            raise RolloutServerError(f"{s.url}/generate: {len(ids)} tokens but {len(lps)} log-probs")
        prompt_tokens = int(meta.get("prompt_tokens", prompt_len))
        if prompt_tokens != prompt_len and not self._warned_prompt_len:
            self._warned_prompt_len = True
            log.warning("the server expanded a prompt to %d tokens, the trainer's prompt has %d: its "
                        "image preprocessing (min/max pixels) differs from data.min/max_pixels, so the "
                        "trainer would score other image tokens", prompt_tokens, prompt_len)
        return Sample([int(t) for t in ids], [float(lp[0]) for lp in lps], out.get("text", ""),
                      kind, prompt_tokens)

    # ------------------------------------------------------------------------------- weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        items = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
        if not items:
            return 0
        if self.wire_format == "prism":
            payload = {"serialized_named_tensors": [_safetensors_b64(items)],
                       "load_format": "prism_safetensors", "flush_cache": True}
        else:   # one payload per TP rank: each holds its own CUDA-IPC references
            payload = {"serialized_named_tensors": [_sglang_serialize(items)
                                                    for _ in range(self.tp)],
                       "load_format": None, "flush_cache": True}
        with self.weight_update_session():
            for s in self.servers:
                self._check_update(s, "/update_weights_from_tensor", payload)
        self._weights = ("tensor", None)
        return len(items)

    @contextmanager
    def weight_update_session(self) -> Iterator[None]:
        """``/begin_weight_update`` on every server, then ``/end_weight_update`` (nestable).

        SGLang >= 0.5.21 refuses tensor and distributed updates outside a session; the end runs
        its post-load hooks, so one session should span a whole sync. A server answering 404
        predates sessions and is not asked again.
        """
        if self._session_depth:
            self._session_depth += 1
            try:
                yield
            finally:
                self._session_depth -= 1
            return
        opened = []
        try:
            for s in self.servers:
                if self._session_call(s, "/begin_weight_update", {}):
                    opened.append(s)
            self._session_depth = 1
            yield
        finally:
            self._session_depth = 0
            failure = None
            for s in opened:
                try:
                    self._session_call(s, "/end_weight_update", {})
                except RolloutError as e:
                    failure = failure or e
            if failure is not None and sys.exc_info()[0] is None:
                raise failure

    def _session_call(self, s: _Server, path: str, payload: dict) -> bool:
        if not s.sessions:
            return False
        try:
            out = self._post(s, path, payload)
        except RolloutRequestError as e:
            if "HTTP 404" in str(e):
                log.info("rollout server %s has no %s (SGLang < 0.5.21): updates without "
                         "sessions", s.url, path)
                s.sessions = False
                return False
            if path == "/begin_weight_update" and "already open" in str(e):
                # a session left open by an interrupted sync: close it, open ours
                log.warning("%s: closing a weight-update session left open", s.url)
                self._post(s, "/end_weight_update", {})
                return self._session_call(s, path, payload)
            raise WeightUpdateError(str(e)) from None
        if isinstance(out, dict) and out.get("success") is False:
            raise WeightUpdateError(f"{s.url}{path}: {out.get('message')}")
        return True

    def update_weights_from_disk(self, model_path: str | Path) -> None:
        path = str(Path(model_path).resolve())
        for s in self.servers:
            self._check_update(s, "/update_weights_from_disk", {"model_path": path})
        self._weights = ("disk", path)

    def init_weights_update_group(self, server: int, *, master_address: str, master_port: int,
                                  rank_offset: int, world_size: int, group_name: str,
                                  backend: str) -> None:
        """``/init_weights_update_group`` on one server: its TP ranks join ``group_name`` as
        ranks ``rank_offset ..``; the call returns once the whole group has formed, so the
        trainer's rank 0 joins concurrently (``weight_sync``). Never retried (a rendezvous)."""
        payload = {"master_address": master_address, "master_port": int(master_port),
                   "rank_offset": int(rank_offset), "world_size": int(world_size),
                   "group_name": group_name, "backend": backend}
        self._check_update(self.servers[server], "/init_weights_update_group", payload,
                           retry=False)

    def update_weights_from_distributed(self, server: int, names: list[str], dtypes: list[str],
                                        shapes: list[list[int]], group_name: str) -> None:
        """``/update_weights_from_distributed`` on one server for one bucket that the trainer
        broadcasts on ``group_name`` meanwhile (SGLang's ``flattened_bucket`` layout). The
        cache is flushed once after the whole sync, not per bucket. Never retried."""
        payload = {"names": list(names), "dtypes": list(dtypes),
                   "shapes": [list(map(int, x)) for x in shapes], "group_name": group_name,
                   "flush_cache": False, "load_format": "flattened_bucket"}
        self._check_update(self.servers[server], "/update_weights_from_distributed", payload,
                           retry=False)
        self._weights = ("tensor", None)

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[torch.Tensor]:
        """``/get_weights_by_name`` on every server: the first ``truncate_size`` rows, fp32.

        Real SGLang answers "Get parameter by name failed" both for an unknown name and for a
        model without the method (0.5.23: only llama-like models have it, no Qwen): that is
        ``WeightReadbackUnsupported`` there; the CPU server implements it for every name the
        model has, so a failure is a plain ``WeightUpdateError``."""
        out = []
        for s in self.servers:
            try:
                value = self._post(s, "/get_weights_by_name",
                                   {"name": name, "truncate_size": int(truncate_size)})
            except RolloutRequestError as e:
                if self.wire_format == "sglang" and "Get parameter by name failed" in str(e):
                    raise WeightReadbackUnsupported(str(e)) from None
                raise WeightUpdateError(str(e)) from None
            if value is None:
                raise WeightUpdateError(f"{s.url}/get_weights_by_name answered nothing for {name}")
            out.append(torch.tensor(value, dtype=torch.float32))
        return out

    def _check_update(self, s: _Server, path: str, payload: dict, *, retry: bool = True) -> None:
        try:
            out = self._post(s, path, payload, retry=retry)
        except RolloutRequestError as e:
            raise WeightUpdateError(str(e)) from None
        if isinstance(out, dict) and out.get("success") is False:
            raise WeightUpdateError(f"{s.url}{path}: {out.get('message')}")

    # ---------------------------------------------------------------------------------- misc
    def flush_cache(self) -> None:
        """Flush every server's prefix cache; SGLang answers 400 while requests run, so that is
        retried with backoff (0.1 s doubling to 2 s) for up to ``flush_timeout_s``."""
        for s in self.servers:
            t0, delay = time.monotonic(), 0.1
            while True:
                try:
                    self._post(s, "/flush_cache", {})
                    break
                except RolloutRequestError as e:
                    if "HTTP 400" not in str(e):
                        raise
                    waited = time.monotonic() - t0
                    if waited + delay > self.flush_timeout_s:
                        raise RolloutServerError(
                            f"rollout server {s.url} still refuses /flush_cache after "
                            f"{waited:.0f}s (requests are running or queued: {e}); let them "
                            f"finish first or raise flush_timeout_s") from None
                    time.sleep(delay)
                    delay = min(2 * delay, 2.0)

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """``/release_memory_occupation`` for ``tags`` (``weights`` / ``kv_cache``; None: both).

        Only tags not released yet are sent (SGLang keeps a set of released tags and a second
        release of the same memory is not defined)."""
        if not self.release_between_phases:
            return
        todo = [t for t in (tags or (WEIGHTS, KV_CACHE)) if t not in self._released]
        if todo:
            for s in self.servers:
                self._post(s, "/release_memory_occupation", {"tags": todo})
            self._released.update(todo)

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """``/resume_memory_occupation`` for the released ones among ``tags`` (SGLang answers a
        resume of memory that is not released with a KeyError). Resumed weights are garbage
        until the next sync unless the server keeps a CPU backup (``weights_cpu_backup``)."""
        if not self.release_between_phases:
            return
        todo = [t for t in (tags or (WEIGHTS, KV_CACHE)) if t in self._released]
        if todo:
            for s in self.servers:
                self._post(s, "/resume_memory_occupation", {"tags": todo})
            self._released.difference_update(todo)

    def health(self) -> dict:
        report = []
        for s in self.servers:
            try:
                self._http(s.url + "/health_generate", None, timeout=60, method="GET")
                report.append({"url": s.url, "ok": True})
            except (RolloutError, *_RETRYABLE) as e:
                report.append({"url": s.url, "ok": False, "error": str(e),
                               "exit_code": s.exit_code()})
        return {"ok": all(r["ok"] for r in report), "engine": "sglang", "servers": report}

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in getattr(self, "servers", []):
            if s.managed:
                self._stop(s)
        for other in getattr(self, "owned", []):
            other.shutdown()


def balance(costs: Sequence[float], bins: int) -> tuple[list[int], list[int]]:
    """Assign items to ``bins`` servers, largest first onto the least loaded (LPT): the
    expected tokens per server end within one item of each other. Returns (server of each
    item, expected tokens per server); ties go to the lowest server index."""
    loads = [0.0] * bins
    where = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        k = min(range(bins), key=lambda b: (loads[b], b))
        where[i] = k
        loads[k] += costs[i]
    return where, [int(x) for x in loads]


def _processor_size(model_dir: Path) -> dict[str, int]:
    """``{"shortest_edge", "longest_edge"}`` of the checkpoint's image processor (or {})."""
    try:
        size = json.loads((model_dir / "preprocessor_config.json").read_text()).get("size") or {}
    except (OSError, ValueError):
        return {}
    return {k: int(size[k]) for k in ("shortest_edge", "longest_edge") if size.get(k)}


def _config_image_token(model_dir: Path) -> int | None:
    try:
        return json.loads((model_dir / "config.json").read_text()).get("image_token_id")
    except (OSError, ValueError):
        return None


def _safetensors_b64(items: list[tuple[str, torch.Tensor]]) -> str:
    from safetensors.torch import save

    # clone: safetensors refuses tensors sharing storage (views of a fused Megatron tensor)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in items}
    return base64.b64encode(save(tensors)).decode("ascii")


def _sglang_serialize(items: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's own pickle of a bucket; CUDA tensors travel as IPC handles keyed by device UUID
    (``monkey_patch_torch_reductions``), so a server whose CUDA_VISIBLE_DEVICES differs from the
    trainer's still opens them on the right GPU."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer
    except ImportError:
        try:
            from sglang.srt.utils.common import MultiprocessingSerializer
        except ImportError:
            raise RolloutError("pushing tensors to a real SGLang server needs the sglang package "
                               "in the trainer (pip install -r requirements-gpu.txt), or use "
                               "rollout.weight_sync=disk") from None
    if any(t.is_cuda for _, t in items):   # the patch only handles CUDA tensors' reductions
        try:
            from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
        except ImportError:
            monkey_patch_torch_reductions = None
        if monkey_patch_torch_reductions is not None:
            monkey_patch_torch_reductions()
    return MultiprocessingSerializer.serialize(items, output_str=True)
