"""The distributed weight sync (``rollout.weight_sync=distributed``) and the spot check.

The CPU server runs as real processes (``python -m prism_megatron.rollout.serve``) and joins the
weight-update group over gloo exactly as SGLang joins it over NCCL; the trainer is a stand-in
Megatron model (one process, TP1/PP1). The torchrun test runs the real Megatron Qwen3-VL at TP2
and PP2: every pipeline stage's tp0 rank sends its own layers, no rank sends the whole model,
and after the sync the server's log-probs equal the trainer's.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))

from dist_utils import run_torchrun  # noqa: E402
from rollout_common import fake_megatron_model, sharpen_model  # noqa: E402

from prism_megatron.rollout import WeightUpdateError  # noqa: E402
from prism_megatron.rollout import weight_sync  # noqa: E402
from prism_megatron.rollout.groups import flatten, unflatten  # noqa: E402
from prism_megatron.rollout.local import LocalEngine  # noqa: E402
from prism_megatron.rollout.sglang import SGLangEngine  # noqa: E402
from prism_megatron.rollout.weight_sync import sync_weights  # noqa: E402

WORKER = Path(__file__).parent / "dist" / "rollout_weight_sync.py"


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _post(url: str, payload: dict) -> tuple[int, dict | list]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _info(url: str) -> dict:
    with urllib.request.urlopen(url + "/server_info", timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def models(make_tiny_model):
    return make_tiny_model("tiny", 0), make_tiny_model("tiny", 1)


@pytest.fixture(scope="module")
def servers(models, tmp_path_factory):
    """Two CPU servers holding model A (data-parallel replicas of one engine)."""
    engine = SGLangEngine(model_path=models[0], server="prism", num_servers=2, max_retries=0,
                          request_timeout_s=120, extra_server_args=["--num-threads", "1"],
                          log_dir=tmp_path_factory.mktemp("wsync-logs"))
    yield engine
    engine.shutdown()


def test_flattened_bucket_round_trip():
    tensors = [torch.randn(3, 5), torch.arange(7, dtype=torch.int64),
               torch.randn(2, 3).to(torch.bfloat16), torch.randn(1)]   # odd offsets included
    flat = flatten(tensors)
    assert flat.dtype == torch.uint8 and flat.numel() == sum(t.numel() * t.element_size()
                                                             for t in tensors)
    back = unflatten(flat, [str(t.dtype)[6:] for t in tensors], [list(t.shape) for t in tensors])
    assert all(torch.equal(a, b) for a, b in zip(tensors, back))


def test_distributed_sync_into_two_servers(servers, models):
    """Every HF tensor broadcast once into the group both servers joined; both hold B after
    (every tensor read back equals B's); the second sync reuses the group and the plan."""
    reference = _weights(models[1])
    trainer, config = fake_megatron_model(models[1])
    stats = sync_weights(trainer, servers, config, bucket_mb=0.5, mode="distributed",
                         check_tensors=3)
    assert stats.mode == "distributed" and stats.tensors == len(reference)
    assert stats.bytes == sum(t.numel() * t.element_size() for t in reference.values())
    assert stats.buckets > 5 and stats.max_bucket_bytes <= 0.5 * 2**20 and stats.checked == 3
    for name in ("model.language_model.layers.1.self_attn.q_proj.weight",
                 "model.visual.blocks.0.attn.qkv.weight", "model.language_model.norm.weight"):
        got = servers.get_weights_by_name(name, 3)
        assert len(got) == 2 and all(torch.equal(g, reference[name][:3].float()) for g in got)
    groups = [_info(s.url)["weight_update_groups"] for s in servers.servers]
    assert len(groups[0]) == 1 and groups[0] == groups[1]
    again = sync_weights(trainer, servers, config, bucket_mb=0.5, mode="distributed")
    assert again.bytes == stats.bytes and again.checked == 0
    assert [_info(s.url)["weight_update_groups"] for s in servers.servers] == groups
    assert weight_sync.plan_for(trainer, config).builds == 1
    assert all(not _info(s.url)["weight_update_session"] for s in servers.servers)


def test_distributed_update_refusals(servers, models):
    """SGLang's refusals: no session (400, before any broadcast, so the sender cannot hang),
    an unknown group, a bad dtype; the client turns them into WeightUpdateError."""
    url = servers.servers[0].url
    body = {"names": ["model.language_model.norm.weight"], "dtypes": ["float32"],
            "shapes": [[64]], "group_name": "nope", "flush_cache": False,
            "load_format": "flattened_bucket"}
    status, out = _post(url + "/update_weights_from_distributed", body)
    assert status == 400 and "begin_weight_update" in out["message"]
    with servers.weight_update_session():
        status, out = _post(url + "/update_weights_from_distributed", body)
        assert status == 400 and "Group nope not in" in out["message"]
        status, out = _post(url + "/update_weights_from_distributed", {**body, "dtypes": ["f32"]})
        assert status == 400 and "not a torch dtype" in out["message"]
    with pytest.raises(WeightUpdateError, match="begin_weight_update"):
        servers.update_weights_from_distributed(0, body["names"], body["dtypes"], body["shapes"],
                                                "nope")
    status, out = _post(url + "/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 2,
        "group_name": "g", "backend": "nccl"})
    assert status == 400 and "gloo groups only" in out["message"]


