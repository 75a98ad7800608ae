"""The MoE discriminator in one process (CPU, fp32): upcycling identity, HF export parity,
segment routing, batch invariance of scores, scoring API, configuration errors."""

import pytest
import torch

from prism_megatron.config import ConfigError
from prism_megatron.models.discriminator.routing import CAPTION, REASONING


@pytest.fixture(scope="module")
def megatron_1proc():
    from prism_megatron.distributed import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=1, ep=1, seed=1234)
    yield
    destroy_distributed()


@pytest.fixture(scope="module")
def assets(megatron_1proc, tiny_model_dir, synthetic_data_dir, tmp_path_factory):
    """Two upcycled checkpoints (identity: no noise, uniform router; default: noise 0.01, router
    N(0, 0.02), with an HF export), the processor and a few pairs."""
    from prism_megatron.data.encode import load_processor
    from prism_megatron.data.pairs import load_pairs, write_synthetic_pairs
    from prism_megatron.convert.upcycle import upcycle

    root = tmp_path_factory.mktemp("disc")
    quiet = lambda *a: None  # noqa: E731
    identity = upcycle(tiny_model_dir, root / "identity", noise_std=0.0, router_std=0.0,
                       progress=False, log=quiet)
    assert identity["tensors"]["fresh"] == 4 + 1   # 4 routers + value head
    upcycle(tiny_model_dir, root / "noisy", noise_std=0.01, export_hf=True, progress=False, log=quiet)
    # The dense-discriminator ablation: one expert (the dense MLP), top-1; its router is kept
    # random, since the one expert gets probability 1 whatever the logits.
    upcycle(tiny_model_dir, root / "identity_1x1", num_experts=1, top_k=1, noise_std=0.0,
            progress=False, log=quiet)
    # Top-1 of 4 identical experts, random router: the dense MLP only if the routed expert's
    # weight is 1 (renormalised top-1, as HF), not its softmax probability.
    upcycle(tiny_model_dir, root / "identity_4x1", num_experts=4, top_k=1, noise_std=0.0,
            progress=False, log=quiet)
    processor = load_processor(tiny_model_dir)
    paths = write_synthetic_pairs(synthetic_data_dir, root / "pairs")
    pairs, _ = load_pairs([str(paths["heldout"])], processor)
    return {"root": root, "processor": processor, "pairs": pairs[:4], "hf_dir": tiny_model_dir}


def load(assets, name="noisy", routing="learned"):
    from prism_megatron.models.discriminator.model import (
        build_discriminator_from_config, load_discriminator, read_info)

    hf, info = read_info(assets["root"] / name)
    model, _ = build_discriminator_from_config(hf, num_experts=info["num_experts"],
                                               top_k=info["top_k"], expert_routing=routing,
                                               padded_vocab_size=info["padded_vocab_size"])
    load_discriminator(model, assets["root"] / name)
    return model.eval()


def batch_of(assets, seqs, model, length=None):
    from prism_megatron.data.segments import collate_sequences

    return collate_sequences(seqs, pad_id=assets["processor"].tokenizer.pad_token_id,
                             position_fn=model.position_fn, length=length)


def run(model, batch):
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                 attention_mask=batch["attention_mask"], kind=batch["kind"],
                 valid_tokens=batch["valid_tokens"], pixel_values=batch.get("pixel_values"),
                 image_grid_thw=batch.get("image_grid_thw"))


def sequences(assets, kinds=(CAPTION, REASONING)):
    from prism_megatron.data.segments import pair_sequences

    out = []
    for pair in assets["pairs"]:
        seqs = pair_sequences(pair.prompt, pair.teacher, pair.student)
        out += [seqs[(role, kind)] for role in ("teacher", "student") for kind in kinds]
    return out


def final_hidden(model, call):
    """The text decoder's output (after the final norm), [S, B, H]."""
    captured = []
    handle = model.language_model.decoder.register_forward_hook(
        lambda mod, inp, out: captured.append(out.detach()))
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    return captured[0]


@pytest.mark.parametrize("name,routing", [("identity", "learned"), ("identity_1x1", "learned"),
                                          ("identity_4x1", "segment")])
