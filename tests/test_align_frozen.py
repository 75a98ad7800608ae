"""The alignment stage with ``discriminator.frozen``: no optimizer is built for the
discriminator and its weights stay bit-identical while the policy trains; the pair statistics
are still logged (forward-only, equal to the online run's at step 1, where both score the same
samples with the same weights); nothing is saved for it and a resumed frozen run continues
exactly. The same runs check the per-step observability metrics (score spread, flat groups,
fidelity of the samples, teacher-NLL probe)."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from align_step import fixed_rollout  # noqa: E402  (the hand-written batch of tests/dist)

PAIR_KEYS = ("disc/acc_caption", "disc/acc_reasoning", "disc/gap_caption", "disc/gap_reasoning",
             "disc/loss", "disc/pairs")


@pytest.fixture(scope="module")
def frozen_assets(tiny_model_dir, synthetic_data_dir, tmp_path_factory):
    from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron
    from prism_megatron.convert.upcycle import upcycle

    root = tmp_path_factory.mktemp("align-frozen")
    convert_hf_to_megatron(tiny_model_dir, root / "policy", fmt="torch_dist", progress=False)
    upcycle(tiny_model_dir, root / "disc", noise_std=0.01, progress=False, log=lambda *a: None)
    return root, tiny_model_dir, synthetic_data_dir


def write_config(root, assets, name, *, train_steps=2, frozen=True, **checkpoint):
    base, model, data = assets
    cfg = {"seed": 0, "train_steps": train_steps,
           "model": {"hf_dir": str(model), "megatron_dir": str(base / "policy")},
           "optimizer": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0},
           "data": {"train_files": [str(data / "align.jsonl")], "max_prompt_length": 512,
                    "micro_batch_size": 4},
           "rollout": {"engine": "local", "n": 4, "max_new_tokens": 16},
           "algorithm": {"name": "prism", "prompts_per_step": 2},
           "discriminator": {"megatron_dir": str(base / "disc"), "lr": 1e-3, "frozen": frozen},
           "eval": {"probe_rows": 2},
           "checkpoint": {"save_dir": str(root / name / "ckpt"), "save_interval": 1,
                          "keep_last": 3, **checkpoint},
           "logging": {"run_dir": str(root / name / "run"), "tensorboard": False,
                       "plots": False}}
    path = root / name / "align.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def history(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r.get("step", 0) >= 1]


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


@pytest.fixture(scope="module")
def frozen_run(frozen_assets, tmp_path_factory):
    """Two frozen steps, with the discriminator's weights at every scoring pass and the
    policy's at every sync recorded."""
    from prism_megatron.config import load_config
    from prism_megatron.rl.discriminator import Discriminator
    from prism_megatron.rl.policy import Policy
    from prism_megatron.stages import align

    root = tmp_path_factory.mktemp("frozen-runs")
    seen = {"disc": [], "policy": [], "objects": []}
    score, sync = Discriminator.score, Policy.sync

    def recording_score(self, batch, tokenizer, vision_ids):
        seen["disc"].append(flat(self.model))
        seen["objects"].append(self)
        return score(self, batch, tokenizer, vision_ids)

    def recording_sync(self):
        out = sync(self)
        seen["policy"].append(flat(self.model))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Discriminator, "score", recording_score)
        mp.setattr(Policy, "sync", recording_sync)
        align.run(load_config(str(write_config(root, frozen_assets, "frozen"))))
    seen["disc"].append(flat(seen["objects"][-1].model))
    return root, seen, history(root / "frozen" / "run")


@pytest.mark.slow  # three in-process alignment runs of the tiny model
def test_frozen_discriminator_never_changes_while_the_policy_trains(frozen_run):
    root, seen, rows = frozen_run
    disc = seen["objects"][0]
    assert disc.frozen and disc.trainer is None            # no optimizer, no gradient buffers
    assert not any(p.requires_grad for p in disc.model.parameters())
    assert len(seen["disc"]) == 3                          # step 1, step 2, after the run
    assert all(torch.equal(seen["disc"][0], w) for w in seen["disc"][1:])
    policy = seen["policy"]                                # start-up sync, step 1, step 2
    assert len(policy) == 3
    assert (policy[1] - policy[0]).abs().max() > 1e-4 and (policy[2] - policy[1]).abs().max() > 0
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in PAIR_KEYS + ("spread/caption", "spread/reasoning", "adv/flat_groups",
                                "probe/nll_caption", "probe/nll_reasoning",
                                "fidelity/perception_coverage", "fidelity/reasoning_coverage"):
            assert key in row, key
        assert "disc/grad_norm" not in row
        assert 0.0 <= row["disc/acc_caption"] <= 1.0 and row["disc/pairs"] >= 0
        assert 0.0 <= row["adv/flat_groups"] <= 1.0
        assert row["probe/tokens_caption"] > 0 and row["probe/nll_caption"] > 0
    # the policy's step 1 update moved its teacher-NLL
    assert rows[0]["probe/nll_caption"] != rows[1]["probe/nll_caption"]
    # nothing saved for the discriminator; the policy's checkpoints are there
    assert not (root / "frozen" / "ckpt" / "discriminator").exists()
    assert (root / "frozen" / "ckpt" / "step_0000002").is_dir()


