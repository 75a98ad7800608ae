"""megatron-core on CPU/gloo: the patches, the parallel layout checks, TP/PP parity."""

import json

import pytest

from dist_utils import REPO, run_torchrun
from prism_megatron.distributed import ParallelConfigError, check_layout

WORKER = REPO / "tests" / "dist" / "gpt_parallel.py"


def test_apply_all_is_idempotent_and_redirects_megatron_only():
    import torch

    import megatron_patches
    from megatron.core.tensor_parallel import layers

    megatron_patches.apply_all(force=True)
    assert megatron_patches.apply_all(force=True) == []
    assert layers.torch.cuda.current_device() == "cpu"
    assert layers.torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.cuda.current_device is not layers.torch.cuda.current_device  # global torch untouched


def test_cpu_rng_tracker_forks_without_disturbing_default_stream():
    import torch

    import megatron_patches
    from megatron.core.tensor_parallel import random as mp_random

    megatron_patches.apply_all(force=True)
    tracker = mp_random.CudaRNGStatesTracker()
    tracker.add("model-parallel", 99)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("model-parallel"):
        forked = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)  # default stream resumes where it was
    assert torch.equal(forked, torch.rand(3, generator=torch.Generator().manual_seed(99)))


@pytest.mark.parametrize("world,tp,pp,ep,message", [
    (2, 4, 1, 1, r"not divisible by tp\*pp"),
    (4, 1, 1, 3, "expert parallel size 3"),
    (2, 0, 1, 1, "must be >= 1"),
])
def test_bad_layouts_name_the_problem(world, tp, pp, ep, message):
    with pytest.raises(ParallelConfigError, match=message):
        check_layout(world, tp, pp, ep)


@pytest.mark.slow  # multi-process (torchrun)
@pytest.mark.dist
def test_gpt_trains_identically_at_tp1_tp2_pp2(tmp_path):
    """A tiny GPT trains 8 steps (megatron DDP + optimizer + pipeline schedule) from one
    dist checkpoint resharded to each layout; TP2 and PP2 follow the TP1 losses."""
    ckpt = tmp_path / "init"
    run_torchrun(WORKER, 1, "--ckpt", ckpt, "--init")
    runs = {}
    for nproc, tp, pp in [(1, 1, 1), (2, 2, 1), (2, 1, 2)]:
        out = run_torchrun(WORKER, nproc, "--ckpt", ckpt, "--tp", tp, "--pp", pp)
        runs[(tp, pp)] = json.loads(out.strip().splitlines()[-1])["losses"]
    reference = runs[(1, 1)]
    assert len(reference) == 8 and reference[-1] < reference[0] - 0.5  # it really trains
    for layout, losses in runs.items():
        assert losses == pytest.approx(reference, abs=1e-5), layout