def test_upcycling_with_zero_noise_and_uniform_router_reproduces_the_dense_model(assets, name,
                                                                                  routing):
    """Every expert = the dense MLP and equal router logits: the top-2 mix of identical experts
    is the dense MLP, so the MoE hidden states equal the dense model's (spec §3.1). With one
    expert (top-1, random router: the dense-discriminator ablation) and with top-1 of 4 in
    segment mode likewise; the scores are the value head on the dense model's hidden states."""
    from prism_megatron.convert.upcycle import build_dense_from_hf

    _, _, dense = build_dense_from_hf(assets["hf_dir"])
    disc = load(assets, name, routing)
    seqs = sequences(assets)[:6]
    batch = batch_of(assets, seqs, disc)
    with torch.no_grad():
        values = run(disc, batch)                            # [B, S]
    moe = final_hidden(disc, lambda: run(disc, batch))
    ref = final_hidden(dense.eval(), lambda: dense(
        batch["input_ids"], batch["position_ids"], batch["attention_mask"],
        pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]))
    valid = batch["valid_tokens"].t()                        # [S, B]
    assert (moe - ref)[valid].abs().max().item() < 1e-5
    assert ref[valid].abs().max().item() > 0.1               # not trivially zero
    with torch.no_grad():
        dense_values = disc.v_head(ref).transpose(0, 1)      # [B, S]
    valid = batch["valid_tokens"]
    assert (values - dense_values)[valid].abs().max().item() < 1e-5
    assert values[valid].std().item() > 1e-3                 # the value head is not constant


def test_noisy_experts_are_independent_and_reproducible(assets):
    from prism_megatron.convert.upcycle import build_dense_from_hf

    _, _, dense = build_dense_from_hf(assets["hf_dir"])
    dense_fc1 = dense.state_dict()["language_model.decoder.layers.1.mlp.linear_fc1.weight"]
    state = load(assets).state_dict()
    experts = [state[f"language_model.decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc1.weight"]
               for e in range(4)]
    noise = [e - dense_fc1 for e in experts]
    for i, n in enumerate(noise):
        assert abs(n.std().item() - 0.01) < 0.001 and abs(n.mean().item()) < 0.001
        for m in noise[i + 1:]:
            assert torch.corrcoef(torch.stack([n.flatten(), m.flatten()]))[0, 1].abs() < 0.05
    assert torch.equal(load(assets).state_dict()["v_head.1.weight"], state["v_head.1.weight"])


