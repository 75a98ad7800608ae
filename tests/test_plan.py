"""`prism plan`: exact parameter counts (= converted checkpoints, every tiny preset, per TP/PP rank),
activation bytes against what autograd keeps in the tiny model on CPU, published shapes against
transformers, and a configuration that cannot fit refused (CLI exit 2, check_fits raises)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from prism_megatron import plan as P
from prism_megatron.cli import main as prism_main
from prism_megatron.config import load_config

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["tiny", "tiny-untied", "tiny-mrope", "tiny-qwenvocab"]
ACTIVATION_TOL = 0.01      # estimate vs measured saved-tensor bytes (measured: < 0.5%)


def _rank_numel(ckpt: Path, tp_rank: int, pp_rank: int, pp: int) -> int:
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    sd = torch.load(ckpt / "iter_0000000" / name / "model_optim_rng.pt", weights_only=True)
    return sum(t.numel() for k, t in sd["model"].items()
               if isinstance(t, torch.Tensor) and not k.endswith("_extra_state"))


@pytest.mark.parametrize("preset", PRESETS)
def test_parameter_counts_equal_the_converted_checkpoint(preset, make_tiny_model, tmp_path):
    from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron

    hf_dir = make_tiny_model(preset)
    shape = P.read_shape(hf_dir)
    convert_hf_to_megatron(hf_dir, tmp_path / "tp1", tp=1, pp=1, progress=False)
    assert _rank_numel(tmp_path / "tp1", 0, 0, 1) == P.model_params(shape)
    # every rank of a TP2 x PP2 layout: the per-GPU counts the memory plan uses
    convert_hf_to_megatron(hf_dir, tmp_path / "tp2pp2", tp=2, pp=2, progress=False)
    for tp_rank in range(2):
        for pp_rank in range(2):
            assert _rank_numel(tmp_path / "tp2pp2", tp_rank, pp_rank, 2) == \
                P.stage_params(shape, tp=2, pp=2, pp_rank=pp_rank).total, (tp_rank, pp_rank)
    hf_numel = sum(t.numel() for t in _hf_tensors(hf_dir).values())
    assert P.hf_params(shape) == hf_numel


def _hf_tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name", ["qwen3-vl-2b", "qwen3-vl-8b"])   # tied, untied
def test_published_shapes_match_transformers(name):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = json.loads(json.dumps(P.PUBLISHED_SHAPES[name]))
    config = Qwen3VLConfig(text_config=cfg["text_config"], vision_config=cfg["vision_config"],
                           tie_word_embeddings=cfg["tie_word_embeddings"])
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    numel = sum(p.numel() for p in model.parameters())
    assert P.hf_params(P.read_shape(name)) == numel
    assert numel == {"qwen3-vl-2b": 2_127_532_032, "qwen3-vl-8b": 8_767_123_696}[name]


@pytest.fixture(scope="module")
def megatron_1proc():
    from prism_megatron.distributed import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=1, ep=1, seed=1234)
    yield
    destroy_distributed()


def test_discriminator_parameter_count(megatron_1proc, tiny_model_dir, tmp_path):
    from prism_megatron.models.discriminator.model import build_discriminator, read_info
    from prism_megatron.convert.upcycle import upcycle

    upcycle(tiny_model_dir, tmp_path / "disc", num_experts=4, top_k=2, progress=False,
            log=lambda *a: None)
    disc_cfg = SimpleNamespace(num_experts=4, top_k=2, expert_routing="learned",
                               value_head_dropout=0.0, dispatcher="alltoall")
    model, _ = build_discriminator(tmp_path / "disc", disc_cfg)
    built = sum(p.numel() for p in model.parameters())
    shape = P.read_shape(tmp_path / "disc")          # reads disc/hf_config/config.json
    assert P.model_params(shape, num_experts=4, lm_head=False) == built
    per_ep2 = P.stage_params(shape, num_experts=4, ep=2, lm_head=False)
    layer = P.text_layer_params(shape, num_experts=4)
    assert per_ep2.expert == layer.expert // 2 * shape.layers
    assert read_info(tmp_path / "disc")[1]["num_experts"] == 4


def _measure_saved_bytes(model, seq: int, batch: int) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one forward with labels
    (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    ids = torch.randint(0, 500, (batch, seq))
    positions = torch.arange(seq)[None, None].expand(3, batch, seq)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, position_ids=positions, attention_mask=None, labels=ids)
    return sum(n for ptr, n in seen.items() if ptr not in params)


@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
def test_activation_estimate_matches_measured_tiny_model(megatron_1proc, tiny_model_dir,
                                                         recompute):
    from prism_megatron.models.qwen3_vl.model import build_qwen3vl_model

    model_cfg = SimpleNamespace(hf_dir=str(tiny_model_dir), spec="local", dtype="fp32",
                                recompute=recompute != "none", recompute_granularity=recompute
                                if recompute != "none" else "full")
    model, _ = build_qwen3vl_model(model_cfg)
    model.train()
    shape = P.read_shape(tiny_model_dir)
    for seq, batch in ((256, 1), (128, 2)):
        measured = _measure_saved_bytes(model, seq, batch)
        a = P.ActivationSpec(seq, batch, 4, recompute=recompute)
        layers = P.text_activation_bytes(shape, a, shape.layers)
        if recompute == "full":   # the one recomputed layer is live only during its backward
            layers -= P.layer_activation_bytes(shape, P.ActivationSpec(seq, batch, 4))
        estimate = layers + P.head_activation_bytes(shape, a)
        assert abs(estimate - measured) <= ACTIVATION_TOL * measured, (seq, batch, estimate,
                                                                       measured)


def _plan_cli(capsys, *argv) -> tuple[int, dict, str]:
    code = prism_main(["plan", *map(str, argv)])
    out = capsys.readouterr()
    return code, json.loads(out.out.strip().splitlines()[-1]), out.err


def test_plan_cli_prints_the_table_and_one_json_line(capsys):
    code, plan, _ = _plan_cli(capsys, REPO / "examples/qwen3vl_8b/sft.yaml", "--shape",
                              "qwen3-vl-8b", "--gpus-per-node", 8, "--gpu-memory", 80)
    assert code == 0 and plan["fits"] is True and plan["stage"] == "sft"
    assert plan["params"]["policy"] == 8_767_123_696
    assert plan["layout"] == {"tp": 4, "pp": 1, "dp": 2}
    # bf16 weights of a TP4 shard: (vision + embedding + lm head) on every rank / 4 + norms
    assert plan["per_gpu_gb"]["policy weights"] == pytest.approx(4.39, abs=0.01)
    assert plan["largest"][0] == "policy optimizer"


def test_a_config_that_cannot_fit_is_refused(capsys):
    code, plan, err = _plan_cli(capsys, REPO / "examples/qwen3vl_8b/sft.yaml", "parallel.tp=1",
                                "parallel.distributed_optimizer=false", "model.recompute=false",
                                "--shape", "qwen3-vl-8b", "--gpus-per-node", 8)
    assert code == 2 and plan["fits"] is False
    # 8.77e9 params x (2 weights + 4 grads + 12 optimizer) bytes alone exceed 80 GB
    assert plan["per_gpu_gb"]["policy optimizer"] == pytest.approx(105.21, abs=0.01)
    assert err.startswith("prism plan: error: sft does not fit: ")
    assert "largest: policy optimizer, policy activations (s=10240, b=1), policy grads" in err
    cfg = load_config(REPO / "examples/qwen3vl_8b/sft.yaml", ["parallel.tp=1"])
    cfg.model.hf_dir = ""
    with pytest.raises(P.MemoryPlanError, match="has no config.json"):
        P.check_fits(cfg, "sft", gpu_memory_gb=80.0, gpus_per_node=8, nodes=1)


def test_check_fits_refuses_at_start_up(make_tiny_model):
    cfg = load_config(REPO / "examples/tiny/sft.yaml",
                      [f"model.hf_dir={make_tiny_model('tiny')}", "data.max_response_length=4096"])
    assert P.check_fits(cfg, "sft", gpu_memory_gb=80.0, gpus_per_node=1, nodes=1).fits
    with pytest.raises(P.MemoryPlanError, match=r"^sft: the memory plan needs .* GB per GPU "
                       r"\(train phase; largest: policy activations"):
        P.check_fits(cfg, "sft", gpu_memory_gb=4.0, gpus_per_node=1, nodes=1)
    assert P.check_fits(cfg, "sft") is None or torch.cuda.is_available()   # CPU: nothing to check


@pytest.mark.parametrize("size", ["4b", "8b"])
def test_example_alignment_configs_fit_8x80(capsys, size):
    code, plan, _ = _plan_cli(capsys, REPO / f"examples/qwen3vl_{size}/align.yaml", "--shape",
                              f"qwen3-vl-{size}", "--disc-shape", "qwen3-vl-2b")
    assert code == 0 and plan["fits"] is True and plan["peak_phase"] == "rollout"
    assert set(plan["phase_gb"]) == {"policy_train", "disc_train", "rollout"}
    assert plan["params"]["discriminator"] == 5_298_657_280
    if size == "8b":   # optimizer states offloaded to host memory
        assert plan["per_gpu_gb"]["policy optimizer"] == 0.0
        assert plan["cpu_gb"]["policy optimizer (offloaded)"] == pytest.approx(13.15, abs=0.01)


def test_an_sglang_fraction_that_cannot_hold_the_weights_is_refused(capsys):
    code, plan, err = _plan_cli(capsys, REPO / "examples/qwen3vl_8b/align.yaml", "--shape",
                                "qwen3-vl-8b", "--disc-shape", "qwen3-vl-2b",
                                "rollout.sglang_mem_fraction=0.2")
    assert code == 2 and plan["fits"] is False and plan["layout"]["sglang_kv_tokens"] == 0
    assert plan["infeasible"] == ["rollout.sglang_mem_fraction=0.2 x 80 GB does not hold the "
                                  "17.5 GB of bf16 weights"]
    assert err.startswith("prism plan: error: align does not fit: rollout.sglang_mem_fraction=0.2")


def test_vision_activation_estimate_matches_measured(megatron_1proc, tiny_model_dir):
    from prism_megatron.models.qwen3_vl.config import load_hf_config
    from prism_megatron.models.qwen3_vl.model import build_qwen3vl_model

    model, _ = build_qwen3vl_model(SimpleNamespace(hf_dir=str(tiny_model_dir), spec="local",
                                                   dtype="fp32", recompute=False))
    model.train()
    hf = load_hf_config(tiny_model_dir)
    shape = P.read_shape(tiny_model_dir)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for side in (8, 12):
        patches = side * side
        seen, where = {}, ["other"]

        def pack(t):
            seen.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(),
                                                             where[0]))
            return t

        hooks = []
        for layer in model.vision_model.decoder.layers:
            hooks.append(layer.register_forward_pre_hook(lambda *a: where.__setitem__(0, "vit")))
            hooks.append(layer.register_forward_hook(lambda *a: where.__setitem__(0, "other")))
        ids = torch.tensor([[hf.vision_start_token_id] + [hf.image_token_id] * (patches // 4)
                            + [hf.vision_end_token_id] + list(range(10, 40))])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, pixel_values=torch.randn(patches, 3 * 2 * 16 * 16),
                  image_grid_thw=torch.tensor([[1, side, side]]), labels=ids)
        for h in hooks:
            h.remove()
        measured = sum(n for ptr, (n, w) in seen.items() if w == "vit" and ptr not in params)
        estimate = P.vision_activation_bytes(shape, patches, P.ActivationSpec(0, 1, 4))
        assert estimate == measured, (side, estimate, measured)
