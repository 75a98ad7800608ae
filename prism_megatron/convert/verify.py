"""Logits parity between transformers' model (HF checkpoint) and the Megatron model (converted
checkpoint) at a given TP/PP, on the same text+image batches.

Run on every rank under torchrun (world = TP * PP). Rank 0 runs transformers; every rank runs its
Megatron stage through megatron's forward-only pipeline schedule; the last stage's logits
(gathered over TP) are sent to rank 0, which compares.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from prism_megatron.schedule import forward_only
from prism_megatron.weights import ckpt_layout as lay
from prism_megatron.weights.errors import ConversionError

# (name, image sizes (width, height)): no image, one image, two images of different sizes.
CASES = [("text", []), ("one_image", [(64, 64)]), ("two_images", [(64, 64), (96, 64)])]


def _image(width: int, height: int, seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy())


def make_batches(hf_dir: str | Path) -> list[tuple[str, dict]]:
    """The processor's outputs for each case (the checkpoint's own processor and template)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(hf_dir))
    except Exception as e:  # noqa: BLE001 - any failure means: no usable processor files
        raise ConversionError(f"cannot load the processor/tokenizer from {hf_dir} ({e}); "
                              f"verification needs them to build image+text inputs") from None
    batches = []
    for name, sizes in CASES:
        content = [{"type": "image"} for _ in sizes[:1]]
        content.append({"type": "text", "text": "Describe the picture and count the shapes."})
        content += [{"type": "image"} for _ in sizes[1:]]
        text = processor.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True)
        images = [_image(w, h, seed) for seed, (w, h) in enumerate(sizes)] or None
        batches.append((name, dict(processor(text=[text], images=images, return_tensors="pt"))))
    return batches


MEGATRON_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


@torch.no_grad()
def hf_logits(hf_dir: str | Path, batches) -> dict[str, torch.Tensor]:
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    return {name: model(**batch).logits.float() for name, batch in batches}


def checkpoint_pp_layers(megatron_dir: str | Path, pp: int) -> list[int] | None:
    """The stage split a legacy checkpoint was written with (its manifest), when it has ``pp``
    stages; torch_dist checkpoints carry global layer numbers and load at any split."""
    ckpt = lay.resolve_checkpoint_dir(megatron_dir)
    if lay.detect_format(ckpt) != "legacy":
        return None
    split = lay.read_manifest(ckpt).get("pp_layers")
    return split if split and len(split) == pp else None


def build_megatron(hf_dir: str | Path, pp_layers: list[int] | None = None):
    """This rank's Megatron stage (fp32, local spec) returning gathered, unpadded logits."""
    from megatron.core import parallel_state as ps

    from prism_megatron.models.qwen3_vl.model import build_qwen3vl_model

    pp = ps.get_pipeline_model_parallel_world_size()
    parallel = SimpleNamespace(pp_layers=pp_layers if pp > 1 else None)
    from prism_megatron.models.qwen3_vl.config import Qwen3VLConfigError

    try:
        model, config = build_qwen3vl_model(str(hf_dir), parallel, dtype="fp32",
                                            parallel_output=False)
    except Qwen3VLConfigError as e:
        raise ConversionError(str(e)) from None
    return model.eval(), config


def megatron_logits(model, config, batch: dict) -> torch.Tensor | None:
    """Logits ``[B, S, V]`` on global rank 0 (None elsewhere), via the pipeline schedule."""
    from megatron.core import parallel_state as ps

    captured = {}

    def forward_step(inputs, model):
        output = model(**{k: v for k, v in inputs.items() if k in MEGATRON_INPUTS})

        def collect(logits):
            captured["logits"] = logits.float().contiguous()  # (a vocab slice: a view)
            return logits.new_zeros(()), {}

        return output, collect

    input_ids = batch["input_ids"]
    forward_only(model, [batch], forward_step, input_ids.shape[1])
    # The last stage holds the logits; ship them to the first stage (where rank 0 lives).
    if ps.get_pipeline_model_parallel_world_size() > 1:
        shape = (*input_ids.shape, model.vocab_size)
        logits = captured.get("logits", torch.empty(shape))
        torch.distributed.broadcast(logits, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
        captured["logits"] = logits
    return captured["logits"] if torch.distributed.get_rank() == 0 else None


def verify(hf_dir: str | Path, megatron_dir: str | Path, tp: int, pp: int,
           pp_layers: list[int] | None = None, tol: float = 1e-4) -> dict | None:
    """Returns the result dict on rank 0 (None on other ranks)."""
    import torch.distributed as dist

    from prism_megatron.weights.load import load_megatron_checkpoint
    from prism_megatron.distributed import init_distributed

    if pp_layers is None and pp > 1:
        pp_layers = checkpoint_pp_layers(megatron_dir, pp)
    init_distributed(tp=tp, pp=pp)
    batches = make_batches(hf_dir)
    model, config = build_megatron(hf_dir, pp_layers)
    fmt = load_megatron_checkpoint(model, megatron_dir)
    mine = {name: megatron_logits(model, config, batch) for name, batch in batches}
    if dist.get_rank() != 0:
        return None
    del model
    reference = hf_logits(hf_dir, batches)
    diffs = {}
    for name in reference:
        if mine[name].shape != reference[name].shape:
            raise ConversionError(f"{name}: Megatron logits {tuple(mine[name].shape)} vs "
                                  f"transformers {tuple(reference[name].shape)}")
        diffs[name] = float((mine[name] - reference[name]).abs().max())
    worst = max(diffs.values())
    return {"max_abs_logit_diff": worst, "tol": tol, "ok": worst <= tol, "tp": tp, "pp": pp,
            "pp_layers": pp_layers, "world_size": dist.get_world_size(), "format": fmt,
            "cases": diffs}


def print_result(result: dict) -> None:
    print(json.dumps(result), flush=True)
