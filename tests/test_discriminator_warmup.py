"""Discriminator warm-up on the synthetic task (in-process, CPU): held-out pairwise accuracy in both
routing modes, expert-load report, resume; and the ``prism warmup`` command's error handling."""

import json

import pytest

from dist_utils import REPO

CONFIG = REPO / "examples" / "tiny" / "warmup.yaml"
STEPS = 6


@pytest.fixture(scope="module")
def warmup_assets(tiny_model_dir, synthetic_data_dir, tmp_path_factory):
    from prism_megatron.data.pairs import write_synthetic_pairs
    from prism_megatron.convert.upcycle import upcycle

    root = tmp_path_factory.mktemp("warmup")
    pairs = write_synthetic_pairs(synthetic_data_dir, root / "pairs")
    upcycle(tiny_model_dir, root / "disc", noise_std=0.01, progress=False, log=lambda *a: None)
    return root, pairs


def overrides(root, pairs, model_dir, run: str, steps: int, routing: str, save: bool) -> list[str]:
    return [f"model.hf_dir={model_dir}", f"discriminator.megatron_dir={root / 'disc'}",
            f"discriminator.expert_routing={routing}", f"train_steps={steps}",
            f"data.train_files=[{pairs['train']}]", f"data.eval_files=[{pairs['heldout']}]",
            "data.global_batch_size=4", "data.micro_batch_size=4",
            f"checkpoint.save_dir={root / run / 'ckpt'}" if save else "checkpoint.enabled=false",
            f"checkpoint.save_interval={STEPS}", f"logging.run_dir={root / run}",
            "logging.tensorboard=false", "discriminator.eval_interval=0"]


@pytest.mark.slow
@pytest.mark.parametrize("routing", ["learned", "segment"])
def test_warmup_learns_to_score_teachers_above_students(warmup_assets, tiny_model_dir, routing):
    """6 steps of 4 pairs from a freshly upcycled tiny discriminator: held-out pairwise accuracy
    (teacher > student, 16 prompts whose images are in no training pair) clearly above chance
    (0.5) for both segments."""
    from prism_megatron.config import load_config
    from prism_megatron.stages.warmup import run

    root, pairs = warmup_assets
    save = routing == "learned"     # checkpoint + resume exercised once
    cfg = load_config(CONFIG, overrides(root, pairs, tiny_model_dir, routing, STEPS, routing, save))
    final = run(cfg)
    assert final["pairs"] == 16
    assert final["acc_caption"] >= 0.8 and final["acc_reasoning"] >= 0.8, final
    report = json.loads((root / routing / "warmup_report.json").read_text())
    assert report["heldout"]["acc_caption"] == final["acc_caption"]
    before = report["heldout_before_training"]      # the untrained discriminator, same pairs
    print(f"{routing}: held-out accuracy caption {before['acc_caption']:.2f} -> "
          f"{final['acc_caption']:.2f}, reasoning {before['acc_reasoning']:.2f} -> "
          f"{final['acc_reasoning']:.2f}")
    assert final["margin_caption"] > before["margin_caption"]
    assert final["margin_reasoning"] > before["margin_reasoning"]
    assert (root / routing / "warmup_curves.png").is_file()
    history = [json.loads(x) for x in (root / routing / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    assert abs(history[0]["aux_loss"] - 1.0) < 0.5          # the load-balancing loss is on
    for layer in report["expert_load"].values():
        caption, reasoning = layer["caption"]["share"], layer["reasoning"]["share"]
        assert sum(caption) == pytest.approx(1, abs=1e-3) and sum(reasoning) == pytest.approx(1, abs=1e-3)
        if routing == "segment":      # perception experts 0-1, reasoning experts 2-3
            assert caption[2:] == [0, 0] and reasoning[:2] == [0, 0]
    if save:                          # resume from the last checkpoint and train 2 more steps
        more = load_config(CONFIG, overrides(root, pairs, tiny_model_dir, routing, STEPS + 2,
                                             routing, save))
        run(more)
        history = [json.loads(x) for x in (root / routing / "metrics.jsonl").read_text().splitlines()]
        assert [h["step"] for h in history] == list(range(1, STEPS + 3))
        assert (root / routing / "ckpt" / "latest").read_text().strip() == f"step_{STEPS + 2:07d}"
        report = json.loads((root / routing / "warmup_report.json").read_text())
        assert report["steps"] == STEPS + 2 and "heldout_before_training" in report


def test_warmup_command_reports_bad_configs_without_a_traceback(capsys, tmp_path, warmup_assets):
    from prism_megatron.cli import main

    disc = f"discriminator.megatron_dir={warmup_assets[0] / 'disc'}"
    for overrides, message in (
            (["discriminator.megatron_dir=''"], "discriminator.megatron_dir is empty"),
            ([f"discriminator.megatron_dir={tmp_path}"], "is not a Megatron checkpoint"),
            ([disc, "discriminator.ep=3"], "ep=3 must divide num_experts=4"),
            ([disc, "discriminator.num_experts=3", "discriminator.expert_routing=segment"],
             "num_experts/top_k = 3/2")):
        assert main(["warmup", str(CONFIG), *overrides]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
