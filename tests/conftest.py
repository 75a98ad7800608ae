"""Shared pytest setup: offline Hugging Face, 2 torch threads, and session-cached tiny artefacts.

Fixtures for every test module:

* ``make_tiny_model(preset="tiny", seed=0) -> Path`` - session-scoped factory; builds a tiny Qwen3-VL
  directory (see prism_megatron.testing.tiny.PRESETS) once per (preset, seed) per session.
* ``tiny_model_dir -> Path`` - the default ``tiny`` preset, seed 0.
* ``make_synthetic_data(seed=0, **sizes) -> Path`` - session-scoped factory for the synthetic dataset
  (sizes: sft_public, sft_teacher, align, rl, test; unspecified ones use SMALL_DATA_SIZES).
* ``synthetic_data_dir -> Path`` - the dataset at SMALL_DATA_SIZES, seed 0.
* ``sft_policy`` - the demo's SFT recipe (100 steps) trained once per session: the starting point
  of the RL-stage tests (``.model``, ``.data``, ``.megatron``, ``.ckpt``, ``.run``).

The returned directories are shared by the whole session: treat them as read-only (copy first).
"""

from __future__ import annotations

import os

# Before anything imports transformers / huggingface_hub: never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

SMALL_DATA_SIZES = {"sft_public": 64, "sft_teacher": 32, "align": 16, "rl": 32, "test": 16}


def _quiet(*_args, **_kwargs) -> None:
    pass


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory):
    """Factory ``make_tiny_model(preset="tiny", seed=0) -> Path`` with a per-session cache."""
    from prism_megatron.testing.tiny import write_tiny_model

    cache: dict[tuple[str, int], Path] = {}

    def make(preset: str = "tiny", seed: int = 0) -> Path:
        key = (preset, seed)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{preset}-seed{seed}")
            cache[key] = write_tiny_model(root / "model", preset=preset, seed=seed, log=_quiet)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(make_tiny_model) -> Path:
    """The default demo model (preset ``tiny``, seed 0), built once per session."""
    return make_tiny_model("tiny", 0)


@pytest.fixture(scope="session")
def make_synthetic_data(tmp_path_factory):
    """Factory ``make_synthetic_data(seed=0, **sizes) -> Path`` with a per-session cache."""
    from prism_megatron.data.synthetic import write_dataset

    cache: dict[tuple, Path] = {}

    def make(seed: int = 0, **sizes: int) -> Path:
        sizes = {**SMALL_DATA_SIZES, **sizes}
        key = (seed, tuple(sorted(sizes.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"synthetic-seed{seed}")
            write_dataset(out, seed, sizes, log=_quiet)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def synthetic_data_dir(make_synthetic_data) -> Path:
    """A small synthetic dataset (SMALL_DATA_SIZES rows per split, seed 0), built once per session."""
    return make_synthetic_data(0)


@pytest.fixture(scope="session")
def sft_policy(make_tiny_model, make_synthetic_data, tmp_path_factory):
    """100 steps of the demo's SFT recipe (tiny model, synthetic task), with held-out accuracy
    before/after in ``run/metrics.jsonl``; the checkpoint is in ``ckpt``."""
    from types import SimpleNamespace

    import yaml

    from dist_utils import run_torchrun
    from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("sft-policy")
    model = make_tiny_model("tiny", 0)
    from prism_megatron.data.synthetic import DEFAULT_SIZES

    data = make_synthetic_data(0, **DEFAULT_SIZES)   # = `make demo`'s data and SFT run
    megatron = root / "megatron"
    convert_hf_to_megatron(model, megatron, fmt="torch_dist", progress=False)
    cfg = {"seed": 0, "train_steps": 100,
           "model": {"hf_dir": str(model), "megatron_dir": str(megatron)},
           "optimizer": {"lr": 3e-3, "warmup_ratio": 0.05},
           "data": {"train_files": [str(data / "sft_public.jsonl"), str(data / "sft_teacher.jsonl")],
                    "eval_files": [str(data / "test.jsonl")], "max_prompt_length": 512,
                    "max_response_length": 256, "global_batch_size": 16, "micro_batch_size": 8},
           "eval": {"max_new_tokens": 160, "limit": 64},
           "checkpoint": {"save_dir": str(root / "ckpt"), "save_interval": 100, "keep_last": 1},
           "logging": {"run_dir": str(root / "run"), "tensorboard": False, "plots": False}}
    (root / "sft.yaml").write_text(yaml.safe_dump(cfg))
    run_torchrun("-m", 1, "prism_megatron.cli", "sft", root / "sft.yaml", timeout=1500)
    return SimpleNamespace(model=model, data=data, megatron=megatron, ckpt=root / "ckpt",
                           run=root / "run")


@pytest.fixture(scope="session")
def sft_assets(make_tiny_model, make_synthetic_data, tmp_path_factory):
    from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron

    model = make_tiny_model("tiny", 0)
    data = make_synthetic_data(0)
    megatron = tmp_path_factory.mktemp("sft-assets") / "megatron"
    convert_hf_to_megatron(model, megatron, tp=1, pp=1, fmt="torch_dist")
    return model, data, megatron


@pytest.fixture(scope="session")
def rl_assets(make_tiny_model, make_synthetic_data, tmp_path_factory):
    """(HF dir, synthetic data dir, Megatron checkpoint) of the random tiny model: what the RL
    stage tests start from (they need no trained policy)."""
    from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron

    model = make_tiny_model("tiny", 0)
    data = make_synthetic_data(0)
    megatron = tmp_path_factory.mktemp("rl-assets") / "megatron"
    convert_hf_to_megatron(model, megatron, fmt="torch_dist", progress=False)
    return model, data, megatron
