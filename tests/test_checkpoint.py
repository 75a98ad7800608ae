"""Resumable dist checkpoints: bit-exact resume, resharding across TP/DP, atomic save, keep-last."""

import json

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


def test_latest_marker_only_names_complete_checkpoints(tmp_path):
    from prism_megatron.checkpoint import find_latest, step_dir

    assert find_latest(tmp_path) is None
    step_dir(tmp_path, 4).mkdir()
    (tmp_path / "step_0000008.tmp").mkdir()        # a save killed half-way
    (tmp_path / "latest").write_text("step_0000004\n")
    assert find_latest(tmp_path) == step_dir(tmp_path, 4)
    (tmp_path / "latest").write_text("step_0000009\n")  # names a directory that is gone
    assert find_latest(tmp_path) is None
