"""The SGLang client (prism_megatron.rollout.sglang) against the CPU server as a real process.

``python -m prism_megatron.rollout.serve`` speaks the subset of SGLang's native HTTP API the
client uses, so these tests run the client's real request/response path on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))

from rollout_common import (  # noqa: E402
    encoded_prompts, fake_megatron_model, sharpen_model, teacher_forced_logprobs)

from prism_megatron.config import RolloutConfig  # noqa: E402
from prism_megatron.rollout import (  # noqa: E402
    RolloutError, RolloutPrompt, RolloutRequestError, RolloutServerError, SamplingParams,
    WeightUpdateError, make_engine)
from prism_megatron.rollout.local import LocalEngine  # noqa: E402
from prism_megatron.rollout.sglang import SGLangEngine  # noqa: E402
from prism_megatron.rollout.weight_sync import iter_buckets, sync_weights  # noqa: E402

PARAMS = SamplingParams(temperature=1.0, max_new_tokens=8, seed=21)


@pytest.fixture(scope="module")
def models(make_tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout-server")
    return (sharpen_model(make_tiny_model("tiny", 0), root / "a", factor=4.0),
            sharpen_model(make_tiny_model("tiny", 1), root / "b", factor=4.0))


@pytest.fixture(scope="module")
def local_a(models):
    return LocalEngine(models[0])


@pytest.fixture(scope="module")
def hf_b(models):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(str(models[1])).eval()


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    engine = SGLangEngine(model_path=models[0], server="prism", restart_on_failure=True,
                          max_retries=1, backoff_s=0.1, request_timeout_s=120,
                          extra_server_args=["--num-threads", "1", "--batch-wait-ms", "20"],
                          log_dir=tmp_path_factory.mktemp("server-logs"))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def prompts(local_a):
    encs = encoded_prompts(local_a.processor)
    # raw images only: what a client can send
    return encs, [RolloutPrompt(e.input_ids.tolist(), imgs) for e, imgs in encs]


def _post(url: str, body: bytes | None, method: str = "POST"):
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _info(url: str) -> dict:
    return json.loads(_post(url + "/server_info", None, "GET")[1])


def _tokens(result):
    return [[s.token_ids for s in samples] for samples in result]


def test_generate_matches_the_local_engine(server, local_a, prompts):
    """Same seed -> the same samples as the in-process engine; SGLang's response fields."""
    encs, rollout_prompts = prompts
    remote = server.generate(rollout_prompts, PARAMS, n=2)
    local = local_a.generate(rollout_prompts, PARAMS, n=2)
    assert _tokens(remote) == _tokens(local)
    for (enc, _), rs, ls in zip(encs, remote, local):
        for r, l in zip(rs, ls):
            assert r.text == l.text and r.finish_reason == l.finish_reason
            assert r.prompt_tokens == len(enc.input_ids)       # server re-expanded the pads
            assert max(abs(a - b) for a, b in zip(r.logprobs, l.logprobs)) < 1e-5
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    assert _tokens(server.generate(rollout_prompts, greedy)) == \
        _tokens(local_a.generate(rollout_prompts, greedy))


def test_concurrent_requests(server, prompts):
    _, rollout_prompts = prompts
    expected = {seed: _tokens(server.generate(rollout_prompts[:2], PARAMS.with_(seed=seed)))
                for seed in range(4)}
    got, errors = {}, []

    def worker(seed):
        try:
            got[seed] = _tokens(server.generate(rollout_prompts[:2], PARAMS.with_(seed=seed)))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and got == expected


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"sampling_params": {}}).encode(), 400, "missing input_ids"),
    (json.dumps({"input_ids": [1, 2], "sampling_params": {"temprature": 1}}).encode(), 400,
     "unknown sampling_params"),
    (json.dumps({"input_ids": [1, 10**9]}).encode(), 400, "token ids"),
    (json.dumps({"input_ids": [1, 2], "image_data": ["bm90IGFuIGltYWdl"]}).encode(), 400, "image_data"),
    (json.dumps({"input_ids": [1, 2], "image_data": "data:image/png;base64,@@@"}).encode(), 400,
     "image_data"),
    (json.dumps({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 0}}).encode(), 400,
     "max_new_tokens"),
    (json.dumps({"input_ids": [1, 2], "sampling_params": {"stop": ["x"]}}).encode(), 400, "stop"),
])
def test_malformed_generate_requests_get_4xx(server, body, status, message):
    code, text = _post(server.servers[0].url + "/generate", body)
    assert code == status and message in json.loads(text)["message"]


