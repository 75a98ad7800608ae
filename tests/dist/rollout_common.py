"""Helpers shared by the rollout tests (tests/test_rollout_*.py) and their torchrun worker.

Random tiny checkpoints have nearly flat logits: greedy decoding repeats one token, which would
let wrong positions or caches go unnoticed. ``sharpen_model`` scales every matrix by 10, which
makes greedy outputs varied and sensitive to every input position.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from prism_megatron.testing.prompts import (  # noqa: F401 (the tests import them from here)
    encoded_prompts, grid_image, prompt_specs)


def sharpen_model(src: Path, dst: Path, factor: float = 10.0) -> Path:
    """Copy an HF dir with every 2-D weight multiplied by ``factor``."""
    from safetensors.torch import load_file, save_file

    if dst.exists():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    weights = load_file(str(tmp / "model.safetensors"))
    weights = {k: (v * factor if v.dim() == 2 else v).contiguous() for k, v in weights.items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(dst)
    return dst


def hf_inputs(model, input_ids: torch.Tensor, enc) -> dict:
    """transformers kwargs for ``input_ids [1, S]`` of a prompt encoded as ``enc``."""
    kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if enc.pixel_values is not None:
        kwargs.update(pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw,
                      mm_token_type_ids=(input_ids == model.config.image_token_id).int())
    return kwargs


@torch.no_grad()
def hf_greedy(model, enc, max_new_tokens: int) -> list[int]:
    ids = enc.input_ids[None]
    out = model.generate(**hf_inputs(model, ids, enc), max_new_tokens=max_new_tokens,
                         do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def teacher_forced_logprobs(model, enc, response: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) at the response tokens, from one fresh full forward."""
    full = torch.cat([enc.input_ids, torch.tensor(response, dtype=torch.long)])[None]
    logits = model(**hf_inputs(model, full, enc)).logits[0].float()
    prompt_len = enc.input_ids.shape[0]
    logp = torch.log_softmax(logits[prompt_len - 1:-1] / (temperature or 1.0), dim=-1)
    return logp.gather(1, torch.tensor(response)[:, None])[:, 0]


def fake_megatron_model(hf_dir: Path, stage: int = 0, pp: int = 1):
    """A module whose parameters carry Megatron names and TP=1 tensors made from ``hf_dir``
    through the conversion mapping (no megatron needed): a stand-in trainer for unit tests and
    benchmarks. ``pp`` > 1: only pipeline stage ``stage``'s parameters, decoder layers numbered
    from 0 as on that stage."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from prism_megatron.convert.families import get_family
    from prism_megatron.weights.layout import make_layout
    from prism_megatron.weights.table import expand

    config = AutoConfig.from_pretrained(str(hf_dir))
    family = get_family(config.model_type)
    info = family.describe(config)
    dims = info.dims(padded_vocab_size=-(-info.vocab_size // 128) * 128)
    hf = load_file(str(Path(hf_dir) / "model.safetensors"))
    layout = make_layout(info, pp)
    root = torch.nn.Module()
    for e in expand(family.rules, info):
        if e.rule.tied_to and info.tie_word_embeddings or layout.stage_of(e) != stage:
            continue
        full = e.rule.to_megatron([hf[h] for h in e.hf], dims)
        *path, leaf = layout.local_name(e).split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(full.clone()))
    return root, config
