"""Runs that survive: preemption signals (save, exit 75, bit-exact resume), non-finite steps
(skipped, counted, then a stop; never saved), broken checkpoints and ``latest`` markers (the
newest complete checkpoint by step, metrics.jsonl appended), stage config checks, the run files
(config.yaml, stage.log), throughput metrics and the optional wandb backend."""

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial

import pytest
import torch
import yaml

import sft_common
from dist_utils import REPO, run_torchrun, torchrun_command
from prism_megatron.cli import main
from prism_megatron.metrics import read_history

STEPS = 6


@pytest.fixture(scope="module")
def assets(sft_assets):
    return sft_assets


write_config = partial(sft_common.write_config, train_steps=STEPS)


def losses(run_dir) -> list[float]:
    return [row["loss"] for row in read_history(run_dir) if "loss" in row]


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """The uninterrupted 6-step run."""
    root = tmp_path_factory.mktemp("reference")
    run_torchrun("-m", 1, "prism_megatron.cli", "sft", write_config(root, assets))
    history = losses(root / "run")
    assert len(history) == STEPS
    return root, history


def plain_tensors(path) -> dict:
    """Every tensor of a checkpoint (model and optimizer state) by key."""
    from megatron.core.dist_checkpointing import load_plain_tensors

    from prism_megatron.distributed import distributed

    with distributed(seed=0):
        return {k: v for k, v in load_plain_tensors(str(path)).items()
                if isinstance(v, torch.Tensor) and not k.startswith("rng")}


# ------------------------------------------------------------------------------ preemption

@pytest.mark.slow
@pytest.mark.dist
def test_sigterm_saves_exits_75_and_the_resumed_run_is_bit_exact(tmp_path, assets, reference):
    ref_root, ref_losses = reference
    config = write_config(tmp_path, assets)
    history = tmp_path / "run" / "metrics.jsonl"
    cmd, env = torchrun_command(1, ["-m", "prism_megatron.cli", "sft", config])
    # the plain single-process launch (`prism sft`), which exits with the stage's own code
    cmd = [sys.executable, "-m", "prism_megatron.cli", "sft", config]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, out[-3000:]
    rows = read_history(tmp_path / "run")
    stopped = rows[-1]["step"]
    assert 2 <= stopped < STEPS
    assert f"preempted at step {stopped}, checkpoint saved" in out
    marker = json.loads((tmp_path / "run" / "preempted.json").read_text())
    assert marker["step"] == stopped and marker["signal"] == "SIGTERM"
    saved = sorted(p.name for p in (tmp_path / "ckpt").glob("step_*"))
    assert saved == [f"step_{stopped:07d}"]          # save_interval=100: only the preemption's
    # no checkpoint writer outlived the stage: nothing of its process group runs (an exited
    # helper may linger as a zombie until init reaps it)
    group = subprocess.run(["ps", "-o", "stat=,cmd=", "-g", str(proc.pid)], capture_output=True,
                           text=True).stdout.splitlines()
    assert [line for line in group if not line.strip().startswith("Z")] == []

    run_torchrun("-m", 1, "prism_megatron.cli", "sft", config)
    assert losses(tmp_path / "run") == ref_losses     # bit-equal on CPU
    assert torch_equal(plain_tensors(tmp_path / "ckpt" / f"step_{STEPS:07d}"),
                       plain_tensors(ref_root / "ckpt" / f"step_{STEPS:07d}"))
    log = (tmp_path / "run" / "stage.log").read_text()
    assert f"resumed from {tmp_path / 'ckpt' / f'step_{stopped:07d}'} (step {stopped})" in log
    assert f"saved checkpoint step {STEPS} to {tmp_path / 'ckpt' / f'step_{STEPS:07d}'}" in log
    assert not (tmp_path / "run" / "preempted.json").exists()

    # a run already at its last step says so and does nothing
    again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"already at step {STEPS} of {STEPS}, nothing to do" in again.stderr
    assert losses(tmp_path / "run") == ref_losses