def test_other_bad_requests_and_the_server_keeps_serving(server, prompts, models):
    url = server.servers[0].url
    code, text = _post(url + "/no_such_endpoint", None, "GET")
    assert code == 404 and "unknown endpoint" in json.loads(text)["message"]
    code, text = _post(url + "/update_weights_from_tensor",
                       json.dumps({"serialized_named_tensors": ["xx"], "load_format": None}).encode())
    assert code == 400 and "prism_safetensors" in json.loads(text)["message"]
    code, text = _post(url + "/update_weights_from_disk", json.dumps({"model_path": "/nope"}).encode())
    assert code == 400 and json.loads(text)["success"] is False
    # image placeholders without images, through the client: a RolloutRequestError, not retried
    encs, _ = prompts
    with pytest.raises(RolloutRequestError, match="image"):
        server.generate([RolloutPrompt(encs[0][0].input_ids.tolist())], PARAMS)
    # unknown names are skipped with a warning, as SGLang's loaders skip them
    assert server.update_weights([("model.no_such.weight", torch.zeros(2))]) == 1
    assert "skipping 1 unknown tensor name(s): model.no_such.weight" in \
        server.servers[0].log_path.read_text()
    with pytest.raises(WeightUpdateError, match="shape"):   # a known name of the wrong shape
        server.update_weights([("lm_head.weight", torch.zeros(2))])
    assert server.health()["ok"]
    assert _post(url + "/health_generate", None, "GET")[0] == 200
    info = json.loads(_post(url + "/get_model_info", None, "GET")[1])
    assert info["model_path"] == str(models[0])
    assert server.generate(prompts[1][:1], PARAMS)[0][0].token_ids


def _max_logprob_gap(engine, encs, rollout_prompts, hf_model) -> float:
    out = engine.generate(rollout_prompts, PARAMS, n=1)
    return max(float((torch.tensor(s[0].logprobs)
                      - teacher_forced_logprobs(hf_model, enc, s[0].token_ids)).abs().max())
               for (enc, _), s in zip(encs, out))


def test_weight_updates_from_disk_tensors_and_trainer(server, models, prompts, hf_b, local_a):
    encs, rollout_prompts = prompts
    assert _max_logprob_gap(server, encs, rollout_prompts, hf_b) > 1e-2       # still model A
    server.update_weights_from_disk(models[1])
    assert _max_logprob_gap(server, encs, rollout_prompts, hf_b) < 1e-5
    # back to A by tensor buckets (the CPU server's safetensors wire format)
    from safetensors.torch import load_file

    weights = load_file(str(models[0] / "model.safetensors"))
    for bucket in iter_buckets(weights.items(), 256 * 1024):
        server.update_weights(bucket)
    assert _tokens(server.generate(rollout_prompts, PARAMS)) == \
        _tokens(local_a.generate(rollout_prompts, PARAMS))
    # a trainer-side sync through the conversion mapping (stand-in Megatron model holding B)
    trainer, config = fake_megatron_model(models[1])
    stats = sync_weights(trainer, server, config, bucket_mb=0.5)
    assert stats.buckets > 5 and stats.max_bucket_bytes <= 0.5 * 2**20
    assert _max_logprob_gap(server, encs, rollout_prompts, hf_b) < 1e-5


def test_data_parallel_urls_share_updates(server, models, prompts, local_a):
    url = server.servers[0].url
    attached = SGLangEngine(urls=[url, url + "/"], image_token_id=server.image_token_id)
    assert attached.wire_format == "prism" and len(attached.servers) == 2
    # without --enable-memory-saver a release only flushes (SGLang's no-op adapter)
    single = SGLangEngine(urls=[url], release_memory_between_phases=True)
    single.release_memory()
    assert _info(url)["memory_released"] == ["kv_cache", "weights"]
    single.resume_memory()
    assert _info(url)["memory_released"] == []
    attached.flush_cache()
    attached.update_weights_from_disk(models[0])
    _, rollout_prompts = prompts
    assert _tokens(attached.generate(rollout_prompts, PARAMS)) == \
        _tokens(local_a.generate(rollout_prompts, PARAMS))


