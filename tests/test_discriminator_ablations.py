"""The discriminator ablations end to end on the tiny model (in-process, CPU): a dense
discriminator (upcycled with one expert, top-1) and dedicated experts
(``discriminator.expert_routing=segment`` on the default 4-expert top-2 upcycle), each through one
warm-up step and one alignment step from the warm-up's checkpoint, with the overrides a
``prism pipeline`` variant passes (``upcycle.num_experts/top_k`` become
``discriminator.num_experts/top_k`` of both stages)."""

import json
import math

import pytest
import torch
import yaml

from dist_utils import REPO, run_torchrun

ABLATIONS = {   # name: (num_experts, top_k, stage overrides of warm-up and alignment)
    "dense": (1, 1, ["discriminator.expert_routing=learned"]),
    "segment": (4, 2, ["discriminator.expert_routing=segment"]),
}


@pytest.fixture(scope="module")
def ablation_assets(tiny_model_dir, synthetic_data_dir, tmp_path_factory):
    from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron
    from prism_megatron.convert.upcycle import upcycle
    from prism_megatron.data.pairs import write_synthetic_pairs

    root = tmp_path_factory.mktemp("ablations")
    convert_hf_to_megatron(tiny_model_dir, root / "policy", fmt="torch_dist", progress=False)
    for name, (experts, top_k, _) in ABLATIONS.items():
        upcycle(tiny_model_dir, root / name / "upcycled", num_experts=experts, top_k=top_k,
                noise_std=0.01, progress=False, log=lambda *a: None)
    return root, write_synthetic_pairs(synthetic_data_dir, root / "pairs")


def history(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_runs_warmup_then_alignment(ablation_assets, tiny_model_dir, synthetic_data_dir,
                                             name):
    from prism_megatron.config import load_config
    from prism_megatron.stages import align, warmup

    root, pairs = ablation_assets
    experts, top_k, overrides = ABLATIONS[name]
    disc = [f"discriminator.num_experts={experts}", f"discriminator.top_k={top_k}", *overrides]
    run = root / name
    final = warmup.run(load_config(REPO / "examples" / "tiny" / "warmup.yaml", [
        f"model.hf_dir={tiny_model_dir}", f"discriminator.megatron_dir={run / 'upcycled'}", *disc,
        "train_steps=1", f"data.train_files=[{pairs['train']}]",
        f"data.eval_files=[{pairs['heldout']}]", "data.global_batch_size=4",
        "data.micro_batch_size=4", f"checkpoint.save_dir={run / 'warmup' / 'ckpt'}",
        "checkpoint.save_interval=1", f"logging.run_dir={run / 'warmup'}",
        "logging.tensorboard=false", "logging.plots=false", "discriminator.eval_interval=0"]))
    assert final["pairs"] == 16
    assert math.isfinite(final["margin_caption"]) and math.isfinite(final["margin_reasoning"])
    step = history(run / "warmup")[0]
    assert math.isfinite(step["loss"]) and step["grad_norm"] > 0
    # One expert: always balanced (1); segment with top-2 of each 2-expert half: every token
    # uses both experts of its half, so the loss is exactly 1 as well.
    assert step["aux_loss"] == pytest.approx(1.0, abs=1e-6)
    report = json.loads((run / "warmup" / "warmup_report.json").read_text())
    for layer in report["expert_load"].values():
        caption, reasoning = layer["caption"]["share"], layer["reasoning"]["share"]
        if name == "dense":
            assert caption == [1.0] and reasoning == [1.0]
        else:                                  # perception experts 0-1, reasoning experts 2-3
            assert caption[2:] == [0, 0] and reasoning[:2] == [0, 0]

    cfg = {"seed": 0, "train_steps": 1,
           "model": {"hf_dir": str(tiny_model_dir), "megatron_dir": str(root / "policy")},
           "optimizer": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
           "data": {"train_files": [str(synthetic_data_dir / "align.jsonl")],
                    "max_prompt_length": 512, "micro_batch_size": 4},
           "rollout": {"engine": "local", "n": 4, "max_new_tokens": 16},
           "algorithm": {"name": "prism", "prompts_per_step": 2},
           "discriminator": {"megatron_dir": str(run / "warmup" / "ckpt"), "lr": 1e-3},
           "checkpoint": {"enabled": False},
           "logging": {"run_dir": str(run / "align"), "tensorboard": False, "plots": False}}
    (run / "align.yaml").write_text(yaml.safe_dump(cfg))
    metrics = align.run(load_config(run / "align.yaml", disc))
    for key in ("score_caption", "score_reasoning", "disc/loss", "disc/grad_norm"):
        assert math.isfinite(metrics[key]), key
    assert metrics["disc/grad_norm"] > 0
    # The untrained tiny policy writes no valid response, so scores of valid ones come from the
    # fixed rollout batch of tests/dist/align_step.py (2 prompts x 2 valid + 2 invalid responses).
    cfg["discriminator"].update(num_experts=experts, top_k=top_k,
                                expert_routing=overrides[0].split("=")[1])
    (run / "align_step.yaml").write_text(yaml.safe_dump(cfg))
    run_torchrun(REPO / "tests" / "dist" / "align_step.py", 1, run / "align_step.yaml",
                 run / "step.pt", timeout=600)
    r = torch.load(run / "step.pt")
    valid = r["valid"]
    assert valid.tolist() == [True, False, True, False] * 2
    scores = torch.stack([r["caption"], r["reasoning"]], dim=1)
    assert torch.isfinite(scores).all() and (scores[~valid] == 0).all()
    assert scores[valid].abs().min() > 0 and scores[valid].std() > 1e-4   # real, distinct scores
    assert torch.allclose(scores[valid], r["single"][valid], atol=1e-5)   # batch-invariant
    assert torch.isfinite(r["advantages"]).all()
    assert r["disc"]["disc/pairs"] == 4 and r["disc_moved"] > 1e-4
    print(name, "valid scores (caption, reasoning):", scores[valid].tolist())
