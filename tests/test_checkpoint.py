"""Resumable dist checkpoints: bit-exact resume, resharding across TP/DP, atomic save, keep-last."""

import json
from pathlib import Path

import pytest

from dist_utils import REPO, run_torchrun

INIT = REPO / "tests" / "dist" / "gpt_parallel.py"
WORKER = REPO / "tests" / "dist" / "gpt_resume.py"


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt") / "init"
    run_torchrun(INIT, 1, "--ckpt", path, "--init")
    return path


def losses(out: str) -> dict[int, float]:
    return {int(k): v for k, v in json.loads(out.strip().splitlines()[-1])["losses"].items()}


@pytest.mark.slow  # multi-process (torchrun)
@pytest.mark.dist
@pytest.mark.parametrize("saved,resumed", [
    ((2, ["--tp", 2]), [(2, ["--tp", 2]), (1, ["--tp", 1])]),
    ((2, ["--distributed-optimizer"]), [(2, ["--distributed-optimizer"]),
                                         (1, ["--distributed-optimizer"])]),
], ids=["tp2-then-tp2-tp1", "dp2-distopt-then-dp2-dp1"])
def test_resume_continues_bit_exactly(tmp_path, init_ckpt, saved, resumed):
    """Train 6 steps saving at step 3; a fresh process resuming from step 3 (same or other
    layout) reproduces steps 4-6 of the uninterrupted run: model, Adam moments and step count,
    LR schedule and data position all come back."""
    save_dir = tmp_path / "ckpt"
    nproc, flags = saved
    full = losses(run_torchrun(WORKER, nproc, "--init-ckpt", init_ckpt, "--save-dir", save_dir,
                               "--save-at", 3, *flags))
    assert sorted(full) == [1, 2, 3, 4, 5, 6] and full[6] < full[1]
    assert (save_dir / "latest").read_text().strip() == "step_0000003"
    for nproc, flags in resumed:
        after = losses(run_torchrun(WORKER, nproc, "--init-ckpt", init_ckpt, "--save-dir", save_dir,
                                    "--resume", *flags))
        assert sorted(after) == [4, 5, 6]
        for step in after:
            assert after[step] == full[step], (nproc, flags, step)  # bit-equal on CPU


# ------------------------------------------------------------------------------ unit tests
# Real (small) dist checkpoints in-process: no model, only the trainer state and the RNG object,
# so .metadata, metadata.json, common.pt and the tensor files are what megatron writes.

@pytest.fixture(scope="module")
def world():
    from prism_megatron.distributed import destroy_distributed, init_distributed

    init_distributed(seed=0)
    yield
    destroy_distributed()


def save(save_dir, step, keep_last=0):
    from prism_megatron.checkpoint import save_checkpoint

    return save_checkpoint(save_dir, step, [], trainer_state={"note": step}, keep_last=keep_last)


def names(save_dir):
    return sorted(p.name for p in save_dir.iterdir() if p.name.startswith("step_"))


def test_newest_complete_checkpoint_by_step_whatever_latest_says(tmp_path, world):
    from prism_megatron.checkpoint import check_complete, find_latest, resume_candidates, step_dir

    for step in (2, 4):
        save(tmp_path, step)
    assert (tmp_path / "latest").read_text() == "step_0000004\n"
    for marker in ("step_0000009\n", "\x00\xff garbage", ""):   # dangling, garbage, empty
        (tmp_path / "latest").write_text(marker)
        assert find_latest(tmp_path) == step_dir(tmp_path, 4)
    (tmp_path / "latest").unlink()
    assert find_latest(tmp_path) == step_dir(tmp_path, 4)
    (tmp_path / "step_0000008.tmp").mkdir()          # a save killed half-way is not a candidate
    assert resume_candidates(tmp_path) == ([step_dir(tmp_path, 4), step_dir(tmp_path, 2)], [])
    assert check_complete(tmp_path / "step_0000007") == "does not exist"


