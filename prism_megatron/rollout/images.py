"""Images on the rollout path: loading, wire encoding, and ``<|image_pad|>`` runs.

The trainer's prompt ids (``encode_prompt``) hold each image as a run of pad tokens, one per
merged 2x2 patch. SGLang takes the raw images and re-expands the pads itself, so a prompt may
arrive with one pad per image or with full runs; ``expand_image_pads`` accepts both. Images
travel as base64 PNG data URLs (lossless, so the server's preprocessing sees the same pixels as
the trainer's).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from prism_megatron.data.images import ImageError, decode_image


class BadImage(ValueError):
    """An image that cannot be loaded or placed; the message says which and why."""

    def __init__(self, message: str, reason: str = "bad_image"):
        super().__init__(message)
        self.reason = reason


def load_image(item: Any) -> Image.Image:
    """A PIL RGB image from a PIL image, bytes, a file path, an HF image struct, or a base64
    string / data URL: ``prism_megatron.data.images.decode_image``, the one decoder.

    Remote URLs are refused: rollout servers run without network access to the data.
    Raises ``BadImage`` (its ``reason`` is the decoder's, e.g. ``corrupt_image``).
    """
    try:
        return decode_image(item)
    except ImageError as e:
        raise BadImage(str(e), reason=e.reason) from None


def image_to_data_url(item: Any) -> str:
    """Wire form of one image: ``data:image/png;base64,...`` (files are sent as their bytes)."""
    if isinstance(item, (str, Path)) and not str(item).startswith("data:") and Path(item).is_file():
        data = Path(item).read_bytes()
    elif isinstance(item, str):
        return item if item.startswith("data:") else f"data:image/png;base64,{item}"
    elif isinstance(item, (bytes, bytearray)):
        data = bytes(item)
    else:
        buf = io.BytesIO()
        load_image(item).save(buf, format="PNG")
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def pad_runs(input_ids: list[int], pad_id: int) -> list[tuple[int, int]]:
    """``(start, end)`` of every maximal run of ``pad_id``; one run per image."""
    runs, start = [], None
    for i, t in enumerate(input_ids):
        if t == pad_id and start is None:
            start = i
        elif t != pad_id and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(input_ids)))
    return runs


def expand_image_pads(input_ids: list[int], pad_id: int, tokens_per_image: list[int]) -> list[int]:
    """Give image k exactly ``tokens_per_image[k]`` pads, whatever its run length was."""
    runs = pad_runs(input_ids, pad_id)
    if len(runs) != len(tokens_per_image):
        raise BadImage(f"the prompt has {len(runs)} image placeholder(s) but {len(tokens_per_image)} "
                       f"image(s) were given")
    out, pos = [], 0
    for (start, end), count in zip(runs, tokens_per_image):
        out += input_ids[pos:start] + [pad_id] * count
        pos = end
    return out + input_ids[pos:]


def collapse_image_pads(input_ids: list[int], pad_id: int) -> list[int]:
    """One pad per image (the form vLLM/verl send to an inference server)."""
    out = []
    for t in input_ids:
        if not (t == pad_id and out and out[-1] == pad_id):
            out.append(t)
    return out


def preprocess_images(image_processor, images: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values, image_grid_thw)`` exactly as the processor computes them for a prompt."""
    pil = [load_image(x) for x in images]
    out = image_processor(images=pil, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def tokens_per_image(image_grid_thw: torch.Tensor, merge_size: int) -> list[int]:
    return (image_grid_thw.prod(-1) // (merge_size * merge_size)).tolist()
