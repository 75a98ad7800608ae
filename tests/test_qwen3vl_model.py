"""Qwen3-VL on megatron-core against transformers' Qwen3VLForConditionalGeneration (CPU, fp32).

In-process at TP1/PP1; torchrun workers (tests/dist/qwen3vl_parallel.py) at TP2, PP2 (even, uneven
and DeepStack-crossing splits) and TP2xPP2. Inputs hold no image, one image, or two images of
different sizes (plus a third in a second row).
"""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import REPO, run_torchrun

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import qwen3vl_common as C  # noqa: E402

WORKER = REPO / "tests" / "dist" / "qwen3vl_parallel.py"
PRESETS = ("tiny", "tiny-untied", "tiny-mrope")
LOGIT_TOL = 1e-4
GRAD_TOL = 1e-4  # max |grad diff| relative to the parameter's max |grad|


@pytest.fixture(scope="module")
def megatron_tp1():
    from prism_megatron.distributed import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=1, seed=1234)
    yield
    destroy_distributed()


def build(hf_dir, **kwargs):
    from prism_megatron.models.qwen3_vl.model import build_qwen3vl_model

    model, config = build_qwen3vl_model(hf_dir, **kwargs)
    return model, config


def loaded(hf_dir, **kwargs):
    hf_model = C.load_hf_model(hf_dir)
    model, _ = build(hf_dir, **kwargs)
    C.load_hf_weights(model, hf_model)
    return hf_model, model.eval()


def forward(model, inputs, **kwargs):
    return model(inputs["input_ids"], pixel_values=inputs.get("pixel_values"),
                 image_grid_thw=inputs.get("image_grid_thw"), **kwargs)