def test_unknown_names_are_skipped_with_a_warning(servers, models):
    """As SGLang's loaders: a name the model lacks is skipped (logged), the rest is loaded."""
    trainer, config = fake_megatron_model(models[0])
    sync_weights(trainer, servers, config, mode="distributed")   # connects; servers hold A
    sender = next(s for s in weight_sync._SENDERS.values() if s.client is servers)
    b = _weights(models[1])
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(b[name], _weights(models[0])[name])
    with servers.weight_update_session():
        sender.send([(name, b[name]), ("model.surprise.weight", torch.ones(3))])
    assert all(torch.equal(g, b[name][:4]) for g in servers.get_weights_by_name(name, 4))
    logs = [s.log_path.read_text() for s in servers.servers]
    assert all("skipping 1 unknown tensor name(s): model.surprise.weight" in t for t in logs)


def test_get_weights_by_name_route(servers, models):
    url = servers.servers[0].url
    name = "model.language_model.embed_tokens.weight"
    status, rows = _post(url + "/get_weights_by_name", {"name": name, "truncate_size": 2})
    assert status == 200 and len(rows) == 2 and len(rows[0]) == _weights(models[0])[name].shape[1]
    status, out = _post(url + "/get_weights_by_name", {"name": "model.nope"})
    assert status == 400 and out["error"]["message"] == "Get parameter by name failed"


class _DroppingEngine(LocalEngine):
    """An engine whose loader silently skips one tensor (what the spot check must catch)."""

    def update_weights(self, named_tensors):
        return super().update_weights([(n, t) for n, t in named_tensors
                                       if n != "model.language_model.layers.0.mlp.up_proj.weight"])


def test_spot_check_catches_a_tensor_the_engine_did_not_load(models):
    trainer, config = fake_megatron_model(models[1])
    names = weight_sync.plan_for(trainer, config).hf_names()
    stats = sync_weights(trainer, LocalEngine(models[0]), config, check_tensors=len(names))
    assert stats.checked == len(names)
    with pytest.raises(WeightUpdateError, match="spot check failed.*layers.0.mlp.up_proj"):
        sync_weights(trainer, _DroppingEngine(models[0]), config, check_tensors=len(names))
    sync_weights(trainer, _DroppingEngine(models[0]), config, check_tensors=0)   # off: no check


def test_auto_chooses_by_placement(servers, models):
    assert LocalEngine.preferred_weight_sync(None) == "tensor"
    assert servers.preferred_weight_sync() == "tensor"                   # launched on this node
    assert SGLangEngine(urls=[servers.servers[0].url]).preferred_weight_sync() == "tensor"
    remote = SGLangEngine.__new__(SGLangEngine)
    remote.servers = [*servers.servers, type(servers.servers[0])("http://10.1.2.3:30000")]
    assert remote.preferred_weight_sync() == "distributed"              # another node's server


@pytest.mark.slow  # multi-process (torchrun) + a CPU server process
@pytest.mark.dist
def test_megatron_tp2_and_pp2_distributed_sync(make_tiny_model, tmp_path):
    """TP2: tp0 gathers and sends everything, tp1 nothing. PP2: each stage's rank sends its own
    layers (together the model, neither rank all of it). After each sync the server's log-probs
    equal the Megatron trainer's (1e-4); the second sync reuses the groups and the plan."""
    a = sharpen_model(make_tiny_model("tiny", 0), tmp_path / "a", factor=4.0)
    b = sharpen_model(make_tiny_model("tiny", 1), tmp_path / "b", factor=4.0)
    out = tmp_path / "result.json"
    run_torchrun(WORKER, 2, "--engine-hf", a, "--policy-hf", b, "--out", out,
                 "--layouts", "2x1:distributed,1x2:distributed", timeout=900)
    results = json.loads(out.read_text())
    model_bytes = sum(t.numel() * t.element_size() for t in _weights(b).values())
    for layout in ("2x1", "1x2"):
        r = results[layout]
        assert r["before"] > 1e-2 and r["after"] < 1e-4 and r["after_second"] < 1e-4, (layout, r)
        assert sum(r["bytes_per_rank"]) == model_bytes == sum(r["again_per_rank"]), r
        assert r["groups_reused"] and r["plan_builds"] == 1, r
    tp2, pp2 = results["2x1"], results["1x2"]
    assert tp2["bytes_per_rank"][1] == 0 and tp2["checked_per_rank"] == [3, 0]
    assert all(0 < x < 0.75 * model_bytes for x in pp2["bytes_per_rank"]), pp2
    assert pp2["checked_per_rank"] == [3, 3]


