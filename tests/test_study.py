"""``prism study``: the paired test, the grid, and which chain runs what (no stage is run here:
the stages are the pipeline's, tested in test_pipeline.py and the stage tests)."""

import json
import math

import pytest

from prism_megatron import study
from prism_megatron.errors import PrismError
from prism_megatron.pipeline.config import check_config


def test_paired_test_by_hand():
    # |d| = .1 .2 .05 .15 .1 (sum .6), observed sum .5: a sign pattern flipping the set F has
    # sum .6 - 2 sum(F), at least .5 in size iff sum(F) <= .05 or >= .55: F = {}, {.05} and their
    # complements, 4 of 32 patterns.
    out = study.paired_test([0.1, 0.2, -0.05, 0.15, 0.1])
    assert out["n"] == 5 and out["mean"] == pytest.approx(0.1)
    assert out["std"] == pytest.approx(math.sqrt(0.035 / 4))
    assert out["t"] == pytest.approx(0.1 / (math.sqrt(0.035 / 4) / math.sqrt(5)))
    assert out["p_sign_flip"] == pytest.approx(4 / 32)
    assert study.paired_test([0.2, 0.1, 0.3, 0.1, 0.2])["p_sign_flip"] == pytest.approx(2 / 32)
    assert study.paired_test([])["mean"] is None


def test_grid():
    grid = study.parse_grid("align_steps=8,16 disc_lr=1e-4,1e-5")
    assert grid == [{"align_steps": 8, "disc_lr": 1e-4}, {"align_steps": 8, "disc_lr": 1e-5},
                    {"align_steps": 16, "disc_lr": 1e-4}, {"align_steps": 16, "disc_lr": 1e-5}]
    assert study.align_overrides(grid[1]) == ["train_steps=8", "discriminator.lr=1e-05"]
    for bad in ("lr=1", "align_steps=", "disc_lr=fast"):
        with pytest.raises(PrismError, match="--grid"):
            study.parse_grid(bad)


def fake_result(key_values: dict, heldout: str) -> dict:
    rows = [{"key": key, f"{heldout}/accuracy": acc, f"{heldout}/perception_precision": acc / 2}
            for key, acc in key_values.items()]
    return {"rows": rows, "stages": {}}