def grad_errors(model, hf_model, inputs):
    """{megatron name: max |grad diff| / max |grad|} after one backward of the mean LM loss."""
    hf_model.zero_grad()
    C.hf_forward(hf_model, inputs, labels=inputs["input_ids"]).loss.backward()
    want = C.hf_to_megatron({n: p.grad for n, p in hf_model.named_parameters()}, hf_model.config)
    want = C.shard_for_rank(want, tp=1, tp_rank=0, layer_offset=0, num_local_layers=10 ** 6,
                            pre_process=True, post_process=True,
                            padded_vocab=model.padded_vocab_size,
                            tied=bool(hf_model.config.tie_word_embeddings))
    model.zero_grad()
    labels, loss_mask = C.next_token_labels(inputs["input_ids"])
    per_token = forward(model, inputs, labels=labels)
    ((per_token * loss_mask).sum() / loss_mask.sum()).backward()
    return {n: ((p.grad - want[n]).abs().max() / want[n].abs().max().clamp(min=1e-12)).item()
            for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------ TP1 / PP1

@pytest.mark.parametrize("preset", PRESETS)
def test_logits_match_transformers(megatron_tp1, make_tiny_model, preset):
    hf_model, model = loaded(make_tiny_model(preset))
    vocab = hf_model.config.text_config.vocab_size
    for case in ("none", "one", "two"):
        inputs = C.make_inputs(hf_model.config, case)
        with torch.no_grad():
            got, want = forward(model, inputs), C.hf_forward(hf_model, inputs).logits
        assert got.shape == want.shape == (*inputs["input_ids"].shape, vocab)
        assert (got - want).abs().max().item() <= LOGIT_TOL, case


def test_padded_batch_with_hf_attention_mask(megatron_tp1, make_tiny_model):
    """Left padding via a [B, S] mask; position ids computed inside (rope index with the mask)."""
    hf_model, model = loaded(make_tiny_model("tiny"))
    inputs = C.make_inputs(hf_model.config, "two")
    mask = torch.ones_like(inputs["input_ids"])
    mask[1, :3] = 0  # row 1 starts with 3 padding tokens (its image follows them)
    inputs["input_ids"][1, :3] = hf_model.config.text_config.pad_token_id
    with torch.no_grad():
        got = forward(model, inputs, attention_mask=mask)
        want = C.hf_forward(hf_model, {**inputs, "attention_mask": mask}).logits
    valid = mask.bool()
    assert (got[valid] - want[valid]).abs().max().item() <= LOGIT_TOL


@pytest.mark.parametrize("preset", ("tiny", "tiny-untied"))
def test_gradients_match_transformers(megatron_tp1, make_tiny_model, preset):
    hf_model, model = loaded(make_tiny_model(preset))
    errors = grad_errors(model, hf_model, C.make_inputs(hf_model.config, "two"))
    for name in ("vision_model.patch_embed.proj.weight", "vision_model.deepstack_mergers.0.linear_fc1.weight",
                 "language_model.decoder.layers.0.self_attention.linear_qkv.weight",
                 "language_model.embedding.word_embeddings.weight"):
        assert name in errors
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_TOL, (worst, errors[worst])


def test_activation_recompute_keeps_gradients(megatron_tp1, make_tiny_model):
    hf_model, model = loaded(make_tiny_model("tiny"), recompute=True)
    model.train()
    errors = grad_errors(model, hf_model, C.make_inputs(hf_model.config, "two"))
    assert max(errors.values()) <= GRAD_TOL


def test_bf16_runs_close_to_fp32(megatron_tp1, make_tiny_model):
    hf_model, model = loaded(make_tiny_model("tiny-mrope"), dtype="bf16")
    assert model.language_model.embedding.word_embeddings.weight.dtype == torch.bfloat16
    inputs = C.make_inputs(hf_model.config, "two")
    with torch.no_grad():
        got, want = forward(model, inputs), C.hf_forward(hf_model, inputs).logits
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max().item() < 0.05


def test_state_dict_names_follow_the_contract(megatron_tp1, make_tiny_model):
    for preset, tied in (("tiny", True), ("tiny-untied", False)):
        hf_dir = make_tiny_model(preset)
        model, _ = build(hf_dir)
        names = {k for k in model.state_dict() if not k.endswith("_extra_state")}
        for name in ("vision_model.patch_embed.proj.weight", "vision_model.pos_embed.weight",
                     "vision_model.decoder.layers.0.input_layernorm.bias",
                     "vision_model.decoder.layers.0.self_attention.linear_qkv.bias",
                     "vision_model.decoder.layers.0.mlp.linear_fc2.bias",
                     "vision_model.merger.norm.weight", "vision_model.deepstack_mergers.0.linear_fc1.bias",
                     "language_model.embedding.word_embeddings.weight",
                     "language_model.decoder.layers.0.self_attention.q_layernorm.weight",
                     "language_model.decoder.layers.0.self_attention.k_layernorm.weight",
                     "language_model.decoder.layers.0.pre_mlp_layernorm.weight",
                     "language_model.decoder.layers.0.mlp.linear_fc1.weight",
                     "language_model.decoder.final_layernorm.weight"):
            assert name in names, name
        assert ("language_model.output_layer.weight" in names) is not tied
        vocab = model.hf_config.text_config.vocab_size
        rows = model.state_dict()["language_model.embedding.word_embeddings.weight"].shape[0]
        assert rows == model.padded_vocab_size and rows % 128 == 0 and rows >= vocab


def test_dist_checkpoint_round_trip(megatron_tp1, make_tiny_model, tmp_path):
    """sharded_state_dict: TE-style norm names, layers stacked with global indices; save and load
    into a freshly initialised model gives the same logits."""
    from megatron.core import dist_checkpointing

    hf_model, model = loaded(make_tiny_model("tiny"))
    keys = {t.key for t in model.sharded_state_dict().values()}
    assert "language_model.decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "vision_model.decoder.layers.mlp.linear_fc1.layer_norm_bias" in keys
    assert "vision_model.deepstack_mergers.1.linear_fc2.weight" in keys
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path), sharded_strategy=("torch_dist", 1))
    fresh, _ = build(make_tiny_model("tiny"))
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path)))
    inputs = C.make_inputs(hf_model.config, "two")
    with torch.no_grad():
        assert torch.equal(forward(fresh.eval(), inputs), forward(model, inputs))


# ------------------------------------------------------------------------------ clear errors

def test_transformer_engine_spec_needs_transformer_engine(megatron_tp1, make_tiny_model):
    from prism_megatron.models.qwen3_vl.specs import get_backend, te_available

    if te_available():
        pytest.skip("Transformer Engine is installed")
    with pytest.raises(ImportError, match="pip install -r requirements-gpu.txt"):
        get_backend("transformer_engine")
    with pytest.raises(ImportError, match="requirements-gpu.txt"):
        build(make_tiny_model("tiny"), spec="transformer_engine")