@pytest.mark.slow  # three in-process alignment runs of the tiny model
def test_frozen_pair_statistics_equal_the_online_ones_at_step_one(frozen_run, frozen_assets):
    """Step 1 of both runs: the same policy samples, scored and paired by the same
    discriminator weights; the online run updates after computing them, the frozen one not."""
    from prism_megatron.config import load_config
    from prism_megatron.stages import align

    root, _, rows = frozen_run
    align.run(load_config(str(write_config(root, frozen_assets, "online", train_steps=1,
                                           frozen=False, enabled=False))))
    online = history(root / "online" / "run")[0]
    assert online["disc/grad_norm"] > 0
    for key in PAIR_KEYS + ("score_caption", "score_reasoning", "adv_std", "spread/caption"):
        assert rows[0][key] == pytest.approx(online[key], abs=1e-6), key


@pytest.mark.slow  # three in-process alignment runs of the tiny model
def test_resumed_frozen_run_continues_exactly(frozen_run, frozen_assets):
    """From the frozen run's step-1 checkpoint (policy only): step 2 again, equal to the
    uninterrupted run's step 2 (the discriminator reloads its initial weights)."""
    from prism_megatron.config import load_config
    from prism_megatron.stages import align

    root, _, rows = frozen_run
    align.run(load_config(str(write_config(
        root, frozen_assets, "resumed", resume=str(root / "frozen" / "ckpt" / "step_0000001")))))
    resumed = history(root / "resumed" / "run")
    assert [r["step"] for r in resumed] == [2]
    for key in PAIR_KEYS + ("score_caption", "score_reasoning", "format_rate",
                            "response_len_mean", "probe/nll_caption", "probe/nll_reasoning",
                            "loss", "grad_norm"):
        assert resumed[0][key] == pytest.approx(rows[1][key], abs=1e-6), key


def test_frozen_pair_statistics_equal_the_online_ones_on_a_fixed_batch(frozen_assets, tmp_path):
    """Hand-written students (per prompt: two valid, two invalid) against their teachers: the
    frozen discriminator's forward-only statistics equal the online step's (computed before its
    update, on the same weights), the online one moves and the frozen one does not."""
    from transformers import AutoConfig

    from prism_megatron.config import load_config
    from prism_megatron.data.encode import load_processor
    from prism_megatron.data.segments import pair_segments
    from prism_megatron.distributed import destroy_distributed, init_distributed
    from prism_megatron.rl.batch import RolloutBatch
    from prism_megatron.rl.discriminator import Discriminator, online_pairs, vision_token_ids

    path = write_config(tmp_path, frozen_assets, "fixed", enabled=False)
    configs = {name: load_config(str(path), [f"discriminator.frozen={name == 'frozen'}"])
               for name in ("frozen", "online")}
    configs["online_aux"] = load_config(str(path), ["discriminator.frozen=false",
                                                      "discriminator.aux_loss_coef=0.5"])
    model_dir = configs["frozen"].model.hf_dir
    init_distributed(tp=1, pp=1, seed=0)
    try:
        processor = load_processor(model_dir)
        tok = processor.tokenizer
        prompts, samples, group = fixed_rollout(configs["frozen"], processor)
        teachers = [pair_segments(p.teacher["teacher_caption"], p.teacher["teacher_cot"], tok,
                                  p.answer) for p in prompts]
        vision = vision_token_ids(AutoConfig.from_pretrained(model_dir))
        out, moved, routers = {}, {}, {}
        for name, cfg in configs.items():
            disc = Discriminator.for_alignment(cfg, total_steps=2, pad_id=tok.pad_token_id)
            disc.resume_at(0)
            assert disc.frozen == (name == "frozen")
            batch = RolloutBatch(prompts, samples, group)
            disc.score(batch, tok, vision)
            assert batch.valid.tolist() == [True, False, True, False] * 2
            before = flat(disc.model)
            out[name] = disc.online_step(online_pairs(batch, teachers, step=0), group)
            moved[name] = float((flat(disc.model) - before).abs().max())
            routers[name] = torch.cat([p.detach().flatten().clone() for n, p in
                                       disc.model.named_parameters() if "router" in n])
    finally:
        destroy_distributed()
    frozen, online = out["frozen"], out["online"]
    assert moved["frozen"] == 0.0 and moved["online"] > 1e-4
    assert frozen["disc/pairs"] == online["disc/pairs"] == 4
    assert "disc/grad_norm" not in frozen and online["disc/grad_norm"] > 0
    for key in PAIR_KEYS:
        assert frozen[key] == pytest.approx(online[key], abs=1e-6), key
    assert frozen["disc/gap_caption"] != 0.0 and frozen["disc/loss"] > 0
    # discriminator.aux_loss_coef is wired into the alignment update: the same pairs, statistics
    # and loss, but the routers get the load-balancing gradient too
    aux = out["online_aux"]
    assert aux["disc/loss"] == pytest.approx(online["disc/loss"], abs=1e-6)
    assert online["disc/aux_loss"] == 0.0 and aux["disc/aux_loss"] > 0.5   # 1 at balance
    assert float((routers["online_aux"] - routers["online"]).abs().max()) > 1e-7


def test_the_warm_up_refuses_a_frozen_discriminator(frozen_assets, tmp_path):
    from prism_megatron.config import ConfigError, load_config
    from prism_megatron.rl.discriminator import Discriminator

    cfg = load_config(str(write_config(tmp_path, frozen_assets, "warmup")))
    with pytest.raises(ConfigError, match="alignment-stage ablation"):
        Discriminator.for_warmup(cfg, total_steps=1, pad_id=0)