def torch_equal(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys() and a
    return all(torch.equal(a[k], b[k]) for k in a)


def test_a_signal_sets_a_flag_and_after_step_saves_then_leaves_with_75(tmp_path):
    from prism_megatron.config import PrismConfig
    from prism_megatron.runtime import PREEMPTED_EXIT_CODE, Preempted, StageSession
    from prism_megatron.pipeline import runner

    assert PREEMPTED_EXIT_CODE == runner.PREEMPTED_EXIT_CODE == 75
    cfg = PrismConfig()
    cfg.checkpoint.save_dir = str(tmp_path / "ckpt")
    cfg.logging.run_dir = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    session = StageSession(cfg, "sft", info=None)
    saves = []
    save = lambda: saves.append(len(saves) + 1) or tmp_path / "ckpt" / f"step_{len(saves)}"  # noqa
    session.watch.install()
    try:
        session.after_step(1, due=False, save=save)
        assert saves == []
        os.kill(os.getpid(), signal.SIGUSR1)
        assert session.watch.signum == signal.SIGUSR1
        session.after_step(2, due=True, save=save)     # saved as due: not saved twice
    except Preempted as stop:
        assert stop.code == 75 and stop.step == 2 and saves == [1]
    else:
        raise AssertionError("not preempted")
    finally:
        session.watch.restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(
        signal.getsignal(signal.SIGTERM))
    assert json.loads((tmp_path / "run" / "preempted.json").read_text())["step"] == 2


# ------------------------------------------------------------------------------ broken checkpoints

@pytest.mark.slow
@pytest.mark.dist
def test_garbage_latest_and_a_truncated_newest_checkpoint_fall_back_without_data_loss(
        tmp_path, assets):
    """The issue's sequence: a 4-step run saved at 2 and 4, then `latest` made garbage and the
    newest checkpoint's largest tensor file truncated. The rerun resumes from step 2 (not 0),
    appends to metrics.jsonl (nothing truncated) and recomputes steps 3-4 bit-exactly."""
    from prism_megatron.checkpoint import check_complete

    config = write_config(tmp_path, assets, train_steps=4,
                          checkpoint={"save_interval": 2, "keep_last": 3})
    run_torchrun("-m", 1, "prism_megatron.cli", "sft", config)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    first = losses(tmp_path / "run")
    assert len(lines) == len(first) == 4
    (tmp_path / "ckpt" / "latest").write_text("\x00garbage\n")
    newest = tmp_path / "ckpt" / "step_0000004"
    big = max(newest.glob("*.distcp"), key=lambda f: f.stat().st_size)
    big.write_bytes(big.read_bytes()[:1000])

    run_torchrun("-m", 1, "prism_megatron.cli", "sft", config)
    after = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert after[:4] == lines                                  # nothing truncated
    assert [json.loads(x)["step"] for x in after] == [1, 2, 3, 4, 3, 4]   # 3-4 appended
    assert losses(tmp_path / "run") == first                   # bit-equal on CPU
    log = (tmp_path / "run" / "stage.log").read_text()
    assert f"skipping {newest}: tensor file {big.name} is truncated (1000 of" in log
    assert "latest names '\\x00garbage'" in log
    assert f"resumed from {tmp_path / 'ckpt' / 'step_0000002'} (step 2)" in log
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*")) == [
        "step_0000002", "step_0000004"]
    assert check_complete(newest) is None                      # rewritten whole


# ------------------------------------------------------------------------------ non-finite steps

def run_sft_in_process(tmp_path, assets, monkeypatch, poison_from: int | None, **sections):
    from prism_megatron.config import load_config
    from prism_megatron.stages import sft
    from prism_megatron.trainer import Trainer

    config = write_config(tmp_path, assets, **sections)
    if poison_from is not None:       # the test-only hook: NaN losses from step `poison_from` on
        calls = {"step": 0}
        original_step, original_forward = Trainer.train_step, sft.sft_forward

        def counting_step(self, *args, **kwargs):
            calls["step"] += 1
            return original_step(self, *args, **kwargs)

        def poisoned_forward(batch, model):
            output, loss_fn = original_forward(batch, model)
            return (output * float("nan") if calls["step"] >= poison_from else output), loss_fn

        monkeypatch.setattr(Trainer, "train_step", counting_step)
        monkeypatch.setattr(sft, "sft_forward", poisoned_forward)
    return sft.run(load_config(config))


