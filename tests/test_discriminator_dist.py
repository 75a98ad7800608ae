"""The discriminator on two and four processes (gloo): expert parallelism, tensor parallelism
(with the sequence parallelism megatron's MoE layers need at TP > 1) and both together reproduce
EP1/TP1, and a rank without valid pairs does not deadlock the warm-up step."""

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


@pytest.fixture(scope="module")
def tp_assets(dist_assets, tiny_model_dir):
    """TP2 (2 processes, DP1) and TP2 x EP2 (4 processes, DP2) beside the EP1/EP2 runs; the
    4-process run also takes the two warm-up Trainer steps of ``nodeadlock``."""
    root, _ = dist_assets
    args = ["--ckpt", root / "disc", "--hf", tiny_model_dir, "--pairs", root / "pairs" /
            "pairs_heldout.jsonl"]
    run_torchrun(WORKER, 2, "ep", *args, "--tp", 2, "--out", root / "tp2")
    run_torchrun(WORKER, 4, "ep,nodeadlock", *args, "--tp", 2, "--ep", 2, "--out", root / "tp2ep2")
    return root


def merged(files, routing):
    """Scores in data-parallel order (from the TP rank 0 of each DP rank), gradients of all ranks
    (each already the full TP1 tensor), expert loads summed over DP."""
    runs = [torch.load(f)[routing] for f in files]
    heads = sorted((r for r in runs if r["tp_rank"] == 0), key=lambda r: r["dp_rank"])
    grads = {}
    for r in runs:
        grads.update(r["grads"])
    return torch.cat([r["scores"] for r in heads]), grads, sum(r["load"] for r in heads)


@pytest.mark.slow  # multi-process (torchrun)
@pytest.mark.dist
@pytest.mark.parametrize("layout,nproc", [("tp2", 2), ("tp2ep2", 4)])
@pytest.mark.parametrize("routing", ["learned", "segment", "learned-allgather"])
def test_tensor_parallel_forward_backward_matches_tp1(dist_assets, tp_assets, layout, nproc,
                                                      routing):
    """Sequence-parallel text decoder, TP-sharded experts (ETP = TP): the scores, every gradient
    (TP shards gathered, sequence-parallel partial sums reduced as finalize_model_grads does) and
    the expert loads equal the EP1/TP1 run within 1e-5."""
    root = tp_assets
    ep1 = torch.load(root / "ep1.rank0.pt")[routing]
    scores, grads, load = merged([root / f"{layout}.rank{r}.pt" for r in range(nproc)], routing)
    assert (scores - ep1["scores"]).abs().max().item() < 1e-5
    assert set(grads) == set(ep1["grads"])
    for name, grad in ep1["grads"].items():
        assert (grads[name] - grad).abs().max().item() < 1e-5, name
    assert torch.equal(load, ep1["load"])


@pytest.mark.slow  # multi-process (torchrun)
@pytest.mark.dist
def test_tensor_parallel_warmup_steps_match_tp1(dist_assets, tp_assets):
    """Two warm-up Trainer steps (pairwise loss, megatron's finalize_model_grads and optimizer) at
    TP2 x EP2 x DP2 give the EP2 x DP2 losses and gradient norms."""
    _, ep2 = dist_assets
    tp = [json.loads((tp_assets / f"tp2ep2.nodeadlock.rank{r}.json").read_text()) for r in range(4)]
    for case in ("rank0_without_valid_pairs", "no_valid_pairs_anywhere"):
        want = ep2[0][case]
        for line in tp:
            assert line[case]["loss"] == pytest.approx(want["loss"], abs=1e-5)
            assert line[case]["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
