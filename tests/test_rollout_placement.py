"""Rollout servers on every node, and prompts dispatched across servers by expected tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))

from dist_utils import REPO, torchrun_command  # noqa: E402

from prism_megatron.config import ConfigError, PrismConfig, validate  # noqa: E402
from prism_megatron.rollout import RolloutPrompt, SamplingParams  # noqa: E402
from prism_megatron.rollout.local import LocalEngine  # noqa: E402
from prism_megatron.rollout.sglang import balance  # noqa: E402

WORKER = Path(__file__).parent / "dist" / "rollout_nodes.py"


def test_balance_by_expected_tokens_not_by_count():
    where, loads = balance([10, 9, 8, 1, 1, 1], 2)      # largest first onto the least loaded
    assert where == [0, 1, 1, 0, 0, 0] and loads == [13, 17]
    # round-robin by count would have sent 10 + 8 + 1 = 19 and 9 + 1 + 1 = 11
    where, loads = balance([5] * 7, 3)
    assert loads == [15, 10, 10] and where == [0, 1, 2, 0, 1, 2, 0]
    assert balance([], 2) == ([], [0, 0])


def test_servers_per_node_excludes_num_servers():
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(PrismConfig)
    cfg.rollout.servers_per_node = 2
    validate(cfg)
    cfg.rollout.num_servers = 4
    with pytest.raises(ConfigError, match="servers_per_node=2 and rollout.num_servers=4"):
        validate(cfg)


@pytest.mark.slow  # two torchrun "nodes" + two CPU server processes
@pytest.mark.dist
def test_servers_on_every_node(make_tiny_model, tmp_path):
    """Each node's local rank 0 launches its server; rank 0 sees both, sends the long prompt
    alone to one and the short ones to the other, draws the seeded samples the CPU engine
    draws, and the distributed sync reaches both nodes' servers."""
    a, b = make_tiny_model("tiny", 0), make_tiny_model("tiny", 1)
    out = tmp_path / "result.json"
    port = None
    procs = []
    for node in (0, 1):
        cmd, env = torchrun_command(1, [str(WORKER), "--model", str(a), "--policy", str(b),
                                        "--out", str(out)])
        if port is None:
            port = cmd[cmd.index("--master_port") + 1]
        cmd[cmd.index("--master_port") + 1] = port
        cmd[3:3] = ["--nnodes", "2", "--node_rank", str(node)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(x[-4000:] for x in logs)
    r = json.loads(out.read_text())
    assert len(r["urls"]) == 2 and len(set(r["urls"])) == 2
    # 120 + 2 x 4 = 128 expected tokens alone, 5 x (10 + 2 x 4) = 90 on the other server
    assert sorted(r["dispatch"]) == [90, 128]
    params = SamplingParams(temperature=1.0, max_new_tokens=4, seed=7, ignore_eos=True)
    local = LocalEngine(a).generate([RolloutPrompt(p) for p in r["prompts"]], params, n=2)
    assert r["tokens"] == [[s.token_ids for s in group] for group in local]
    from safetensors.torch import load_file

    want = load_file(str(b / "model.safetensors"))["model.language_model.layers.0.mlp.up_proj.weight"]
    assert r["checked"] == 2 and len(r["held"]) == 2
    assert all(torch.equal(torch.tensor(h), want[:2].float()) for h in r["held"])


def test_preflight_rollout_combinations():
    from prism_megatron.config import RolloutConfig
    from prism_megatron.preflight import check_rollout

    check_rollout(RolloutConfig(engine="sglang", servers_per_node=2, weight_sync="distributed"))
    with pytest.raises(ConfigError, match="distributed .*needs rollout.engine=sglang"):
        check_rollout(RolloutConfig(engine="local", weight_sync="distributed"))
    with pytest.raises(ConfigError, match="servers_per_node .*no rollout.urls"):
        check_rollout(RolloutConfig(engine="sglang", servers_per_node=1, urls=["http://h:1"]))