def test_nan_steps_are_skipped_counted_then_stop_the_run(tmp_path, assets, monkeypatch):
    from prism_megatron.trainer import NonFiniteError

    with pytest.raises(NonFiniteError) as info:
        run_sft_in_process(tmp_path, assets, monkeypatch, poison_from=3, train_steps=10,
                           optimizer={"max_skipped_steps": 2},
                           checkpoint={"save_interval": 1, "keep_last": 0})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("3 optimizer steps in a row had a non-finite loss or gradient "
                              "norm (last: loss nan, grad norm nan; optimizer.max_skipped_steps=2)")
    rows = read_history(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]        # step 5 raised before logging
    assert [r["skipped"] for r in rows] == [0, 0, 1, 1]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2]
    assert rows[2]["lr"] == rows[3]["lr"]                    # no schedule step either
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.glob("step_*")) == [f"step_{s:07d}" for s in (1, 2, 3, 4)]
    # a skipped step leaves model AND optimizer exactly as they were
    assert torch_equal(plain_tensors(ckpt / "step_0000004"), plain_tensors(ckpt / "step_0000002"))
    assert not torch_equal(plain_tensors(ckpt / "step_0000002"),
                           plain_tensors(ckpt / "step_0000001"))


def test_adam_eps_zero_is_stopped_and_its_nan_weights_never_saved(tmp_path, assets, monkeypatch):
    """The issue's reproduction: adam_eps=0 turns zero gradients into 0/0 weights at step 1."""
    from prism_megatron.trainer import NonFiniteError

    with pytest.raises(NonFiniteError) as info:
        run_sft_in_process(tmp_path, assets, monkeypatch, poison_from=None, train_steps=10,
                           optimizer={"adam_eps": 0.0}, checkpoint={"save_interval": 1})
    assert str(info.value) == (
        f"the model's weights are not finite at step 1: not saved (the checkpoints in "
        f"{tmp_path / 'ckpt'} are kept); lower optimizer.lr or raise optimizer.adam_eps and "
        "resume")
    assert not list((tmp_path / "ckpt").glob("step_*")) and not (tmp_path / "ckpt" / "latest").exists()


# ------------------------------------------------------------------------------ config, run files

@pytest.mark.parametrize("override,message", [
    ("train_steps=-5", "train_steps=-5 must be >= 0"),
    ("checkpoint.save_dir=''", "checkpoint.save_dir is empty: the trained weights would be lost; "
     "set checkpoint.save_dir=DIR, or checkpoint.enabled=false to train without checkpoints"),
    ("logging.log_interval=0", "logging.log_interval=0 must be >= 1"),
])
def test_stage_config_errors_are_one_line(tmp_path, assets, capsys, override, message):
    for stage in ("sft", "rlvr"):
        code = main([stage, write_config(tmp_path, assets), override])
        err = capsys.readouterr().err
        assert code == 2 and err == f"prism {stage}: error: {message}\n", err


def test_run_files_throughput_and_log_interval(tmp_path, assets, monkeypatch):
    metrics = run_sft_in_process(tmp_path, assets, monkeypatch, poison_from=None, train_steps=3,
                                 checkpoint={"enabled": False, "save_dir": ""},
                                 logging={"log_interval": 2})
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train_steps"] == 3 and saved["logging"]["log_interval"] == 2
    assert saved["checkpoint"]["enabled"] is False
    rows = read_history(run)
    assert [r["step"] for r in rows] == [1, 2, 3]          # every step in metrics.jsonl
    for row in rows:
        assert row["perf/samples_per_s"] == pytest.approx(8 / row["time/step_s"])
        assert row["perf/tokens_per_s"] > row["perf/samples_per_s"]
    log = (run / "stage.log").read_text()
    assert "sft step 2/3: loss" in log and "sft step 3/3: loss" in log    # every 2nd + last
    assert "sft step 1/3" not in log
    assert "tokens/s" in log and "samples/s" in log
    assert "Transformer Engine and Apex are not installed" not in log
    assert not list(tmp_path.glob("ckpt"))                   # checkpoint.enabled=false
    assert metrics["skipped_steps"] == 0