@pytest.fixture
def fake_study(tmp_path, monkeypatch):
    """A Study whose chains are recorded (and given made-up results) instead of run."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "rl.jsonl").write_text("".join(json.dumps({"id": f"rl-{i}"}) + "\n"
                                           for i in range(10)))
    s = study.Study(tmp_path, seeds=(0, 1, 2, 3, 4), sweep_seeds=(7,),
                    grid=study.parse_grid("align_lr=1e-4,3e-4"), val_rows=4, jobs=1)
    calls = []

    def prepare():
        s.threads, s.model, s.data = 0, tmp_path / "model", data
        s.rl_train, s.val = s.split_rl(data)
        s.test = data / "test.jsonl"
        s.root.mkdir(parents=True, exist_ok=True)

    def run_chains(chains, teacher_nll=True):
        calls.append((chains, teacher_nll, (s.root / "protocol.json").is_file()))
        out = {}
        for name, cfg, _ in chains:
            check_config(cfg)
            if name.startswith("sweep"):   # 3e-4 is better on validation
                out[name] = fake_result({"prism_rlvr": 0.5 if "0.0003" in str(
                    cfg.align.overrides) else 0.3, "baseline_rlvr": 0.2}, "study_val")
            else:
                seed = cfg.seed
                values = {"sft": 0.25, "baseline_rlvr": 0.3 + 0.01 * seed, "align": 0.2,
                          "prism_rlvr": 0.32 + 0.02 * seed}
                out[name] = fake_result({k: v for k, v in values.items()
                                         if k in cfg.stages or k == "sft"}, "test")
        return out

    monkeypatch.setattr(s, "prepare", prepare)
    monkeypatch.setattr(s, "run_chains", run_chains)
    return s, calls


def test_sweep_then_protocol_on_test(fake_study):
    s, calls = fake_study
    report = s.run()
    (sweep, sweep_nll, fixed_before_sweep), (test, test_nll, fixed_before_test) = calls
    # the validation split: the last 4 rl rows, not trained on
    assert s.val.read_text().count("\n") == 4 and s.rl_train.read_text().count("\n") == 6
    assert not fixed_before_sweep and fixed_before_test and not sweep_nll and test_nll
    by_name = {name: (cfg, wave) for name, cfg, wave in sweep}
    for name, (cfg, wave) in by_name.items():
        assert cfg.data.test_files == [str(s.val)] and cfg.data.rl_file == str(s.rl_train)
    warm, _ = by_name["sweep warm-up 7"]
    grid_cfg, wave = by_name["sweep align_lr0.0003 7"]
    assert wave == 1 and grid_cfg.stages == ["align", "prism_rlvr"]
    assert grid_cfg.shared["warmup"] == warm.work_dir and "optimizer.lr=0.0003" in \
        grid_cfg.align.overrides
    protocol = json.loads((s.root / "protocol.json").read_text())
    assert protocol["chosen"] == "align_lr0.0003" and protocol["validation"] == {
        "align_lr0.0001": [0.3], "align_lr0.0003": [0.5]}
    log = [json.loads(line) for line in (s.root / "sweep.jsonl").read_text().splitlines()]
    assert [r["config"] for r in log] == ["align_lr0.0001", "align_lr0.0003"]

    chains = {name: (cfg, wave) for name, cfg, wave in test}
    assert all(cfg.data.test_files == [str(s.test)] for cfg, _ in chains.values())
    frozen, wave = chains["frozen 3"]
    assert wave == 1 and frozen.shared["warmup"].endswith("test/seed3/prism")
    assert "discriminator.frozen=true" in frozen.align.overrides
    assert "optimizer.lr=0.0003" in frozen.align.overrides      # the protocol, for every variant
    segment, _ = chains["segment 0"]
    assert "discriminator.expert_routing=segment" in segment.warmup.overrides
    assert segment.stages == ["upcycle", "warmup", "align", "prism_rlvr"]
    dense, _ = chains["dense 1"]
    assert (dense.upcycle.num_experts, dense.upcycle.top_k) == (1, 1)
    base, _ = chains["baseline 2"]
    assert base.stages == ["baseline_rlvr"] and base.shared["sft"].endswith("runs")
    teacher, _ = chains["sft_teacher_only"]
    assert teacher.stages == ["sft"] and "sft" not in teacher.shared
    assert teacher.data.sft_files == [str(s.data / "sft_teacher.jsonl")]

    # paired: prism_rlvr - baseline_rlvr = .02 + .01 seed, positive in every seed
    d = report["paired"]["prism/rlvr - baseline_rlvr"]["test/accuracy"]
    assert d["mean"] == pytest.approx(0.04) and d["p_sign_flip"] == pytest.approx(2 / 32)
    assert report["policies"]["prism/rlvr"]["test/accuracy"]["mean"] == pytest.approx(0.36)
    assert "align_lr0.0003" in (s.root / "results.md").read_text()

    calls.clear()            # a rerun keeps the protocol: no sweep
    s.run()
    assert len(calls) == 1 and not calls[0][0][0][0].startswith("sweep")


def test_cli_errors_are_one_line(capsys):
    from prism_megatron.cli import main

    assert main(["study", "--variants", "prism,nope"]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err
    assert main(["study", "--variants", "frozen"]) == 2    # its warm-up is prism's
    err = capsys.readouterr().err
    assert "add it to --variants" in err and len(err.strip().splitlines()) == 1


def test_ablations_on_fewer_seeds_and_only_through_alignment(fake_study):
    s, calls = fake_study
    s.ablation_seeds, s.ablation_until, s.style_ceiling = (0, 1, 2), "align", False
    report = s.run()
    chains = {name: cfg for name, cfg, _ in calls[-1][0]}
    assert "prism 4" in chains and "frozen 3" not in chains and "dense 2" in chains
    assert chains["prism 4"].stages[-1] == "prism_rlvr"
    assert chains["frozen 0"].stages == ["align"]
    assert chains["dense 0"].stages == ["upcycle", "warmup", "align"]
    frozen = report["policies"]["frozen/align"]["test/accuracy"]
    assert frozen["values"] == [0.2, 0.2, 0.2, None, None] and frozen["mean"] == pytest.approx(0.2)
    assert report["policies"]["frozen/rlvr"]["test/accuracy"]["mean"] is None
    assert report["paired"]["frozen/align - sft"]["test/accuracy"]["n"] == 3
