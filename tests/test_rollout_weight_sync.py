"""Trainer -> engine weight sync (prism_megatron.rollout.weight_sync).

Unit tests use a stand-in trainer (Megatron-named parameters built through the conversion
mapping, no process group); the torchrun test uses the real Megatron Qwen3-VL at TP1 (with two
data-parallel replicas), TP2 and PP2 and compares the engine's log-probs with the trainer's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))

from dist_utils import run_torchrun  # noqa: E402
from rollout_common import fake_megatron_model, sharpen_model  # noqa: E402

from prism_megatron.rollout import RolloutError  # noqa: E402
from prism_megatron.rollout.local import LocalEngine  # noqa: E402
from prism_megatron.rollout.weight_sync import iter_buckets, iter_hf_tensors, sync_weights  # noqa: E402

WORKER = Path(__file__).parent / "dist" / "rollout_weight_sync.py"


def _hf_weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.parametrize("preset", ["tiny", "tiny-untied"])
def test_stream_is_the_hf_checkpoint(make_tiny_model, preset):
    """Megatron names -> HF names through the mapping: exactly the checkpoint, bit for bit."""
    model_dir = make_tiny_model(preset, 0)
    trainer, config = fake_megatron_model(model_dir)
    streamed = dict(iter_hf_tensors(trainer, config))
    reference = _hf_weights(model_dir)
    assert sorted(streamed) == sorted(reference)
    assert all(torch.equal(streamed[k], reference[k]) for k in reference)
    assert ("lm_head.weight" in streamed) == (preset == "tiny-untied")


def test_buckets_are_bounded():
    tensors = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 20, 5, 100, 1, 1])]
    buckets = list(iter_buckets(tensors, 30 * 4))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]


def test_model_and_mapping_mismatch_is_a_clear_error(make_tiny_model):
    trainer, config = fake_megatron_model(make_tiny_model("tiny", 0))
    trainer.language_model.register_parameter("surprise", torch.nn.Parameter(torch.zeros(2)))
    with pytest.raises(RolloutError, match="does not export.*language_model.surprise"):
        list(iter_hf_tensors(trainer, config))
    del trainer.language_model.surprise
    del trainer.language_model.decoder.final_layernorm
    with pytest.raises(RolloutError, match="lacks 1 mapped parameter.*final_layernorm.weight"):
        list(iter_hf_tensors(trainer, config))


def test_sync_to_engine_by_tensors_and_disk(make_tiny_model, tmp_path):
    a, b = make_tiny_model("tiny", 0), make_tiny_model("tiny", 1)
    trainer, config = fake_megatron_model(b)
    reference = _hf_weights(b)
    for mode in ("tensor", "disk"):
        engine = LocalEngine(a)
        stats = sync_weights(trainer, engine, config, bucket_mb=0.5, mode=mode,
                             disk_dir=tmp_path / "sync", hf_dir=b)
        state = engine.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in reference.items()), mode
        assert stats.tensors == len(reference) and stats.max_bucket_bytes <= 0.5 * 2**20
    # the disk form is a complete HF directory
    from transformers import Qwen3VLForConditionalGeneration

    loaded = Qwen3VLForConditionalGeneration.from_pretrained(str(tmp_path / "sync"))
    assert torch.equal(loaded.lm_head.weight, reference["model.language_model.embed_tokens.weight"])
    with pytest.raises(RolloutError, match="needs the engine"):
        sync_weights(trainer, None, config)


@pytest.mark.slow  # multi-process (torchrun)
@pytest.mark.dist
def test_megatron_trainer_to_engine_tp_pp(make_tiny_model, tmp_path):
    """After a sync from the Megatron trainer (B) the engine (was A) samples with log-probs equal
    to the trainer's recomputed ones (fp32, 1e-4); before the sync they differ."""
    a = sharpen_model(make_tiny_model("tiny", 0), tmp_path / "a", factor=4.0)
    b = sharpen_model(make_tiny_model("tiny", 1), tmp_path / "b", factor=4.0)
    out = tmp_path / "result.json"
    run_torchrun(WORKER, 2, "--engine-hf", a, "--policy-hf", b, "--out", out,
                 "--layouts", "1x1:tensor,2x1:tensor,1x2:disk", timeout=600)
    results = json.loads(out.read_text())
    for layout in ("1x1", "2x1", "1x2"):
        r = results[layout]
        assert r["before"] > 1e-2, (layout, r)
        assert r["after"] < 1e-4, (layout, r)
        assert r["tensors"] == len(_hf_weights(b)) and r["buckets"] > 10
