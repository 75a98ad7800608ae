"""The discriminator on two processes (gloo): expert parallelism reproduces EP1, and a rank
without valid pairs does not deadlock the warm-up step."""

import json

import pytest
import torch

from dist_utils import REPO, run_torchrun

WORKER = REPO / "tests" / "dist" / "disc_worker.py"


@pytest.fixture(scope="module")
def dist_assets(tiny_model_dir, synthetic_data_dir, tmp_path_factory):
    from prism_megatron.data.pairs import write_synthetic_pairs
    from prism_megatron.convert.upcycle import upcycle

    root = tmp_path_factory.mktemp("disc-dist")
    pairs = write_synthetic_pairs(synthetic_data_dir, root / "pairs")
    upcycle(tiny_model_dir, root / "disc", noise_std=0.01, progress=False, log=lambda *a: None)
    args = ["--ckpt", root / "disc", "--hf", tiny_model_dir, "--pairs", pairs["heldout"]]
    run_torchrun(WORKER, 1, "ep", *args, "--ep", 1, "--out", root / "ep1")
    run_torchrun(WORKER, 2, "ep,nodeadlock", *args, "--ep", 2, "--out", root / "ep2")
    return root, [json.loads((root / f"ep2.nodeadlock.rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow  # multi-process (torchrun)
@pytest.mark.dist
@pytest.mark.parametrize("routing", ["learned", "segment", "learned-allgather"])
def test_expert_parallel_forward_backward_matches_ep1(dist_assets, routing):
    """Same checkpoint, same 16 sequences (each EP2 rank one half, EP1 both halves as two
    micro-batches), loss = weighted sum of scores + the load-balancing loss: scores, every
    gradient (experts by global index) and the expert loads agree, with megatron's alltoall and
    allgather token dispatchers."""
    root, _ = dist_assets
    ep1 = torch.load(root / "ep1.rank0.pt")[routing]
    ranks = [torch.load(root / f"ep2.rank{r}.pt")[routing] for r in (0, 1)]
    scores = torch.cat([r["scores"] for r in ranks])
    assert (scores - ep1["scores"]).abs().max().item() < 1e-5
    grads = {**ranks[1]["grads"], **ranks[0]["grads"]}
    assert set(grads) == set(ep1["grads"])
    assert any("local_experts.3." in name for name in ranks[1]["grads"])   # rank 1 holds experts 2, 3
    for name, grad in ep1["grads"].items():
        assert (grads[name] - grad).abs().max().item() < 1e-5, name
    assert torch.equal(ranks[0]["load"] + ranks[1]["load"], ep1["load"])
    if routing == "segment":
        assert ep1["load"][:, 0, 2:].sum() == 0 and ep1["load"][:, 1, :2].sum() == 0


@pytest.mark.slow  # multi-process (torchrun)
@pytest.mark.dist
def test_rank_without_valid_pairs_does_not_deadlock(dist_assets):
    _, lines = dist_assets
    assert len(lines) == 2
    r0, r1 = (line["rank0_without_valid_pairs"] for line in lines)
    assert (r0["valid_local"], r1["valid_local"]) == (0, 2)
    assert r0["valid_global"] == r1["valid_global"] == 2 and r0["pairs"] == 2
    assert r0["loss"] == r1["loss"] > 0 and r0["grad_norm"] == r1["grad_norm"] > 0
    f0, f1 = (line["no_valid_pairs_anywhere"] for line in lines)
    assert f0["valid_global"] == f1["valid_global"] == 0          # fallback branch on both ranks
    assert f0["loss"] == f1["loss"] > 0 and f0["grad_norm"] == f1["grad_norm"] > 0
