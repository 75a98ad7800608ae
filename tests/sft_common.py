"""The small SFT run the SFT and resilience tests share: one config writer (the converted tiny
model comes from the session fixture ``sft_assets`` in conftest.py)."""

from __future__ import annotations

import yaml

def write_config(tmp_path, assets, train_steps: int, **sections) -> str:
    """``tmp_path/sft.yaml``; ``sections`` update a section (dict) or set a top-level key."""
    model, data, megatron = assets
    cfg = {
        "seed": 0, "train_steps": train_steps,
        "model": {"hf_dir": str(model), "megatron_dir": str(megatron)},
        "optimizer": {"lr": 2e-3, "warmup_ratio": 0.1},
        "data": {"train_files": [str(data / "sft_teacher.jsonl")], "max_prompt_length": 512,
                 "max_response_length": 128, "global_batch_size": 8, "micro_batch_size": 2},
        "checkpoint": {"save_dir": str(tmp_path / "ckpt"), "save_interval": 100},
        "logging": {"run_dir": str(tmp_path / "run"), "tensorboard": False, "plots": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values) if isinstance(values, dict) else cfg.update(
            {section: values})
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)