def test_unsupported_layouts_fail_with_a_clear_message(make_tiny_model):
    from prism_megatron.models.qwen3_vl.config import (
        Qwen3VLConfigError, load_hf_config, text_transformer_config, vision_transformer_config)

    hf = load_hf_config(make_tiny_model("tiny"))  # 4 text layers, 4/2 heads, 2 vision heads
    with pytest.raises(Qwen3VLConfigError, match="sum to the model's 4"):
        text_transformer_config(hf, pp=2, pp_layers=[1, 2])
    seven = copy.deepcopy(hf)
    seven.text_config.num_hidden_layers = 7
    with pytest.raises(Qwen3VLConfigError, match="middle stages"):
        text_transformer_config(seven, pp=4, pp_layers=[1, 1, 3, 2])
    with pytest.raises(Qwen3VLConfigError, match="fewer than pp=8"):
        text_transformer_config(hf, pp=8)
    with pytest.raises(Qwen3VLConfigError, match="do not split evenly"):
        text_transformer_config(hf, pp=3)
    with pytest.raises(Qwen3VLConfigError, match="tp=8 does not divide the text"):
        text_transformer_config(hf, tp=8)
    with pytest.raises(Qwen3VLConfigError, match="tp=4 does not divide the vision"):
        vision_transformer_config(hf, tp=4)
    with pytest.raises(Qwen3VLConfigError, match="transformer_engine"):
        text_transformer_config(hf, fp8="e4m3")
    uneven = text_transformer_config(hf, pp=2, pp_layers=[1, 3])
    assert (uneven.num_layers_in_first_pipeline_stage, uneven.num_layers_in_last_pipeline_stage) == (1, 3)


def test_config_comes_from_the_checkpoint(make_tiny_model):
    from prism_megatron.models.qwen3_vl.config import (
        load_hf_config, text_transformer_config, tie_word_embeddings, vision_transformer_config)

    hf = load_hf_config(make_tiny_model("tiny-untied"))
    text = text_transformer_config(hf, spec="local")
    assert (text.num_layers, text.hidden_size, text.kv_channels, text.num_query_groups) == (2, 96, 32, 2)
    assert text.mrope_section == [6, 5, 5] and text.qk_layernorm and not text.add_bias_linear
    assert text.params_dtype == torch.float32 and text.use_cpu_initialization
    vision = vision_transformer_config(hf)
    assert vision.num_layers == 2 and vision.add_bias_linear and vision.normalization == "LayerNorm"
    assert tie_word_embeddings(hf) is False and tie_word_embeddings(load_hf_config(make_tiny_model("tiny")))
    fp8 = text_transformer_config(hf, spec="transformer_engine", fp8="hybrid", fp8_recipe="tensorwise")
    assert (fp8.fp8, fp8.fp8_recipe) == ("hybrid", "tensorwise")


# ------------------------------------------------------------------------------ TP / PP

LAYOUTS = {
    # (tp, pp): models ("@" = uneven pipeline split). tiny@1,3 and tiny-mrope at PP2 put a
    # DeepStack layer on the second stage (the features travel with the hidden states).
    (2, 1): ("tiny", "tiny-mrope"),
    (1, 2): ("tiny@1,3", "tiny-mrope", "tiny-untied"),
    (2, 2): ("tiny-mrope", "tiny", "tiny-untied"),
}


@pytest.mark.slow  # multi-process (torchrun)
@pytest.mark.dist
@pytest.mark.parametrize("tp,pp", sorted(LAYOUTS))
def test_parallel_layouts_match_transformers(make_tiny_model, megatron_tp1, tmp_path, tp, pp):
    args = ["--tp", tp, "--pp", pp]
    for spec in LAYOUTS[(tp, pp)]:
        preset, _, split = spec.partition("@")
        args += ["--model", f"{preset}={make_tiny_model(preset)}" + (f"@{split}" if split else "")]
    ckpt = tmp_path / "ckpt"
    out = run_torchrun(WORKER, tp * pp, *args, "--save-ckpt", ckpt, timeout=600)
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    rows = [row for rank in result["ranks"] for row in rank]
    assert {row["model"].split("@")[0] for row in rows} == {s.split("@")[0] for s in LAYOUTS[(tp, pp)]}
    for row in rows:
        for case in ("none", "one", "two", "vocab_parallel"):
            if row.get(case) is not None:
                assert row[case] <= LOGIT_TOL, (row["model"], case, row[case])
        assert row["grad_rel"] <= GRAD_TOL, (row["model"], row["grad_rel"])
    if pp > 1:
        assert any(row["carry_deepstack"] for row in rows)
        assert sum("none" in row for row in rows) == len(LAYOUTS[(tp, pp)]) * tp  # last stage
    # The first model, saved at this layout, loads (resharded) into a TP1/PP1 model.
    first = LAYOUTS[(tp, pp)][0].split("@")[0]
    from megatron.core import dist_checkpointing

    hf_model = C.load_hf_model(make_tiny_model(first))
    model, _ = build(make_tiny_model(first))
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(ckpt)))
    inputs = C.make_inputs(hf_model.config, "two")
    with torch.no_grad():
        diff = (forward(model.eval(), inputs) - C.hf_forward(hf_model, inputs).logits).abs().max()
    assert diff.item() <= LOGIT_TOL