def test_wandb_is_lazy_and_missing_wandb_is_one_line(tmp_path, monkeypatch):
    from prism_megatron.metrics import MetricsLogger, WandbMissingError

    sys.modules.pop("wandb", None)
    with MetricsLogger(tmp_path, 2, tensorboard=False) as logger:
        logger.log(1, {"loss": 1.0}, tokens=10, samples=2)
    assert "wandb" not in sys.modules
    monkeypatch.setitem(sys.modules, "wandb", None)          # "not installed" (import fails)
    with pytest.raises(WandbMissingError) as info:
        MetricsLogger(tmp_path, 2, tensorboard=False, wandb_project="prism")
    assert str(info.value) == ("logging.wandb_project='prism' but the wandb package is not "
                               "installed: pip install wandb, or leave logging.wandb_project empty")


def test_read_history_takes_the_last_row_of_each_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 0, "a": 0}\n{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n'
        '{"step": 2, "a": 20}\n{"step": 3, "a": 3}\n{"step": 4, "a"')   # killed mid-write
    assert [(r["step"], r["a"]) for r in read_history(tmp_path)] == [(0, 0), (1, 1), (2, 20),
                                                                     (3, 3)]


def test_slurm_scripts_parse_and_use_the_preemption_contract():
    slurm = REPO / "examples" / "slurm"
    for script in ("train.sbatch", "node.sh"):
        subprocess.run(["bash", "-n", str(slurm / script)], check=True)
    batch, node = (slurm / "train.sbatch").read_text(), (slurm / "node.sh").read_text()
    assert "#SBATCH --signal=B:USR1@300" in batch and "#SBATCH --requeue" in batch
    assert '[ "$rc" -eq 75 ]' in batch and 'scontrol requeue "$SLURM_JOB_ID"' in batch
    assert 'pkill -USR1 -P "$torchrun_pid"' in node and "rc=75" in node
    assert "preempted.json" in batch and "preempted.json" in node
    from prism_megatron.runtime import PREEMPTED_FILE
    assert PREEMPTED_FILE == "preempted.json"


