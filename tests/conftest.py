"""Shared pytest setup: offline Hugging Face, 2 torch threads, and session-cached tiny artefacts.

Fixtures for every test module:

* ``make_tiny_model(preset="tiny", seed=0) -> Path`` - session-scoped factory; builds a tiny Qwen3-VL
  directory (see prism_megatron.models.qwen3_vl.tiny.PRESETS) once per (preset, seed) per session.
* ``tiny_model_dir -> Path`` - the default ``tiny`` preset, seed 0.
* ``make_synthetic_data(seed=0, **sizes) -> Path`` - session-scoped factory for the synthetic dataset
  (sizes: sft_public, sft_teacher, align, rl, test; unspecified ones use SMALL_DATA_SIZES).
* ``synthetic_data_dir -> Path`` - the dataset at SMALL_DATA_SIZES, seed 0.

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
    from prism_megatron.models.qwen3_vl.tiny import write_tiny_model

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