@pytest.mark.parametrize("damage,reason", [
    ("truncate", "is truncated"), ("no-metadata", ".metadata is missing"),
    ("no-common", "common.pt is missing"), ("garbage-common", "common.pt is unreadable"),
    ("garbage-metadata", ".metadata is unreadable"), ("no-tensor-file", "is missing"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, world, damage, reason):
    from prism_megatron.checkpoint import find_latest, resume_candidates, step_dir

    save(tmp_path, 3)
    newest = save(tmp_path, 6)
    tensor_files = sorted(newest.glob("*.distcp"), key=lambda f: f.stat().st_size)
    if damage == "truncate":
        big = tensor_files[-1]
        big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    elif damage == "no-metadata":
        (newest / ".metadata").unlink()
    elif damage == "no-common":
        (newest / "common.pt").unlink()
    elif damage == "garbage-common":
        (newest / "common.pt").write_bytes(b"not a torch file")
    elif damage == "garbage-metadata":
        (newest / ".metadata").write_bytes(b"\x80\x04garbage")
    else:
        tensor_files[-1].unlink()
    complete, skipped = resume_candidates(tmp_path)
    assert complete == [step_dir(tmp_path, 3)]
    assert [p for p, _ in skipped] == [newest] and reason in skipped[0][1]
    assert find_latest(tmp_path) == step_dir(tmp_path, 3)


def test_pruning_keeps_the_newest_by_step_and_the_one_just_written(tmp_path, world):
    """The issue's case: an older run left step 3 and 4; a run that (wrongly) started again
    from step 0 writes step 1. Name or write order must not matter."""
    save(tmp_path, 4)
    save(tmp_path, 3)                          # written after step 4, lower step
    save(tmp_path, 1, keep_last=2)
    assert names(tmp_path) == ["step_0000001", "step_0000003", "step_0000004"]
    save(tmp_path, 2, keep_last=2)             # below the 2 newest (4, 3), but just written
    assert names(tmp_path) == ["step_0000002", "step_0000003", "step_0000004"]
    save(tmp_path, 5, keep_last=2)             # now 5 and 4 are the newest: 3 and 2 go
    assert names(tmp_path) == ["step_0000004", "step_0000005"]
    # an incomplete higher step is not counted as one of the kept, and is not deleted either
    save(tmp_path, 9)
    (tmp_path / "step_0000009" / "common.pt").unlink()
    save(tmp_path, 6, keep_last=2)
    assert names(tmp_path) == ["step_0000005", "step_0000006", "step_0000009"]


@pytest.mark.parametrize("code,words", [(28, "no space left on device"),
                                        (13, "permission denied")])
def test_disk_full_during_save_is_one_line_and_leaves_no_partial_directory(
        tmp_path, world, monkeypatch, code, words):
    import errno
    import os

    from megatron.core import dist_checkpointing

    from prism_megatron.checkpoint import CheckpointError, find_latest, step_dir

    assert errno.ENOSPC == 28 and errno.EACCES == 13
    save(tmp_path, 1)
    before = sorted(p.name for p in (tmp_path / "step_0000001").iterdir())

    def writer_fails(state, directory, **kwargs):
        # what megatron's forked writer does: part of a file, then the OS error, re-raised
        # by the parent wrapped in its own exception
        (Path(directory) / "__0_0.distcp").write_bytes(b"x" * 4096)
        try:
            raise OSError(code, os.strerror(code))
        except OSError as exc:
            raise RuntimeError("Worker failure: unexpected pos 704 vs 598") from exc

    monkeypatch.setattr(dist_checkpointing, "save", writer_fails)
    with pytest.raises(CheckpointError) as info:
        save(tmp_path, 2)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message and words in message
    assert " free of " in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000001"]
    assert find_latest(tmp_path) == step_dir(tmp_path, 1)
    assert sorted(p.name for p in (tmp_path / "step_0000001").iterdir()) == before


def test_stale_tmp_removed_and_a_bug_in_the_writer_is_not_disguised(tmp_path, world, monkeypatch):
    from megatron.core import dist_checkpointing

    from prism_megatron.checkpoint import remove_stale_tmp

    (tmp_path / "step_0000005.tmp").mkdir(parents=True)
    (tmp_path / "step_0000005.tmp" / "__0_0.distcp").write_bytes(b"partial")
    assert remove_stale_tmp(tmp_path) == [tmp_path / "step_0000005.tmp"]
    assert list(tmp_path.iterdir()) == []

    def buggy(state, directory, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(dist_checkpointing, "save", buggy)
    with pytest.raises(KeyError):       # not a storage problem: the real error, and no .tmp
        save(tmp_path, 1)
    assert list(tmp_path.iterdir()) == []


class FakeTrainerParts:
    """What Trainer.maybe_resume touches, without building a model."""

    def __init__(self, save_dir, resume="auto"):
        from prism_megatron.config import CheckpointConfig

        self.checkpoint = CheckpointConfig(save_dir=str(save_dir), resume=resume)
        self.model = self.optimizer = self.scheduler = None
        self.skipped_steps = 0
        self.saving = True


def resume(save_dir, monkeypatch, fail=(), resume_mode="auto"):
    from prism_megatron import trainer as trainer_mod

    loaded = []

    def fake_load(path, *args, **kwargs):
        loaded.append(Path(path).name)
        if Path(path).name in fail:
            raise AttributeError("'NoneType' object has no attribute 'get'")   # megatron's
        return {"step": int(Path(path).name.split("_")[1]), "skipped_steps": 1}

    monkeypatch.setattr(trainer_mod, "load_checkpoint", fake_load)
    parts = FakeTrainerParts(save_dir, resume_mode)
    state = trainer_mod.Trainer.maybe_resume(parts)
    return state, loaded


def test_a_checkpoint_that_fails_to_load_falls_back_and_none_loading_is_one_line(
        tmp_path, world, monkeypatch):
    from prism_megatron.checkpoint import CheckpointError

    for step in (1, 2, 3):
        save(tmp_path, step)
    (tmp_path / "step_0000000.tmp").mkdir()
    state, loaded = resume(tmp_path, monkeypatch, fail={"step_0000003"})
    assert state["step"] == 2 and loaded == ["step_0000003", "step_0000002"]
    assert not (tmp_path / "step_0000000.tmp").exists()      # stale .tmp removed at start
    with pytest.raises(CheckpointError) as info:
        resume(tmp_path, monkeypatch, fail={"step_0000001", "step_0000002", "step_0000003"})
    message = str(info.value)
    assert message.startswith(f"no checkpoint in {tmp_path} could be loaded: step_0000003: ")
    assert "\n" not in message and "step_0000001: AttributeError" in message


def test_a_directory_of_only_broken_checkpoints_is_refused_unless_resume_never(
        tmp_path, world, monkeypatch):
    from prism_megatron.checkpoint import CheckpointError

    for step in (1, 2):
        save(tmp_path, step)
        (tmp_path / f"step_{step:07d}" / ".metadata").unlink()
    with pytest.raises(CheckpointError) as info:
        resume(tmp_path, monkeypatch)
    assert str(info.value) == (
        f"{tmp_path} holds 2 step directories and none is a complete checkpoint "
        "(step_0000002: .metadata is missing; step_0000001: .metadata is missing); set "
        "checkpoint.resume=never to start from step 0, or move them away")
    for mode in ("never", "none"):
        assert resume(tmp_path, monkeypatch, resume_mode=mode) == ({}, [])
    assert resume(tmp_path / "empty", monkeypatch) == ({}, [])     # nothing there: step 0
    with pytest.raises(CheckpointError, match="checkpoint.resume=.*step_0000002: not a complete"):
        resume(tmp_path, monkeypatch, resume_mode=str(tmp_path / "step_0000002"))
