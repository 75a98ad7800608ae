"""HF <-> Megatron checkpoint conversion: rules by hand, round trips, tying, padding, errors.

In-process tests call the library (legacy format, fast); torch_dist and model loading run in
torchrun / subprocess workers under tests/dist/ because dist_checkpointing needs a process group.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dist_utils import REPO, run_torchrun
from prism_megatron.convert.cli import run_cli
from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron
from prism_megatron.weights.layout import padded_vocab_size
from prism_megatron.convert.megatron_to_hf import convert_megatron_to_hf
from prism_megatron.weights.rules import Dims, HeadLayout, gated_mlp, qkv, qkv_fused, vocab

PRESETS = ["tiny", "tiny-untied", "tiny-mrope", "tiny-qwenvocab"]
# (tp, pp, pp_layers): the four required layouts (an uneven split is added per preset).
BASE_LAYOUTS = [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None)]
WORKER = REPO / "tests" / "dist" / "convert_worker.py"


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TO_MEGATRON = _load_tool("convert_hf_to_megatron")
TO_HF = _load_tool("convert_megatron_to_hf")


def hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_bit_exact(a: dict, b: dict):
    assert sorted(a) == sorted(b), (set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        # Compare the bytes, not the values (NaN-safe, -0.0 vs 0.0 distinguished).
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


def rank_file(ckpt: Path, tp_rank: int, pp_rank: int, pp: int) -> dict:
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return torch.load(ckpt / "iter_0000000" / name / "model_optim_rng.pt", weights_only=True)


def cli(tool, argv, capsys) -> tuple[int, str]:
    code = run_cli(tool.main, [str(a) for a in argv] + ["--quiet"])
    return code, capsys.readouterr().err


def no_tmp_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def _copy_model(src: Path, dst: Path, edit=None, config_edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit:
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if config_edit:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# --- rules by hand ---------------------------------------------------------------------------

def _rows(prefix, n, width=2):
    """n rows whose values encode (prefix, row) so a row can be recognised after reordering."""
    return torch.tensor([[prefix * 100 + r] * width for r in range(n)], dtype=torch.float32)


def test_qkv_per_group_order_gqa_by_hand():
    # 4 query heads, 2 kv groups, head_dim 1: rows q0..q3, k0 k1, v0 v1.
    dims = Dims({"text": HeadLayout(4, 2, 1)}, vocab_size=0, padded_vocab_size=0)
    rule = qkv("x.linear_qkv.weight", "q", "k", "v", heads="text")
    q, k, v = _rows(1, 4), _rows(2, 2), _rows(3, 2)
    full = rule.to_megatron([q, k, v], dims)
    # group 0: q0 q1 k0 v0, group 1: q2 q3 k1 v1
    assert full[:, 0].tolist() == [100, 101, 200, 300, 102, 103, 201, 301]
    shards = rule.split(full, 2, dims)
    assert shards[0][:, 0].tolist() == [100, 101, 200, 300]
    assert shards[1][:, 0].tolist() == [102, 103, 201, 301]
    back = rule.to_hf(rule.merge(shards, dims), dims)
    assert all(torch.equal(x, y) for x, y in zip(back, [q, k, v]))


def test_qkv_per_group_order_head_dim_2_and_bias():
    dims = Dims({"text": HeadLayout(4, 2, 2)}, 0, 0)
    rule = qkv("x.linear_qkv.bias", "q", "k", "v")
    q, k, v = torch.arange(8.0), 100 + torch.arange(4.0), 200 + torch.arange(4.0)
    full = rule.to_megatron([q, k, v], dims)
    assert full.tolist() == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    assert [t.tolist() for t in rule.to_hf(full, dims)] == [q.tolist(), k.tolist(), v.tolist()]


def test_vision_fused_qkv_mha_by_hand():
    # HF vision qkv is [q; k; v] with 2 heads of dim 1; megatron MHA: per head q, k, v.
    dims = Dims({"vision": HeadLayout(2, 2, 1)}, 0, 0)
    rule = qkv_fused("v.linear_qkv.weight", "qkv", heads="vision")
    fused = torch.cat([_rows(1, 2), _rows(2, 2), _rows(3, 2)])
    full = rule.to_megatron([fused], dims)
    assert full[:, 0].tolist() == [100, 200, 300, 101, 201, 301]
    assert torch.equal(rule.to_hf(full, dims)[0], fused)


def test_gated_mlp_shard_layout_by_hand():
    rule = gated_mlp("x.linear_fc1.weight", "gate", "up")
    gate, up = _rows(1, 4), _rows(2, 4)
    full = rule.to_megatron([gate, up], None)
    assert full[:, 0].tolist() == [100, 101, 102, 103, 200, 201, 202, 203]
    shards = rule.split(full, 2, None)
    # Each TP rank holds [its gate rows; its up rows] (megatron chunks the local output in 2).
    assert shards[0][:, 0].tolist() == [100, 101, 200, 201]
    assert shards[1][:, 0].tolist() == [102, 103, 202, 203]
    assert torch.equal(rule.merge(shards, None), full)
    g, u = rule.to_hf(full, None)
    assert torch.equal(g, gate) and torch.equal(u, up)


def test_vocab_padding_zero_and_stripped():
    dims = Dims({}, vocab_size=5, padded_vocab_size=8)
    rule = vocab("e.weight", "emb")
    emb = torch.randn(5, 3)
    full = rule.to_megatron([emb], dims)
    assert full.shape == (8, 3) and torch.equal(full[5:], torch.zeros(3, 3))
    shards = rule.split(full, 2, dims)
    assert [s.shape[0] for s in shards] == [4, 4]
    assert torch.equal(rule.to_hf(rule.merge(shards, dims), dims)[0], emb)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_paths_equal_primitives(tp):
    """The one-copy ``shards``/``merge_to_hf`` the converters use agree with split(to_megatron)
    and to_hf(merge) for every rule kind, weights and biases."""
    from prism_megatron.weights.rules import column, replicated, row

    dims = Dims({"text": HeadLayout(8, 4, 3), "vision": HeadLayout(4, 4, 2)}, vocab_size=13,
                padded_vocab_size=16)
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    cases = [
        (replicated("a", "x"), [r(5)]),
        (column("a.weight", "x"), [r(8, 3)]),
        (column("a.bias", "x"), [r(8)]),
        (row("a.weight", "x"), [r(3, 8)]),
        (qkv("a.weight", "q", "k", "v"), [r(24, 5), r(12, 5), r(12, 5)]),
        (qkv("a.bias", "q", "k", "v"), [r(24), r(12), r(12)]),
        (qkv_fused("a.weight", "x", heads="vision"), [r(24, 5)]),
        (qkv_fused("a.bias", "x", heads="vision"), [r(24)]),
        (gated_mlp("a.weight", "g", "u"), [r(8, 5), r(8, 5)]),
        (vocab("a.weight", "x"), [r(13, 5)]),
    ]
    for rule, hf in cases:
        expected = rule.split(rule.to_megatron(hf, dims), tp, dims)
        got = rule.shards(hf, tp, dims)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), rule
        back = rule.merge_to_hf(got, dims)
        assert all(torch.equal(a, b) for a, b in zip(back, rule.to_hf(rule.merge(got, dims),
                                                                       dims))), rule
        assert all(torch.equal(a, b) for a, b in zip(back, hf)), rule


def test_padded_vocab_size_and_stage_splits():
    from prism_megatron.weights.errors import ConversionError
    from prism_megatron.weights.layout import padded_vocab_size, stage_layer_counts

    assert padded_vocab_size(151936, 1) == 151936 and padded_vocab_size(151936, 2) == 152064
    assert padded_vocab_size(200, 2) == 256
    assert stage_layer_counts(4, 2) == [2, 2]
    assert stage_layer_counts(4, 2, [1, 3]) == [1, 3]
    assert stage_layer_counts(7, 3, first=1) == [1, 3, 3]
    assert stage_layer_counts(8, 4, first=1, last=3) == [1, 2, 2, 3]
    for bad in (dict(num_layers=5, pp=2), dict(num_layers=4, pp=2, pp_layers=[2, 1]),
                dict(num_layers=4, pp=2, pp_layers=[0, 4]), dict(num_layers=1, pp=2),
                dict(num_layers=8, pp=4, pp_layers=[1, 2, 3, 2])):
        with pytest.raises(ConversionError):
            stage_layer_counts(**bad)



def test_vocab_padding_columns_of_a_shard():
    """The padding columns of a logits shard (weights.layout owns the rule): vocab 200 padded to
    256 at TP=2 -> rank 0 has none, rank 1 columns 200..255 (its local 72..127)."""
    from types import SimpleNamespace

    from prism_megatron.weights.layout import stage_layer_counts_of, vocab_padding

    assert vocab_padding(0, 128, 200) is None
    rank1 = vocab_padding(128, 128, 200)
    assert rank1.dtype == torch.bool and rank1.nonzero().flatten().tolist() == list(range(72, 128))
    whole = vocab_padding(0, 256, 200)
    assert int(whole.sum()) == 56 and bool(whole[200]) and not bool(whole[199])
    config = SimpleNamespace(num_layers=5, pipeline_model_parallel_size=3,
                             num_layers_in_first_pipeline_stage=1,
                             num_layers_in_last_pipeline_stage=None)
    assert stage_layer_counts_of(config) == [1, 2, 2]
    config.num_layers, config.pipeline_model_parallel_size = 4, 2
    config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage = 1, 3
    assert stage_layer_counts_of(config) == [1, 3]
    assert stage_layer_counts_of(SimpleNamespace(num_layers=4, pipeline_model_parallel_size=1)) == [4]

def test_mapping_covers_transformers_model(make_tiny_model):
    """Every parameter of transformers' Qwen3VLForConditionalGeneration is mapped exactly once,
    for every preset (tied presets without lm_head)."""
    from prism_megatron.convert.hf_io import load_hf_config
    from prism_megatron.convert.families import get_family
    from prism_megatron.weights.table import check_table_covers, expand, hf_reference_shapes

    for preset in PRESETS:
        config = load_hf_config(make_tiny_model(preset))
        family = get_family(config.model_type)
        info = family.describe(config)
        entries = expand(family.rules, info)
        check_table_covers(family, entries, info, hf_reference_shapes(family, config))
        megatron_names = [e.megatron for e in entries]
        assert len(megatron_names) == len(set(megatron_names))


# --- round trips (legacy, in process) ---------------------------------------------------------

def layouts_for(hf: Path):
    """The four required layouts, plus an uneven PP2 split where the preset has >= 3 layers
    (2-layer presets cannot be split unevenly over 2 stages)."""
    layers = json.loads((hf / "config.json").read_text())["text_config"]["num_hidden_layers"]
    extra = [(2, 2, [1, layers - 1])] if layers >= 3 else []
    return BASE_LAYOUTS + extra


def tag_of(tp, pp, pp_layers):
    return f"tp{tp}pp{pp}" + ("-" + "_".join(map(str, pp_layers)) if pp_layers else "")


@pytest.mark.parametrize("preset", PRESETS)
def test_legacy_round_trip_bit_exact(make_tiny_model, tmp_path, preset):
    hf = make_tiny_model(preset)
    original = hf_tensors(hf)
    for tp, pp, pp_layers in layouts_for(hf):
        tag = tag_of(tp, pp, pp_layers)
        mg, back = tmp_path / f"mg-{tag}", tmp_path / f"hf-{tag}"
        convert_hf_to_megatron(hf, mg, tp=tp, pp=pp, pp_layers=pp_layers, progress=False)
        convert_megatron_to_hf(mg, back, progress=False)
        assert_bit_exact(original, hf_tensors(back))
        assert json.loads((back / "config.json").read_text()) == json.loads(
            (hf / "config.json").read_text())


def test_legacy_round_trip_bf16(make_tiny_model, tmp_path):
    """Real Qwen3-VL checkpoints are bf16: dtypes are kept, bytes unchanged."""
    hf = _copy_model(make_tiny_model("tiny"), tmp_path / "hf",
                     edit=lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}),
                     config_edit=lambda c: c.update(dtype="bfloat16"))
    original = hf_tensors(hf)
    assert {t.dtype for t in original.values()} == {torch.bfloat16}
    convert_hf_to_megatron(hf, tmp_path / "mg", tp=2, pp=2, pp_layers=[3, 1], progress=False)
    assert rank_file(tmp_path / "mg", 1, 0, 2)["model"][
        "language_model.decoder.layers.0.mlp.linear_fc1.weight"].dtype == torch.bfloat16
    convert_megatron_to_hf(tmp_path / "mg", tmp_path / "back", progress=False)
    assert_bit_exact(original, hf_tensors(tmp_path / "back"))


def test_legacy_layout_local_layer_names_and_extra_state(make_tiny_model, tmp_path):
    hf = make_tiny_model("tiny")  # 4 text layers
    mg = tmp_path / "mg"
    convert_hf_to_megatron(hf, mg, tp=2, pp=2, pp_layers=[1, 3], progress=False)
    assert (mg / "latest_checkpointed_iteration.txt").read_text() == "0"
    first, last = rank_file(mg, 1, 0, 2), rank_file(mg, 1, 1, 2)
    assert first["checkpoint_version"] == 3.0 and first["iteration"] == 0
    layers = lambda sd: sorted({int(k.split(".")[3]) for k in sd["model"]  # noqa: E731
                                if k.startswith("language_model.decoder.layers.")})
    assert layers(first) == [0] and layers(last) == [0, 1, 2]  # stage-local numbering
    assert any(k.startswith("vision_model.") for k in first["model"])
    assert not any(k.startswith("vision_model.") for k in last["model"])
    assert "language_model.decoder.final_layernorm.weight" in last["model"]
    assert "language_model.embedding.word_embeddings.weight" in first["model"]
    assert first["model"]["language_model.decoder.layers.0.self_attention.linear_qkv._extra_state"] is None
    # HF layer 1 is the last stage's local layer 0.
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        down = f.get_tensor("model.language_model.layers.1.mlp.down_proj.weight")
    shard = last["model"]["language_model.decoder.layers.0.mlp.linear_fc2.weight"]
    assert torch.equal(shard, down.chunk(2, dim=1)[1])


def test_vocab_padding_rows_zero_in_checkpoint(make_tiny_model, tmp_path):
    hf = make_tiny_model("tiny-qwenvocab")  # 151936 rows -> 152064 at TP2
    mg = tmp_path / "mg"
    convert_hf_to_megatron(hf, mg, tp=2, progress=False)
    emb = [rank_file(mg, r, 0, 1)["model"]["language_model.embedding.word_embeddings.weight"]
           for r in range(2)]
    full = torch.cat(emb)
    assert full.shape[0] == 152064 and emb[0].shape[0] == 76032
    assert torch.count_nonzero(full[151936:]) == 0
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        assert torch.equal(full[:151936], f.get_tensor("model.language_model.embed_tokens.weight"))
    back = tmp_path / "hf"
    convert_megatron_to_hf(mg, back, progress=False)
    assert hf_tensors(back)["model.language_model.embed_tokens.weight"].shape[0] == 151936


# --- tied / untied embeddings ----------------------------------------------------------------

def test_tied_embeddings(make_tiny_model, tmp_path):
    hf = make_tiny_model("tiny")
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is True
    out_name = "language_model.output_layer.weight"
    emb_name = "language_model.embedding.word_embeddings.weight"
    mg1 = tmp_path / "pp1"
    convert_hf_to_megatron(hf, mg1, tp=2, pp=1, progress=False)
    sd = rank_file(mg1, 0, 0, 1)["model"]
    assert out_name not in sd  # PP=1: megatron uses the embedding itself
    assert "language_model.output_layer._extra_state" in sd
    mg2 = tmp_path / "pp2"
    convert_hf_to_megatron(hf, mg2, tp=2, pp=2, progress=False)
    for r in range(2):
        first, last = rank_file(mg2, r, 0, 2)["model"], rank_file(mg2, r, 1, 2)["model"]
        assert out_name not in first and emb_name not in last
        assert torch.equal(last[out_name], first[emb_name])  # the last stage's shared copy
    back = tmp_path / "hf"
    convert_megatron_to_hf(mg2, back, progress=False)
    assert "lm_head.weight" not in hf_tensors(back)


def test_untied_embeddings(make_tiny_model, tmp_path):
    hf = make_tiny_model("tiny-untied")
    original = hf_tensors(hf)
    assert "lm_head.weight" in original
    assert not torch.equal(original["lm_head.weight"],
                           original["model.language_model.embed_tokens.weight"])
    mg = tmp_path / "mg"
    convert_hf_to_megatron(hf, mg, tp=2, pp=2, progress=False)
    lm_head = original["lm_head.weight"]
    padded = torch.cat([lm_head, lm_head.new_zeros(padded_vocab_size(lm_head.shape[0], 2)
                                                   - lm_head.shape[0], lm_head.shape[1])])
    for r in range(2):
        assert "language_model.output_layer.weight" not in rank_file(mg, r, 0, 2)["model"]
        last = rank_file(mg, r, 1, 2)["model"]
        assert torch.equal(last["language_model.output_layer.weight"], padded.chunk(2)[r])
    back = tmp_path / "hf"
    convert_megatron_to_hf(mg, back, progress=False)
    assert torch.equal(hf_tensors(back)["lm_head.weight"], original["lm_head.weight"])


def test_export_accepts_transformer_engine_names(make_tiny_model, tmp_path):
    """A legacy checkpoint from the TE layer spec (norms fused into the next linear:
    ``linear_qkv.layer_norm_weight``/``_bias``, ``linear_fc1.layer_norm_weight``) exports the
    same HF tensors: the aliases are a rule attribute, not a second table."""
    hf = make_tiny_model("tiny")
    mg = tmp_path / "mg"
    convert_hf_to_megatron(hf, mg, tp=2, progress=False)
    renames = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
               "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    for r in range(2):
        path = mg / "iter_0000000" / f"mp_rank_{r:02d}" / "model_optim_rng.pt"
        payload = torch.load(path, weights_only=True)
        renamed = {}
        for k, v in payload["model"].items():
            for old, new in renames.items():
                k = k.replace(old, new)
            renamed[k] = v
        assert "vision_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_bias" in renamed
        payload["model"] = renamed
        torch.save(payload, path)
    convert_megatron_to_hf(mg, tmp_path / "hf", progress=False)
    assert_bit_exact(hf_tensors(hf), hf_tensors(tmp_path / "hf"))


def test_export_side_files_and_shards(make_tiny_model, tmp_path):
    hf = make_tiny_model("tiny")
    mg, back = tmp_path / "mg", tmp_path / "hf"
    convert_hf_to_megatron(hf, mg, progress=False)
    files = convert_megatron_to_hf(mg, back, hf_config_dir=hf, max_shard_size="1MB",
                                   progress=False)
    assert len(files) > 1
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "preprocessor_config.json", "generation_config.json", "config.json"):
        assert (back / name).is_file(), name
    assert_bit_exact(hf_tensors(hf), hf_tensors(back))
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(back)
    assert torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)


# --- CLI: errors, --force, atomic output -------------------------------------------------------

def test_cli_tp_must_divide_heads(make_tiny_model, tmp_path, capsys):
    hf = make_tiny_model("tiny")  # text 4 heads / 2 kv heads, vision 2 heads
    code, err = cli(TO_MEGATRON, ["--hf-dir", hf, "--out", tmp_path / "o", "--tp", "4"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "text_config has 2 key/value heads" in err
    assert "vision_config has 2 attention heads" in err
    code, err = cli(TO_MEGATRON, ["--hf-dir", hf, "--out", tmp_path / "o", "--tp", "3"], capsys)
    assert code == 2 and "text_config has 4 attention heads" in err
    assert not (tmp_path / "o").exists() and no_tmp_left(tmp_path)


def test_cli_layers_fewer_than_pp(make_tiny_model, tmp_path, capsys):
    hf = make_tiny_model("tiny-untied")  # 2 text layers
    code, err = cli(TO_MEGATRON, ["--hf-dir", hf, "--out", tmp_path / "o", "--pp", "3"], capsys)
    assert code == 2 and "2 decoder layers, fewer than pp=3" in err
    code, err = cli(TO_MEGATRON, ["--hf-dir", hf, "--out", tmp_path / "o", "--pp", "2",
                                  "--pp-layers", "2,1"], capsys)
    assert code == 2 and "pipeline split [2, 1]" in err


def test_cli_missing_and_unexpected_tensors(make_tiny_model, tmp_path, capsys):
    def edit(t):
        del t["model.language_model.layers.1.self_attn.k_proj.weight"]
        del t["model.visual.merger.linear_fc2.bias"]
        t["model.language_model.layers.1.self_attn.extra_proj.weight"] = torch.zeros(2)

    hf = _copy_model(make_tiny_model("tiny"), tmp_path / "hf", edit=edit)
    code, err = cli(TO_MEGATRON, ["--hf-dir", hf, "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert "missing tensors: model.language_model.layers.1.self_attn.k_proj.weight, " \
           "model.visual.merger.linear_fc2.bias" in err
    assert "unexpected tensors: model.language_model.layers.1.self_attn.extra_proj.weight" in err


def test_cli_shape_mismatch(make_tiny_model, tmp_path, capsys):
    def edit(t):
        name = "model.language_model.layers.0.self_attn.q_norm.weight"
        t[name] = torch.ones(t[name].shape[0] + 1)

    hf = _copy_model(make_tiny_model("tiny"), tmp_path / "hf", edit=edit)
    code, err = cli(TO_MEGATRON, ["--hf-dir", hf, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "shape mismatch" in err
    assert "model.language_model.layers.0.self_attn.q_norm.weight has shape (129,)" in err


def test_cli_unknown_model_type(make_tiny_model, tmp_path, capsys):
    hf = _copy_model(make_tiny_model("tiny"), tmp_path / "hf",
                     config_edit=lambda c: c.update(model_type="llama"))
    code, err = cli(TO_MEGATRON, ["--hf-dir", hf, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "unsupported model_type 'llama'" in err and "qwen3_vl" in err


def test_cli_export_missing_and_unexpected(make_tiny_model, tmp_path, capsys):
    hf = make_tiny_model("tiny-untied")
    mg = tmp_path / "mg"
    convert_hf_to_megatron(hf, mg, tp=2, pp=2, progress=False)
    path = mg / "iter_0000000" / "mp_rank_01_001" / "model_optim_rng.pt"
    payload = torch.load(path, weights_only=True)
    del payload["model"]["language_model.output_layer.weight"]
    payload["model"]["language_model.decoder.layers.0.mystery.weight"] = torch.zeros(1)
    torch.save(payload, path)
    code, err = cli(TO_HF, ["--megatron-dir", mg, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "language_model.output_layer.weight (pipeline stage 1, absent on tensor-parallel " \
           "rank(s) [1])" in err
    assert "missing tensors: language_model.output_layer.weight" in err
    assert "language_model.decoder.layers.0.mystery.weight (pipeline stage 1)" in err


def test_cli_force_and_atomic_output(make_tiny_model, tmp_path, capsys):
    hf = make_tiny_model("tiny-untied")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = cli(TO_MEGATRON, ["--hf-dir", hf, "--out", out], capsys)
    assert code == 2 and "--force" in err and (out / "keep.txt").read_text() == "precious"
    # A failing conversion (bad TP) with --force leaves the old output untouched.
    code, err = cli(TO_MEGATRON, ["--hf-dir", hf, "--out", out, "--tp", "3", "--force"], capsys)
    assert code == 2 and (out / "keep.txt").is_file() and no_tmp_left(tmp_path)
    code, err = cli(TO_MEGATRON, ["--hf-dir", hf, "--out", out, "--force"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "iter_0000000").is_dir()
    assert no_tmp_left(tmp_path)
    # Export refuses too, and an empty existing directory is fine.
    (tmp_path / "hf").mkdir()
    code, err = cli(TO_HF, ["--megatron-dir", out, "--out", tmp_path / "hf"], capsys)
    assert code == 0, err
    code, err = cli(TO_HF, ["--megatron-dir", out, "--out", tmp_path / "hf"], capsys)
    assert code == 2 and "--force" in err


def test_cli_subprocess_help_and_error(tmp_path):
    """The real entry points: --help works, and an error is one line, exit status 2."""
    for tool in ("convert_hf_to_megatron", "convert_megatron_to_hf", "verify_conversion"):
        proc = subprocess.run([sys.executable, str(REPO / "tools" / f"{tool}.py"), "--help"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "usage" in proc.stdout, proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"),
                           "--hf-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


# --- torch_dist, loading into the training model, logits parity (torchrun / subprocess) ------

@pytest.mark.slow  # multi-process (torchrun)
@pytest.mark.dist
def test_torch_dist_round_trip_bit_exact(make_tiny_model, tmp_path):
    """HF -> torch_dist -> HF for every preset and layout (plus a bf16 copy of ``tiny``), in one
    worker process."""
    bf16 = _copy_model(make_tiny_model("tiny"), tmp_path / "bf16",
                       edit=lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}),
                       config_edit=lambda c: c.update(dtype="bfloat16"))
    dirs = [make_tiny_model(p) for p in PRESETS] + [bf16]
    out = run_torchrun(WORKER, 1, "roundtrip", "--hf", ",".join(map(str, dirs)),
                       "--out", tmp_path)
    results = json.loads(out.strip().splitlines()[-1])
    expected = sum(len(layouts_for(d)) for d in dirs)
    assert len(results) == expected and all(v == "ok" for v in results.values()), results


@pytest.mark.slow  # multi-process (torchrun)
@pytest.mark.dist
def test_checkpoints_load_into_training_model_with_identical_logits(make_tiny_model, tmp_path):
    """Legacy TP1/TP2 and one torch_dist checkpoint (written for TP1: 151936 vocab rows, loaded
    at TP2 with 152064) give the training model identical logits at TP1 and TP2."""
    hf = make_tiny_model("tiny-qwenvocab")
    legacy1, legacy2, td = tmp_path / "legacy-tp1", tmp_path / "legacy-tp2", tmp_path / "td"
    convert_hf_to_megatron(hf, legacy1, tp=1, progress=False)
    convert_hf_to_megatron(hf, legacy2, tp=2, progress=False)
    # The real entry point (dist_checkpointing's writer starts a helper process: the script's
    # __main__ guard is part of what is tested).
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"),
                           "--hf-dir", str(hf), "--out", str(td), "--format", "torch_dist",
                           "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (td / "iter_0000000" / "metadata.json").is_file()
    logits = {}
    for tp, legacy in ((1, legacy1), (2, legacy2)):
        out = tmp_path / f"logits-tp{tp}.pt"
        save = ["--save-training-ckpt", tmp_path / "train"] if tp == 2 else []
        run_torchrun(WORKER, tp, "load", "--hf-dir", hf, "--tp", tp, "--ckpt", legacy,
                     "--ckpt", td, "--out", out, *save)
        got = torch.load(out, weights_only=True)
        assert got[str(legacy)][0] == "legacy" and got[str(td)][0] == "torch_dist"
        logits[tp] = got[str(legacy)][1], got[str(td)][1]
    for tp in (1, 2):
        assert torch.equal(*logits[tp]), tp  # same TP: bit-identical whatever the format
    assert logits[1][0].shape[-1] == 151936
    torch.testing.assert_close(logits[1][0], logits[2][0], rtol=0, atol=1e-5)
    # The TP2 worker also saved a training checkpoint (prism_megatron.checkpoint); it exports
    # back to the original HF weights.
    back = tmp_path / "hf-from-training-ckpt"
    convert_megatron_to_hf(tmp_path / "train", back, hf_config_dir=hf, progress=False)
    assert_bit_exact(hf_tensors(hf), hf_tensors(back))


def _json_line(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow  # multi-process (torchrun)
@pytest.mark.dist
def test_verify_conversion_tp2(make_tiny_model, tmp_path):
    """Untied (vocab-parallel lm_head), q width != hidden size, at TP2."""
    hf = make_tiny_model("tiny-untied")
    mg = tmp_path / "mg"
    convert_hf_to_megatron(hf, mg, tp=2, progress=False)
    tool = REPO / "tools" / "verify_conversion.py"
    result = _json_line(run_torchrun(tool, 2, "--hf-dir", hf, "--megatron-dir", mg, "--tp", 2))
    assert result["ok"] and result["max_abs_logit_diff"] <= 1e-4
    assert (result["tp"], result["pp"]) == (2, 1)
    assert set(result["cases"]) == {"text", "one_image", "two_images"}


@pytest.mark.slow  # multi-process (torchrun)
@pytest.mark.dist
def test_verify_conversion_pipeline_uneven_split_and_tolerance_gate(make_tiny_model, tmp_path):
    """PP2 with a 1/3 split of the tied model: DeepStack layers 0-1 cross the stage boundary and
    the last stage computes logits with the checkpoint's copy of the embedding. Run with an
    impossible --tol: the JSON line still reports the (small) difference and the tool exits
    non-zero."""
    hf = make_tiny_model("tiny")
    mg = tmp_path / "mg"
    convert_hf_to_megatron(hf, mg, tp=1, pp=2, pp_layers=[1, 3], progress=False)
    with pytest.raises(RuntimeError, match="failed with code 1") as failure:
        run_torchrun(REPO / "tools" / "verify_conversion.py", 2, "--hf-dir", hf,
                     "--megatron-dir", mg, "--tp", 1, "--pp", 2, "--tol", "1e-12")
    line = next(x for x in str(failure.value).splitlines() if x.startswith("{"))
    result = json.loads(line)
    assert not result["ok"] and result["max_abs_logit_diff"] <= 1e-4, result
    assert (result["tp"], result["pp"], result["pp_layers"]) == (1, 2, [1, 3])
