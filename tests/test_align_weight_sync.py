"""The alignment stage with ``rollout.weight_sync=distributed`` at PP2 and at TP2: the
policy's engine is the CPU server (a real process), both models share the layout (TP2: the MoE
discriminator sequence-parallel), and each pipeline stage's rank sends its own layers over the
weight-update group (gloo standing in for NCCL). The spot check after every sync reads tensors
back from the server and raises on a difference, so a finished step means the engine held the
trainer's weights after the start-up sync and after the update."""

import json
import subprocess

import pytest
import yaml

from dist_utils import REPO, torchrun_command


@pytest.mark.slow  # torchrun + a CPU server process
@pytest.mark.dist
@pytest.mark.parametrize("layout", ["pp", "tp"])
def test_align_step_with_distributed_sync(tiny_model_dir, synthetic_data_dir, tmp_path, layout):
    from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron
    from prism_megatron.convert.upcycle import upcycle

    convert_hf_to_megatron(tiny_model_dir, tmp_path / "policy", fmt="torch_dist", progress=False)
    upcycle(tiny_model_dir, tmp_path / "disc", noise_std=0.01, progress=False, log=lambda *a: None)
    run = tmp_path / "run"
    cfg = {"seed": 0, "train_steps": 1, "parallel": {layout: 2},
           "model": {"hf_dir": str(tiny_model_dir), "megatron_dir": str(tmp_path / "policy")},
           "optimizer": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
           "data": {"train_files": [str(synthetic_data_dir / "align.jsonl")],
                    "max_prompt_length": 512, "micro_batch_size": 4},
           "rollout": {"engine": "sglang", "server": "prism", "n": 2, "max_new_tokens": 12,
                       "weight_sync": "distributed", "weight_bucket_mb": 1,
                       "weight_check_tensors": 2, "request_timeout_s": 300},
           "algorithm": {"name": "prism", "prompts_per_step": 2},
           "discriminator": {"megatron_dir": str(tmp_path / "disc"), "lr": 1e-3, layout: 2},
           "checkpoint": {"enabled": False},
           "logging": {"run_dir": str(run), "tensorboard": False, "plots": False}}
    config = tmp_path / "align.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd, env = torchrun_command(2, ["-m", "prism_megatron.cli", "align", str(config)])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # rank 0 logs its own sends (PP2: stage 0's layers; TP2: the whole model, tp1 sends
    # nothing), twice: the start-up sync and the one after the step
    sends = [line for line in out.splitlines()
             if "weight sync (distributed): rank 0 (stage 0) sent" in line]
    assert len(sends) == 2, out[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in rows if r.get("step") == 1][-1]
    assert step["time/sync_s"] > 0 and "disc/loss" in step, step