@pytest.mark.slow  # over 20 s (measured with --durations)
def test_killed_server_clear_error_then_restart(server, models, prompts, hf_b):
    encs, rollout_prompts = prompts
    server.update_weights_from_disk(models[1])
    s = server.servers[0]
    attached = SGLangEngine(urls=[s.url], max_retries=1, backoff_s=0.05, request_timeout_s=30)
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait(30)
    with pytest.raises(RolloutServerError, match=f"rollout server {s.url} is not responding"):
        attached.generate(rollout_prompts[:1], PARAMS)
    assert attached.health()["ok"] is False
    # The managed engine relaunches it and re-applies the weights last loaded from disk.
    assert _max_logprob_gap(server, encs, rollout_prompts, hf_b) < 1e-5
    assert s.exit_code() is None and server.health()["ok"]


def test_make_engine_and_missing_sglang(models, server, monkeypatch):
    assert isinstance(make_engine(RolloutConfig(engine="local"), models[0]), LocalEngine)
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sglang" else real_find_spec(name, *a))
    with pytest.raises(RolloutError, match="pip install -r requirements-gpu.txt"):
        make_engine(RolloutConfig(engine="sglang"), models[0])
    attached = make_engine(RolloutConfig(engine="sglang", urls=[server.servers[0].url]), models[0])
    assert isinstance(attached, SGLangEngine) and attached.image_token_id is not None
    with pytest.raises(RolloutError, match="not one of"):
        make_engine(RolloutConfig(engine="vllm"), models[0])


def test_raw_sglang_requests(server, local_a):
    """Clients other than ours: text input, one request with n=2, SGLang's response layout."""
    url = server.servers[0].url
    body = {"text": "Hello there", "sampling_params": {"max_new_tokens": 4, "n": 2,
                                                      "sampling_seed": 5, "temperature": 1.0},
            "return_logprob": True}
    code, text = _post(url + "/generate", json.dumps(body).encode())
    assert code == 200
    out = json.loads(text)
    assert isinstance(out, list) and len(out) == 2 and out[0]["output_ids"] != out[1]["output_ids"]
    for o in out:
        meta = o["meta_info"]
        assert meta["completion_tokens"] == len(o["output_ids"]) <= 4
        assert [t for _, t, _ in meta["output_token_logprobs"]] == o["output_ids"]
        assert meta["finish_reason"]["type"] in ("stop", "length")
        assert meta["prompt_tokens"] == len(local_a.tokenizer("Hello there")["input_ids"])
    single = json.loads(_post(url + "/generate", json.dumps(
        {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}).encode())[1])
    assert isinstance(single, dict) and "output_token_logprobs" not in single["meta_info"]


def test_client_parses_sglang_responses_without_output_ids():
    """Older SGLang versions return no output_ids: the ids come from output_token_logprobs."""
    client = SGLangEngine(urls=["http://127.0.0.1:9"], wire_format="sglang")
    s = client.servers[0]
    sample = client._to_sample(s, {"text": "ab", "meta_info": {
        "finish_reason": {"type": "stop", "matched": 5}, "prompt_tokens": 7,
        "output_token_logprobs": [[-0.5, 3, None], [-0.25, 5, None]]}}, 7)
    assert sample.token_ids == [3, 5] and sample.logprobs == [-0.5, -0.25]
    assert sample.finish_reason == "stop" and sample.text == "ab"
    with pytest.raises(RolloutServerError, match="abort"):
        client._to_sample(s, {"meta_info": {"finish_reason": {"type": "abort", "message": "x"},
                                            "output_token_logprobs": []}}, 7)


# --------------------------------------------------------------------------- server limits

CONTEXT = 4096      # the tiny preset's max_position_embeddings