def test_pipeline_propagates_a_preempted_stage_and_does_not_mark_it_done(tmp_path, monkeypatch):
    from prism_megatron.pipeline import Pipeline, load_pipeline_config

    for name in ("model", "megatron"):
        (tmp_path / name).mkdir()
    for name in ("a.jsonl", "b.jsonl", "c.jsonl", "t.jsonl"):
        (tmp_path / name).write_text("{}\n")
    cfg = {"work_dir": str(tmp_path / "work"), "hf_dir": str(tmp_path / "model"),
           "megatron_dir": str(tmp_path / "megatron"), "show_output": False,
           "data": {"sft_files": [str(tmp_path / "a.jsonl")], "align_file": str(tmp_path / "b.jsonl"),
                    "rl_file": str(tmp_path / "c.jsonl"), "test_files": [str(tmp_path / "t.jsonl")]},
           "sft": {"config": "examples/tiny/sft.yaml"}, "warmup": {"config": "examples/tiny/warmup.yaml"},
           "align": {"config": "examples/tiny/align.yaml"},
           "rlvr": {"config": "examples/tiny/rlvr_grpo.yaml"}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    pipe = Pipeline(load_pipeline_config(str(tmp_path / "p.yaml")), log=lines.append)
    stage_dir = pipe.dir("sft")
    # a stand-in stage: what a preempted `prism sft` under torchrun leaves (marker, exit code 1)
    script = ("import json, os, pathlib; d = pathlib.Path(os.environ['DIR']); "
              "(d / 'preempted.json').write_text(json.dumps({'step': 7})); "
              "print('stage log', os.environ['PRISM_STAGE_LOG']); raise SystemExit(1)")
    monkeypatch.setenv("DIR", str(stage_dir))
    monkeypatch.setattr(pipe, "command", lambda stage: [sys.executable, "-c", script])
    with pytest.raises(SystemExit) as info:
        pipe.step("sft")
    assert info.value.code == 75
    assert not (stage_dir / "done.json").exists()
    assert pipe.status["sft"] == {"status": "preempted at step 7"}
    assert lines[-1].endswith("preempted at step 7 (checkpoint saved); rerun the pipeline to resume")
    assert f"stage log {stage_dir / 'stage.log'}" in (stage_dir / "stage.log").read_text()


def test_sigterm_during_a_save_lets_it_finish_and_leaves_no_writer(tmp_path, monkeypatch):
    """The signal arrives while megatron's writers are at work: the save completes (a complete
    checkpoint, no .tmp), the forked writers are gone, then the stage leaves with 75."""
    import multiprocessing

    from megatron.core import dist_checkpointing

    from prism_megatron.checkpoint import check_complete, save_checkpoint
    from prism_megatron.config import PrismConfig
    from prism_megatron.distributed import distributed
    from prism_megatron.runtime import Preempted, StageSession

    cfg = PrismConfig()
    cfg.checkpoint.save_dir = str(tmp_path / "ckpt")
    cfg.logging.run_dir = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    real_save = dist_checkpointing.save

    def signalled_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)       # handled at once: only sets the flag
        return real_save(*args, **kwargs)

    monkeypatch.setattr(dist_checkpointing, "save", signalled_save)
    earlier = {p.pid for p in multiprocessing.active_children()}   # other tests' processes
    with distributed(seed=0):
        session = StageSession(cfg, "sft", info=None)
        session.watch.install()
        try:
            with pytest.raises(Preempted) as info:
                session.after_step(4, due=True, save=lambda: save_checkpoint(
                    cfg.checkpoint.save_dir, 4, [], trainer_state={}, keep_last=0))
        finally:
            session.watch.restore()
    assert info.value.code == 75 and session.watch.signum == signal.SIGTERM
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step_0000004"]
    assert check_complete(tmp_path / "ckpt" / "step_0000004") is None
    # megatron's forked writers have exited and were reaped; only its spawned results-queue
    # manager (a server process, shut down at interpreter exit) may remain
    assert [p.name for p in multiprocessing.active_children()
            if not p.name.startswith("SyncManager") and p.pid not in earlier] == []


@pytest.mark.slow
@pytest.mark.dist
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, assets):
    """DP2 under torchrun, SIGTERM to rank 1 only: the flag is all-reduced, so rank 0 stops at
    the same step (no rank waits in a collective for one that left), one checkpoint is written
    and both ranks exit 75 (torchrun itself reports 1)."""
    config = write_config(tmp_path, assets)
    history = tmp_path / "run" / "metrics.jsonl"
    cmd, env = torchrun_command(2, ["-m", "prism_megatron.cli", "sft", config])
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (history.exists()
                                           and len(history.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                             text=True).stdout.split()
    rank = {}
    for pid in workers:
        environ = (open(f"/proc/{pid}/environ").read().split("\0"))
        rank[next(e for e in environ if e.startswith("RANK="))] = int(pid)
    os.kill(rank["RANK=1"], signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, out[-3000:]
    assert out.count("exitcode  : 75") + out.count("(exitcode: 75)") >= 2, out[-3000:]
    stopped = read_history(tmp_path / "run")[-1]["step"]
    marker = json.loads((tmp_path / "run" / "preempted.json").read_text())
    assert marker["step"] == stopped and marker["signal"] == "another rank's"
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*")) == [f"step_{stopped:07d}"]