def test_hf_export_matches_transformers_qwen3_vl_moe(assets):
    """The exported safetensors load into transformers' Qwen3VLMoeForConditionalGeneration (only
    the LM head missing) and give the same final hidden states and value-head scores."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    disc = load(assets)
    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(
        assets["root"] / "noisy" / "hf", dtype=torch.float32).eval()
    from safetensors.torch import load_file

    v_head = load_file(str(assets["root"] / "noisy" / "hf" / "model.safetensors"))["v_head.1.weight"]
    seq = sequences(assets)[1]
    batch = batch_of(assets, [seq], disc)
    ours = final_hidden(disc, lambda: run(disc, batch))[:, 0]
    with torch.no_grad():
        theirs = hf.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                          image_grid_thw=batch["image_grid_thw"],
                          mm_token_type_ids=(batch["input_ids"] == hf.config.image_token_id).int(),
                          ).last_hidden_state[0]
        score = run(disc, batch)[0, -1]
    assert (ours - theirs).abs().max().item() < 1e-4
    assert torch.allclose(score, theirs[-1] @ v_head[0], atol=1e-5)


@pytest.mark.parametrize("routing", ["learned", "segment"])
def test_segment_routing_restricts_each_pass_to_its_half_of_the_experts(assets, routing):
    disc = load(assets, routing=routing)
    seqs = sequences(assets)
    with torch.no_grad():
        run(disc, batch_of(assets, seqs, disc))
    load_ = disc.take_load()                                     # [layers, 2, E]
    tokens = sum(len(s.input_ids) for s in seqs)
    assert load_.sum().item() == tokens * 2 * disc.config.num_layers       # top-2, padding excluded
    if routing == "segment":
        assert load_[:, CAPTION, 2:].sum() == 0 and load_[:, REASONING, :2].sum() == 0
        assert (load_[:, CAPTION, :2] > 0).all() and (load_[:, REASONING, 2:] > 0).all()
    else:
        assert (load_.sum((0, 1)) > 0).all()                      # every expert used somewhere
        assert load_[:, CAPTION, 2:].sum() > 0 and load_[:, REASONING, :2].sum() > 0


@pytest.mark.parametrize("routing", ["learned", "segment"])
def test_scores_do_not_depend_on_batch_composition_or_padding(assets, routing):
    from prism_megatron.rl.scoring import read_scores

    disc = load(assets, routing=routing)
    seqs = sequences(assets)
    with torch.no_grad():
        alone = [read_scores(run(disc, b := batch_of(assets, [s], disc)), b["score_index"]).item()
                 for s in seqs[:3]]
        longest = max(len(s.input_ids) for s in seqs)
        mixed = [seqs[5], seqs[2], seqs[7], seqs[0], seqs[9], seqs[1]]
        batch = batch_of(assets, mixed, disc, length=longest + 13)
        together = read_scores(run(disc, batch), batch["score_index"])
    for i, position in ((0, 3), (1, 5), (2, 1)):
        assert together[position].item() == pytest.approx(alone[i], abs=1e-5)


def test_scorer_reads_closing_tags_and_zeroes_invalid_responses(assets):
    from prism_megatron.rl.scoring import read_scores
    from prism_megatron.rl.scoring import Scorer

    disc = load(assets)
    tok = assets["processor"].tokenizer
    pair = assets["pairs"][0]
    good = "<caption>A grid.</caption>\n<think>2 + 2 = 4.</think>\n<answer>4</answer>"
    responses = [tok(t + tok.eos_token, add_special_tokens=False)["input_ids"]
                 for t in (good, good + " extra", good)]
    scorer = Scorer(disc, tok.pad_token_id, max_rows=2)
    out = scorer.score_responses([pair.prompt] * 3, responses, tok)
    assert out.format_valid.tolist() == [True, False, True]
    assert out.caption[1] == 0 and out.reasoning[1] == 0
    assert out.caption[0] != 0 and out.caption[0] == pytest.approx(out.caption[2].item(), abs=1e-6)
    from prism_megatron.data.segments import build_sequence

    assert out.segments[0].valid
    seq = build_sequence(pair.prompt, out.segments[0].reasoning, REASONING)
    with torch.no_grad():
        batch = batch_of(assets, [seq], disc)
        expected = read_scores(run(disc, batch), batch["score_index"]).item()
    assert out.reasoning[0].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_experts=4, top_k=2, routing="learned", tp=1, ep=3), "ep=3 must divide"),
    (dict(num_experts=3, top_k=1, routing="segment", tp=1, ep=1), "must be even"),
    (dict(num_experts=4, top_k=3, routing="segment", tp=1, ep=1), "top_k=3 must be <= "),
    (dict(num_experts=4, top_k=2, routing="random", tp=1, ep=1), "expert_routing"),
    (dict(num_experts=4, top_k=5, routing="learned", tp=1, ep=1), "top_k <= num_experts"),
])
def test_bad_moe_layouts_are_refused_with_the_fix(kwargs, message):
    from prism_megatron.models.discriminator.model import check_moe_layout

    routing = kwargs.pop("routing")
    with pytest.raises(ConfigError, match=message):
        check_moe_layout(routing=routing, **kwargs)


def test_masked_switch_loss_matches_megatron_and_ignores_padding():
    """Learned mode, no padding: megatron's Switch load-balancing loss. Padding tokens change
    nothing; segment mode balances each segment type within its own half (1 when balanced)."""
    from megatron.core.transformer.moe.moe_utils import switch_load_balancing_loss_func

    from prism_megatron.models.discriminator.routing import allowed_experts, switch_aux_loss

    torch.manual_seed(0)
    logits = torch.randn(40, 4)
    scores = torch.softmax(logits, -1)
    routing_map = torch.zeros(40, 4, dtype=torch.bool).scatter(1, logits.topk(2).indices, True)
    segment = torch.randint(0, 2, (40,))
    valid = torch.ones(40, dtype=torch.bool)
    ours = switch_aux_loss(scores, routing_map, segment, valid, allowed_experts("learned", 4), 2)
    theirs = switch_load_balancing_loss_func(scores, routing_map.sum(0), 40, 2, 4, 1.0)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    padded = switch_aux_loss(torch.cat([scores, torch.rand(7, 4)]),
                             torch.cat([routing_map, torch.ones(7, 4, dtype=torch.bool)]),
                             torch.cat([segment, torch.zeros(7, dtype=torch.long)]),
                             torch.cat([valid, torch.zeros(7, dtype=torch.bool)]),
                             allowed_experts("learned", 4), 2)
    assert padded.item() == pytest.approx(ours.item(), rel=1e-6)
    half = torch.tensor([[1, 1, 0, 0]] * 20 + [[0, 0, 1, 1]] * 20, dtype=torch.bool)
    balanced = switch_aux_loss(half.float() / 2, half, torch.tensor([0] * 20 + [1] * 20), valid,
                               allowed_experts("segment", 4), 2)
    assert balanced.item() == pytest.approx(1.0)


def test_upcycle_tool_refuses_a_non_empty_output_and_bad_layouts(tmp_path, capsys):
    import importlib.util

    from dist_utils import REPO
    from prism_megatron.convert.cli import run_cli

    spec = importlib.util.spec_from_file_location("upcycle_tool", REPO / "tools" / "upcycle_discriminator.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert run_cli(tool.main, ["--hf-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "not empty (pass --force" in capsys.readouterr().err
    assert run_cli(tool.main, ["--hf-dir", str(tmp_path), "--out", str(tmp_path / "new"),
                               "--num-experts", "4", "--ep", "3"]) == 2
    assert "ep=3 must divide num_experts=4" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