def _raw(url: str, path: str, body: bytes | None = None, *, declared: int | None = None,
         timeout: float = 60):
    """One request on its own connection; ``declared`` sends only the headers of a body that
    size (an oversized upload is refused before it is read)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.putrequest("POST" if body is not None or declared else "GET", path)
        conn.putheader("Content-Type", "application/json")
        if body is not None or declared:
            conn.putheader("Content-Length", str(declared if declared else len(body)))
        conn.endheaders()
        if body is not None and not declared:
            conn.send(body)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def limited(models, tmp_path_factory):
    """A second CPU server with a 1 s deadline and small body limits."""
    engine = SGLangEngine(model_path=models[0], server="prism", max_retries=0, request_timeout_s=60,
                          extra_server_args=["--num-threads", "1", "--request-timeout-s", "1",
                                             "--max-body-mb", "1", "--max-update-body-mb", "2"],
                          log_dir=tmp_path_factory.mktemp("limited-logs"))
    yield engine
    engine.shutdown()


def test_context_cap_is_sglangs_400(server):
    url = server.servers[0].url
    body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 10**9}}
    code, text = _post(url + "/generate", json.dumps(body).encode())
    assert code == 400 and json.loads(text) == {"error": {"message": (
        f"Requested token count exceeds the model's maximum context length of {CONTEXT} tokens. "
        f"You requested a total of {10**9 + 3} tokens: 3 tokens from the input messages and "
        f"{10**9} tokens for the completion. Please reduce the number of tokens in the input "
        f"messages or the completion to fit within the limit.")}}
    code, text = _post(url + "/generate", json.dumps(
        {"input_ids": [5] * CONTEXT, "sampling_params": {"max_new_tokens": 1}}).encode())
    assert code == 400 and json.loads(text)["error"]["message"] == (
        f"The input ({CONTEXT} tokens) is longer than the model's context length ({CONTEXT} tokens).")
    # at the cap exactly is accepted; the client sees the 400 as a request error, not retried
    info = json.loads(_post(url + "/get_server_info", None, "GET")[1])
    assert info["context_length"] == CONTEXT
    with pytest.raises(RolloutRequestError, match="maximum context length of 4096 tokens"):
        server.generate([RolloutPrompt([1, 2, 3])], PARAMS.with_(max_new_tokens=CONTEXT))
    out = server.generate([RolloutPrompt([1, 2, 3])], PARAMS.with_(max_new_tokens=2))
    assert len(out[0][0].token_ids) <= 2


def test_deadline_frees_the_slot_and_the_next_request_is_served(limited):
    url = limited.servers[0].url
    long = {"input_ids": [1, 2, 3], "sampling_params": {
        "max_new_tokens": CONTEXT - 3, "ignore_eos": True, "temperature": 0}}
    code, text = _post(url + "/generate", json.dumps(long).encode())
    assert code == 504 and "--request-timeout-s=1" in json.loads(text)["message"]
    # The worker is free again: a small request (with the same 1 s deadline) is answered. On a
    # loaded machine even 2 tokens can miss 1 s once, so it may try 3 times; a worker still busy
    # with the long request (4093 tokens) would miss all three.
    for _ in range(3):
        code, text = _post(url + "/generate", json.dumps(
            {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}).encode())
        if code == 200:
            break
    assert code == 200 and len(json.loads(text)["output_ids"]) <= 2


def test_a_client_that_leaves_is_not_decoded_for(server):
    """Closing the connection mid-decode cancels the request: its rows leave the batch (counted
    in /get_server_info) long before its 4093 tokens, and the server keeps serving."""
    import socket
    import time
    from urllib.parse import urlsplit

    url = server.servers[0].url
    before = json.loads(_post(url + "/get_server_info", None, "GET")[1])["aborted_requests"]
    body = json.dumps({"input_ids": [1, 2, 3], "sampling_params": {
        "max_new_tokens": CONTEXT - 3, "ignore_eos": True, "temperature": 0}}).encode()
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.5)
    for _ in range(600):
        info = json.loads(_post(url + "/get_server_info", None, "GET")[1])
        if info["aborted_requests"] > before:
            break
        time.sleep(0.1)
    assert info["aborted_requests"] == before + 1
    assert server.generate([RolloutPrompt([1, 2, 3])], PARAMS.with_(max_new_tokens=2))[0][0].token_ids


def test_body_limits_413_and_a_larger_one_for_weight_updates(limited):
    url = limited.servers[0].url
    code, text = _raw(url, "/generate", declared=1 * 2**20 + 1)
    assert code == 413 and "--max-body-mb=1" in json.loads(text)["message"]
    code, text = _raw(url, "/update_weights_from_tensor", declared=2 * 2**20 + 1)
    assert code == 413 and "--max-update-body-mb=2" in json.loads(text)["message"]
    # 1.5 MiB: too large for /generate, fine for an update route (then refused for its content)
    blob = json.dumps({"serialized_named_tensors": ["A" * (3 * 2**19)], "load_format": "x"}).encode()
    assert 2**20 < len(blob) < 2 * 2**20
    code, text = _raw(url, "/update_weights_from_tensor", blob)
    assert code == 400 and "prism_safetensors" in json.loads(text)["message"]
    assert _raw(url, "/generate", blob)[0] == 413
    assert _raw(url, "/health")[0] == 200


def test_bounded_concurrent_load_all_answered(server):
    """64 clients at once (SGLangEngine's max_concurrency): every one answered, none reset."""
    url = server.servers[0].url
    count = 64
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def client(i):
        barrier.wait(30)
        try:
            results[i] = _raw(url, "/generate", json.dumps(
                {"input_ids": [1, 2, 3 + i % 5], "sampling_params": {"max_new_tokens": 2}}).encode(),
                timeout=120)
        except Exception as e:  # noqa: BLE001 - a reset connection lands here
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    failures = [r for r in results if not (isinstance(r, tuple) and r[0] == 200)]
    assert failures == []


def test_sigterm_ends_a_decoding_batch(models, tmp_path):
    """SIGTERM while a long batch decodes: its request is answered 503 and the process exits 0
    (the decode stops at its next step instead of running to max_new_tokens)."""
    import subprocess

    from prism_megatron.distributed import free_port as _free_port

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "prism_megatron.rollout.serve", "--model-path",
                                 str(models[0]), "--port", str(port), "--num-threads", "1"],
                                stdout=logf, stderr=subprocess.STDOUT)
    try:
        import time

        for _ in range(600):
            try:
                if _raw(url, "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        answer: list = []
        long = {"input_ids": [1, 2, 3], "sampling_params": {
            "max_new_tokens": CONTEXT - 3, "ignore_eos": True, "temperature": 0}}
        thread = threading.Thread(target=lambda: answer.append(
            _raw(url, "/generate", json.dumps(long).encode(), timeout=120)))
        thread.start()
        time.sleep(1.0)   # let it reach the decode loop
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        thread.join(60)
        assert answer and answer[0][0] == 503 and "shutting down" in answer[0][1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_launch_commands_carry_the_pixel_budget(models):
    """Managed servers get the stage's data.min/max_pixels: SGLang as --mm-process-config (the
    HF processor's size) plus SGLANG_IMAGE_MAX_PIXELS for its own pre-resize; the CPU server as
    --min-pixels / --max-pixels, with the client's request timeout as its deadline."""
    engine = SGLangEngine.__new__(SGLangEngine)
    engine.model_path, engine.tp, engine.mem_fraction = str(models[0]), 2, 0.5
    engine.release_between_phases, engine.env, engine.request_timeout_s = False, None, 300.0
    engine.deterministic = engine.weights_cpu_backup = False
    engine.host = "127.0.0.1"
    engine.min_pixels, engine.max_pixels = None, 589824
    cmd = engine._default_command("sglang", ["--x"])(1, 30001)
    i = cmd.index("--mm-process-config")
    # shortest_edge from the checkpoint's preprocessor_config.json (the tiny preset's 4096)
    assert json.loads(cmd[i + 1]) == {"image": {"size": {"shortest_edge": 4096,
                                                         "longest_edge": 589824}}}
    assert engine.env == {"SGLANG_IMAGE_MAX_PIXELS": "589824"} and cmd[-1] == "--x"
    assert cmd[cmd.index("--base-gpu-id") + 1] == "2"
    engine.min_pixels = 65536
    cmd = engine._default_command("prism", [])(0, 30002)
    assert cmd[cmd.index("--min-pixels") + 1] == "65536"
    assert cmd[cmd.index("--max-pixels") + 1] == "589824"
    assert cmd[cmd.index("--request-timeout-s") + 1] == "300"
    engine.min_pixels = engine.max_pixels = None
    assert "--mm-process-config" not in engine._default_command("sglang", [])(0, 30003)
    assert "--enable-deterministic-inference" not in engine._default_command("sglang", [])(0, 1)
    engine.deterministic = engine.release_between_phases = engine.weights_cpu_backup = True
    cmd = engine._default_command("sglang", [])(0, 30004)
    assert {"--enable-deterministic-inference", "--enable-memory-saver",
            "--enable-weights-cpu-backup"} <= set(cmd)


# ---------------------------------------------------------------- what real SGLang 0.5.23 does

from prism_megatron.rollout import phase_generate, phase_train  # noqa: E402
from prism_megatron.rollout.images import image_to_data_url  # noqa: E402
from prism_megatron.rollout.serve import NO_SESSION, NOT_IDLE, SESSION_CLOSED, SESSION_OPEN  # noqa: E402


def _bucket_body(models) -> bytes:
    from safetensors.torch import load_file

    from prism_megatron.rollout.sglang import _safetensors_b64

    name, t = next(iter(load_file(str(models[0] / "model.safetensors")).items()))
    return json.dumps({"serialized_named_tensors": [_safetensors_b64([(name, t)])],
                       "load_format": "prism_safetensors"}).encode()


def test_weight_update_sessions_as_sglang(server, models):
    """Tensor updates only inside /begin_weight_update .. /end_weight_update, SGLang's texts."""
    url = server.servers[0].url
    code, text = _post(url + "/update_weights_from_tensor", _bucket_body(models))
    assert code == 400 and json.loads(text) == {"success": False, "message": NO_SESSION}
    code, text = _post(url + "/end_weight_update", b"{}")
    assert code == 400 and json.loads(text)["message"] == SESSION_CLOSED
    assert _post(url + "/begin_weight_update", b"{}")[0] == 200
    code, text = _post(url + "/begin_weight_update", b"{}")
    assert code == 400 and json.loads(text)["message"] == SESSION_OPEN
    assert _post(url + "/update_weights_from_tensor", _bucket_body(models))[0] == 200
    assert _info(url)["weight_update_session"] is True
    # a session left open (an interrupted sync): the client's next update closes it, opens its
    # own and ends it
    name, t = next(iter(__import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(models[0] / "model.safetensors")).items()))
    assert server.update_weights([(name, t)]) == 1
    assert _info(url)["weight_update_session"] is False
    # an older server without the routes (404) is updated without sessions
    s = server.servers[0]
    s.sessions = False
    try:
        with pytest.raises(WeightUpdateError, match="must run between begin_weight_update"):
            server.update_weights([(name, t)])
    finally:
        s.sessions = True


def test_one_pad_per_image_and_server_info(server, prompts):
    encs, rollout_prompts = prompts
    url = server.servers[0].url
    enc, imgs = next((e, i) for e, i in encs if i)
    body = {"input_ids": enc.input_ids.tolist(), "image_data": [image_to_data_url(x) for x in imgs],
            "sampling_params": {"max_new_tokens": 2}}
    code, text = _post(url + "/generate", json.dumps(body).encode())   # an expanded run
    assert code == 500 and json.loads(text)["message"] == (
        f"internal error: IndexError: index {len(imgs)} is out of bounds for dimension 0 with "
        f"size {len(imgs)}")
    # attached without a model path: tp_size, version and the image token from /server_info
    attached = SGLangEngine(urls=[url])
    assert attached.tp == 1 and attached.image_token_id == server.image_token_id
    assert attached.server_versions == {url: "prism-rollout/1"}
    assert attached.generate(rollout_prompts[:1], PARAMS)[0][0].prompt_tokens == \
        len(encs[0][0].input_ids)
    # nothing names the image token: refused before sending
    blind = SGLangEngine(urls=["http://127.0.0.1:9"], wire_format="sglang")
    assert blind.image_token_id is None
    with pytest.raises(RolloutError, match="without the model's image token id"):
        blind._generate_one(blind.servers[0], RolloutPrompt([1, 2], [imgs[0]]), [{}])


def test_flush_and_release_refused_while_a_request_runs(server):
    """SGLang flushes only when idle (400 "Flush cache failed."); the client retries until the
    request is done, or gives up after flush_timeout_s with a clear error."""
    import socket
    import time
    from urllib.parse import urlsplit

    url = server.servers[0].url
    body = json.dumps({"input_ids": [1, 2, 3], "sampling_params": {
        "max_new_tokens": CONTEXT - 3, "ignore_eos": True, "temperature": 0}}).encode()
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port))
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        for _ in range(600):
            if _info(url)["in_flight_requests"]:
                break
            time.sleep(0.05)
        assert _post(url + "/flush_cache", b"{}") == (400, "Flush cache failed.\n")
        code, text = _post(url + "/release_memory_occupation", b"{}")
        assert code == 400 and json.loads(text) == {"error": {"message": NOT_IDLE}}
        impatient = SGLangEngine(urls=[url], flush_timeout_s=0.3)
        with pytest.raises(RolloutServerError, match="still refuses /flush_cache"):
            impatient.flush_cache()
        threading.Timer(0.5, sock.close).start()   # the client leaves: the request is cancelled
        server.flush_cache()                        # retried until the server is idle
        assert _info(url)["in_flight_requests"] == 0
    finally:
        sock.close()


