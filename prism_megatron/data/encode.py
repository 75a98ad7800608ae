"""The one place that turns chat messages + images into model inputs.

``encode_prompt`` builds what a rollout engine or the discriminator sees (chat template with the
generation prompt); ``encode_conversation`` builds an SFT sample from the same prompt encoding
followed by the response tokens. Prompt and response are tokenised separately, exactly as in
generation, so SFT trains on the token sequences the policy will produce.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prism_megatron.data.sharegpt import BadRow
from prism_megatron.errors import PrismError

IGNORE_INDEX = -100


def load_processor(hf_dir: str | Path, min_pixels: int | None = None,
                   max_pixels: int | None = None):
    """The checkpoint's own processor (tokenizer + image processor + chat template), from a local
    directory only: a missing one is one error line, never a model-hub lookup (prism runs with
    HF_HUB_OFFLINE=1 unless the user asks otherwise)."""
    from transformers import AutoProcessor

    if not hf_dir or not Path(hf_dir).is_dir():
        raise PrismError(f"model directory {hf_dir!r} does not exist: model.hf_dir must be a local "
                         f"HF checkpoint directory (config.json, tokenizer, processor)")
    kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
    try:
        return AutoProcessor.from_pretrained(str(hf_dir), local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:   # transformers' "can't load ..." / bad JSON in its files
        raise PrismError(f"cannot load the processor of {hf_dir}: {str(e).splitlines()[0]}") from None


@dataclass
class Encoded:
    """Token ids (+ which of them are trained on) and the images' vision inputs."""

    input_ids: torch.Tensor                 # [S] long
    trainable: torch.Tensor                 # [S] bool: response tokens (SFT targets)
    pixel_values: torch.Tensor | None       # [patches, C*T*P*P], images in order
    image_grid_thw: torch.Tensor | None     # [images, 3]

    @property
    def prompt_length(self) -> int:
        """Tokens before the first trained token (the whole sequence for a bare prompt)."""
        hits = self.trainable.nonzero()
        return int(hits[0]) if len(hits) else len(self.input_ids)


def _render(processor, messages, add_generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _encode_chunk(processor, text: str, images: list) -> dict[str, Any]:
    out = processor(text=[text], images=images or None, return_tensors="pt")
    return {"input_ids": out["input_ids"][0], "pixel_values": out.get("pixel_values"),
            "image_grid_thw": out.get("image_grid_thw")}


def _cat(tensors: list) -> torch.Tensor | None:
    tensors = [t for t in tensors if t is not None]
    return torch.cat(tensors) if tensors else None


def encode_prompt(processor, messages: list[dict], images: list) -> Encoded:
    """Chat-templated prompt with the assistant generation prompt appended."""
    chunk = _encode_chunk(processor, _render(processor, messages, True), images)
    ids = chunk["input_ids"]
    return Encoded(ids, torch.zeros_like(ids, dtype=torch.bool), chunk["pixel_values"],
                   chunk["image_grid_thw"])


def encode_conversation(processor, messages: list[dict], images: list, *,
                        max_prompt_length: int, max_response_length: int) -> Encoded:
    """SFT sample: every assistant turn (its text + the end-of-turn token) is trained on.

    Raises BadRow("prompt_too_long") when the tokens before the last assistant turn exceed
    ``max_prompt_length`` (images are never cut); the last response is right-truncated to
    ``max_response_length`` tokens.
    """
    tokenizer = processor.tokenizer
    end_of_turn = tokenizer.eos_token or "<|im_end|>"
    ids, trainable, pixels, grids = [], [], [], []
    consumed, image_cursor = "", 0
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_turns:
        raise BadRow("no_assistant")
    for turn in assistant_turns:
        prefix = _render(processor, messages[:turn], True)
        if not prefix.startswith(consumed):
            raise BadRow("template_not_incremental")
        chunk_text = prefix[len(consumed):]
        n_images = chunk_text.count(processor.image_token)
        chunk = _encode_chunk(processor, chunk_text, images[image_cursor:image_cursor + n_images])
        image_cursor += n_images
        ids.append(chunk["input_ids"])
        trainable.append(torch.zeros(len(chunk["input_ids"]), dtype=torch.bool))
        pixels.append(chunk["pixel_values"])
        grids.append(chunk["image_grid_thw"])
        response = messages[turn]["content"] + end_of_turn
        response_ids = torch.tensor(tokenizer(response, add_special_tokens=False)["input_ids"])
        if turn == assistant_turns[-1]:
            if sum(len(t) for t in ids) > max_prompt_length:
                raise BadRow("prompt_too_long")
            response_ids = response_ids[:max_response_length]
        ids.append(response_ids)
        trainable.append(torch.ones(len(response_ids), dtype=torch.bool))
        consumed = prefix + response
    if image_cursor != len(images):
        raise BadRow("image_count_mismatch", f"{len(images)} images, {image_cursor} used")
    return Encoded(torch.cat(ids), torch.cat(trainable), _cat(pixels), _cat(grids))
