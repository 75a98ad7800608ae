"""The CPU server's /v1/chat/completions and the lmms-eval harness's config checks (fast; the
end-to-end run through lmms-eval is tests/test_eval_lmms.py)."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from prism_megatron.config import ConfigError, load_config
from prism_megatron.eval import lmms
from prism_megatron.rollout.base import RolloutPrompt, SamplingParams
from prism_megatron.rollout.local import LocalEngine
from prism_megatron.rollout.serve import make_server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    engine = LocalEngine(tiny_model_dir)
    httpd, worker = make_server(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield engine, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    worker.stop(1)


def _chat(url: str, body: dict):
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _png(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (56, 56), color).save(buf, format="PNG")
    return buf.getvalue()


def test_chat_completions_matches_the_engine(served, tmp_path):
    from PIL import Image

    from prism_megatron.data.encode import encode_prompt

    engine, url = served
    png = _png("red")
    path = tmp_path / "b.png"
    path.write_bytes(_png("blue"))
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [
                    {"type": "image_url",
                     "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
                    {"type": "text", "text": "What is in"},
                    {"type": "image_url", "image_url": {"url": f"file://{path}"}},
                    {"type": "text", "text": "?"}]}]
    status, out = _chat(url, {"model": "policy", "messages": messages, "temperature": 0,
                              "max_tokens": 6})
    assert status == 200, out
    # the same prompt through the engine directly: chat template + both images, greedy
    hf = [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in"},
                                       {"type": "image"}, {"type": "text", "text": "?"}]}]
    enc = encode_prompt(engine.processor, hf, [Image.open(io.BytesIO(png)).convert("RGB"),
                                               Image.open(path).convert("RGB")])
    ref = engine.generate([RolloutPrompt(enc.input_ids.tolist(), [], enc.pixel_values,
                                         enc.image_grid_thw)],
                          SamplingParams(temperature=0, max_new_tokens=6))[0][0]
    assert out["object"] == "chat.completion" and out["model"] == "policy"
    assert [c["message"] for c in out["choices"]] == [{"role": "assistant", "content": ref.text}]
    assert out["choices"][0]["finish_reason"] == ("stop" if ref.finish_reason == "stop"
                                                  else "length")
    assert out["usage"] == {"prompt_tokens": len(enc.input_ids),
                            "completion_tokens": len(ref.token_ids),
                            "total_tokens": len(enc.input_ids) + len(ref.token_ids)}


def test_chat_completions_sampling_and_errors(served):
    _, url = served
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 1.0, "top_p": 0.7,
            "max_tokens": 5, "seed": 3, "n": 2}
    status, a = _chat(url, body)
    _, b = _chat(url, body)
    assert status == 200 and len(a["choices"]) == 2 and [c["index"] for c in a["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in a["choices"]] == \
        [c["message"]["content"] for c in b["choices"]]            # seeded: reproducible
    usage = a["usage"]
    assert usage["prompt_tokens"] > 0 and 2 <= usage["completion_tokens"] <= 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    cases = [({**body, "stop": ["\n"]}, "stop strings are not supported by this CPU server"),
             ({"messages": [{"role": "user", "content": [{"type": "video_url"}]}]},
              "messages[0].content[0]: only text and image_url parts are supported "
              "(got type 'video_url')"),
             ({"messages": []}, "messages must be a non-empty list"),
             ({"messages": [{"role": "user", "content": "x"}], "best_of": 2},
              "unknown /v1/chat/completions fields ['best_of']")]
    for bad, message in cases:
        status, out = _chat(url, bad)
        assert (status, out["message"]) == (400, message)
    status, out = _chat(url, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]}]})
    assert status == 400 and out["message"].startswith("image_url: ")
    assert "cannot be fetched offline" in out["message"]


def _cfg(tmp_path, *extra):
    hf = tmp_path / "hf"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text("{}")
    return load_config(REPO / "examples" / "eval_paper.yaml",
                       [f"model.hf_dir={hf}", f"logging.run_dir={tmp_path / 'run'}", *extra])


def test_paper_preset_plan(tmp_path):
    with pytest.raises(ConfigError) as e:
        lmms.plan(_cfg(tmp_path))
    assert str(e.value) == (
        "eval.datasets.mathvista_testmini_cot=data/eval/MathVista: not a local dataset (neither "
        "a save_to_disk directory with dataset_dict.json nor parquet files)")
    # with every dataset present (parquet files named after their split)
    cfg = _cfg(tmp_path)
    overrides = []
    for task, path in cfg.eval.datasets.items():
        d = tmp_path / "data" / task
        d.mkdir(parents=True)
        (d / "other-0.parquet").write_bytes(b"")
        (d / f"{lmms.TASKS[next(n for n, t in lmms.TASKS.items() if task in t.lmms_tasks)].split}"
              f"-0.parquet").write_bytes(b"")
        overrides.append(f"eval.datasets.{task}={d}")
    planned = lmms.plan(_cfg(tmp_path, *overrides))
    assert [(n, names) for n, _, _, names in planned] == [
        ("mathvista", ["mathvista_testmini_cot", "mathvista_testmini_solution",
                       "mathvista_testmini_format"]),
        ("mathvision", ["mathvision_testmini"]), ("mathverse", ["mathverse_testmini"]),
        ("wemath", ["wemath_testmini_reasoning"]), ("mmmu", ["mmmu_val"]),
        ("mmmu_pro", ["mmmu_pro_vision", "mmmu_pro_standard"]),
        ("hallusionbench", ["hallusion_bench_image"])]
    settings = {n: s for n, _, s, _ in planned}
    assert lmms.gen_kwargs(settings["wemath"], 0) == \
        "max_new_tokens=49152,temperature=1.0,top_p=0.7,seed=0"
    assert lmms.gen_kwargs(settings["hallusionbench"], 0) == \
        "max_new_tokens=8192,temperature=0.0,top_p=1.0,seed=0"
    d = tmp_path / "data" / "mmmu_pro_standard"
    assert lmms.dataset_source("mmmu_pro_standard", "test", _cfg(tmp_path, *overrides)) == {
        "dataset_path": "parquet", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": [str((d / "test-0.parquet").resolve())]}}}
    cfg = _cfg(tmp_path, *overrides)
    assert lmms.judge_env(cfg, "hallusionbench")["OPENAI_API_URL"] == \
        "http://127.0.0.1:8000/v1/chat/completions"
    assert lmms.judge_env(cfg, "mathvista")["OPENAI_API_URL"] == "http://127.0.0.1:8000/v1"


def test_harness_config_errors(tmp_path):
    cases = [
        (["eval.judge_url=''"], "eval.tasks.mathvista: lmms-eval's mathvista calls an LLM judge; "
                              "set eval.judge_url to an OpenAI-compatible server (/v1 base)"),
        (["eval.tasks.mathvista.lmms_tasks=[mmmu_val]"],
         "eval.tasks.mathvista.lmms_tasks: ['mmmu_val'] are not mathvista tasks; choose from "
         "['mathvista_testmini_cot', 'mathvista_testmini_solution', 'mathvista_testmini_format']"),
        (["eval.tasks.docvqa.max_new_tokens=1"],
         "eval.tasks.docvqa: unknown benchmark; known: ['hallusionbench', 'mathverse', "
         "'mathvision', 'mathvista', 'mmmu', 'mmmu_pro', 'wemath']"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError) as e:
            lmms.plan(_cfg(tmp_path, *extra))
        assert str(e.value) == message
    cfg = load_config(None, ["eval.harness=lmms-eval", "eval.tasks.mmmu.max_new_tokens=8"])
    with pytest.raises(ConfigError) as e:
        lmms.plan(cfg)
    assert str(e.value) == ("lmms-eval task mmmu_val: no local dataset; set eval.datasets.mmmu_val "
                            "to its downloaded copy (save_to_disk or parquet directory) or "
                            "eval.datasets_cache to an HF datasets cache holding it")


def test_metric_values_in_percent():
    wemath, mmmu, hb = lmms.TASKS["wemath"], lmms.TASKS["mmmu"], lmms.TASKS["hallusionbench"]
    assert lmms.percent(wemath, "wemath_strict", "99.81%") == 99.81
    assert lmms.percent(wemath, "acc_score", 0.5) == 50.0
    assert lmms.percent(mmmu, "mmmu_acc", 0.66667) == pytest.approx(66.667)
    assert lmms.percent(hb, "aAcc", 50.0) == 50.0
    assert lmms.percent(hb, "qAcc", None) is None


def test_launched_cpu_server_serves_chat(tiny_model_dir, tmp_path):
    """Without eval.server_url, the harness launches the CPU server for model.hf_dir
    (rollout.engine=local) and talks to its /v1 base."""
    cfg = load_config(None, [f"model.hf_dir={tiny_model_dir}", "rollout.engine=local",
                             f"logging.run_dir={tmp_path}"])
    base, engine = lmms.start_server(cfg)
    try:
        assert base.startswith("http://127.0.0.1:") and base.endswith("/v1")
        status, out = _chat(base[:-3], {"messages": [{"role": "user", "content": "hi"}],
                                        "temperature": 0, "max_tokens": 3})
        assert status == 200 and out["choices"][0]["message"]["role"] == "assistant"
        assert 1 <= out["usage"]["completion_tokens"] <= 3
    finally:
        engine.shutdown()
    with pytest.raises(lmms.HarnessError) as e:
        lmms.start_server(load_config(None, ["eval.server_url=http://127.0.0.1:9/v1"]))
    assert str(e.value) == ("eval.server_url=http://127.0.0.1:9/v1: no server answers "
                            "http://127.0.0.1:9/health")