@pytest.fixture(scope="module")
def saver(models, tmp_path_factory):
    engine = SGLangEngine(model_path=models[0], server="prism", release_memory_between_phases=True,
                          max_retries=0, extra_server_args=["--num-threads", "1"],
                          log_dir=tmp_path_factory.mktemp("saver-logs"))
    yield engine
    engine.shutdown()


def test_memory_phases_release_resume_order(saver, models, prompts, hf_b):
    """Released weights are garbage until a sync; phase_generate resumes the weights, syncs,
    then resumes the KV cache; the server refuses generation and updates while released."""
    import math

    encs, rollout_prompts = prompts
    url = saver.servers[0].url
    assert "--enable-memory-saver" in saver.servers[0].command
    phase_train(saver)
    assert _info(url)["memory_released"] == ["kv_cache", "weights"]
    with pytest.raises(RolloutRequestError, match="weights memory is released"):
        saver.generate(rollout_prompts[:1], PARAMS)
    with pytest.raises(WeightUpdateError, match="the weights are released"):
        saver.update_weights_from_disk(models[1])
    saver.resume_memory(["weights"])
    with pytest.raises(RolloutRequestError, match="kv_cache memory is released"):
        saver.generate(rollout_prompts[:1], PARAMS)
    # the naive order: resume everything without a sync -> garbage (zeroed) weights
    saver.resume_memory()
    assert _info(url)["weights_garbage"] is True
    out = saver.generate(rollout_prompts[:1], PARAMS)[0][0]
    vocab = hf_b.config.text_config.vocab_size
    assert out.logprobs == pytest.approx([-math.log(vocab)] * len(out), abs=1e-4)
    # the pipeline's order
    phase_train(saver)
    seen = []

    def sync():
        seen.append(_info(url)["memory_released"])
        saver.update_weights_from_disk(models[1])
        return "synced"

    assert phase_generate(saver, sync) == "synced"
    assert seen == [["kv_cache"]] and _info(url)["memory_released"] == []
    assert _info(url)["weights_garbage"] is False
    assert _max_logprob_gap(saver, encs, rollout_prompts, hf_b) < 1e-5
    # resuming what is not released is SGLang's KeyError; the client only resumes what it released
    code, text = _post(url + "/resume_memory_occupation", json.dumps({"tags": ["weights"]}).encode())
    assert code == 400 and json.loads(text) == {"error": {"message": "'weights'"}}
    phase_generate(saver, lambda: None)


def test_weights_cpu_backup_survives_release(models, prompts, local_a, tmp_path):
    _, rollout_prompts = prompts
    with SGLangEngine(model_path=models[0], server="prism", release_memory_between_phases=True,
                      weights_cpu_backup=True, extra_server_args=["--num-threads", "1"],
                      log_dir=tmp_path) as backed:
        assert "--enable-weights-cpu-backup" in backed.servers[0].command
        phase_train(backed)
        phase_generate(backed, lambda: None)      # no sync: the backup comes back
        assert _info(backed.servers[0].url)["weights_garbage"] is False
        assert _tokens(backed.generate(rollout_prompts, PARAMS)) == \
            _tokens(local_a.generate(rollout_prompts, PARAMS))