def test_spot_check_on_a_model_sglang_cannot_read_back(monkeypatch):
    """SGLang 0.5.23 answers "Get parameter by name failed" for Qwen models (no
    get_weights_by_name): the check is skipped with a warning there, never on the CPU server."""
    from prism_megatron.rollout.base import RolloutRequestError

    def refuse(self, url, payload, timeout, method="POST"):
        raise RolloutRequestError(f"{url} rejected the request (HTTP 400): Get parameter by "
                                  f"name failed")

    monkeypatch.setattr(SGLangEngine, "_http", refuse)
    samples = {"lm_head.weight": torch.zeros(4, 3)}
    real = SGLangEngine(urls=["http://10.1.2.3:30000"], wire_format="sglang")
    assert weight_sync.spot_check(real, samples) == 0
    cpu = SGLangEngine(urls=["http://10.1.2.3:30000"], wire_format="prism")
    with pytest.raises(WeightUpdateError, match="cannot read lm_head.weight back"):
        weight_sync.spot_check(cpu, samples)


@pytest.mark.slow  # torchrun + a CPU server process, per layout
@pytest.mark.dist
@pytest.mark.parametrize("parallel", [{"pp": 2}, {"tp": 2}], ids=["pp2", "tp2"])
def test_rlvr_step_with_distributed_sync(tmp_path, rl_assets, parallel):
    """A full RLVR step at PP2 / TP2 with the engine on the CPU server and
    weight_sync=distributed: after the update the stale engine is off the trainer, after
    Policy.sync its log-probs equal the trainer's (1e-4); at PP2 both ranks send (together the
    model, neither all of it), at TP2 only tp0; both spot checks ran on every sender."""
    import yaml

    model, data, megatron = rl_assets
    cfg = {
        "seed": 0, "train_steps": 1, "parallel": parallel,
        "model": {"hf_dir": str(model), "megatron_dir": str(megatron)},
        "optimizer": {"lr": 1e-2, "schedule": "constant", "warmup_ratio": 0.0},
        "data": {"train_files": [str(data / "rl.jsonl")], "max_prompt_length": 512,
                 "micro_batch_size": 4},
        "rollout": {"engine": "sglang", "server": "prism", "n": 2, "max_new_tokens": 12,
                    "weight_sync": "distributed", "weight_bucket_mb": 1,
                    "weight_check_tensors": 2, "request_timeout_s": 300},
        "algorithm": {"name": "grpo", "prompts_per_step": 2},
        "checkpoint": {"enabled": False, "save_interval": 100},
        "logging": {"run_dir": str(tmp_path / "run"), "tensorboard": False, "plots": False},
    }
    config = tmp_path / "rlvr.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out.json"
    run_torchrun(Path(__file__).parent / "dist" / "weight_sync_rlvr.py", 2, config, out,
                 timeout=900)
    r = json.loads(out.read_text())
    assert r["first"] < 1e-4 and r["stale"] > 1e-3 and r["synced"] < 1e-4, r
    sent = [x["bytes"] for x in r["per_rank"]]
    assert {x["mode"] for x in r["per_rank"] if x["mode"]} == {"distributed"}
    assert sum(sent) == r["model_bytes"], r
    if "pp" in parallel:
        assert all(0 < x < 0.75 * r["model_bytes"] for x in sent), r
        assert [x["checked"] for x in r["per_rank"]] == [2, 2]
    else:
        assert sent[1] == 0 and [x["checked"] for x in r["per_rank"]] == [2, 0]


def test_plan_is_built_once_and_rebuilt_on_a_layout_change(models):
    trainer, config = fake_megatron_model(models[1])
    plan = weight_sync.plan_for(trainer, config)
    assert weight_sync.plan_for(trainer, config) is plan and plan.builds == 1
    with torch.no_grad():   # new values in the same parameters: the same plan streams them
        trainer.language_model.decoder.final_layernorm.weight.mul_(2)
    streamed = dict(weight_sync.iter_hf_tensors(trainer, config))
    assert weight_sync.plan_for(trainer, config) is plan
    assert torch.equal(streamed["model.language_model.norm.weight"],
                       trainer.language_model.decoder.final_layernorm.weight)
    norm = trainer.language_model.decoder.final_layernorm
    norm.weight = torch.nn.Parameter(norm.weight.detach().clone())   # a replaced parameter
    rebuilt = weight_sync.plan_for(trainer, config)
    assert rebuilt is not plan and rebuilt.builds == 2
