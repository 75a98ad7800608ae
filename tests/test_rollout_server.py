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
    with pytest.raises(WeightUpdateError, match="unknown tensor name"):
        server.update_weights([("model.no_such.weight", torch.zeros(2))])
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
    attached.release_between_phases = True     # the CPU server accepts and ignores these
    attached.release_memory()
    attached.resume_memory()
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
