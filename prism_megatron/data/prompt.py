"""The prompt a rollout engine takes: token ids plus the images they stand for.

Defined in the data layer, which builds it (``RLPrompt.rollout_prompt``, the warm-up pairs,
evaluation), so that data never imports rollout; ``prism_megatron.rollout`` re-exports it as the
engines' input type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from prism_megatron.data.encode import Encoded


@dataclass
class RolloutPrompt:
    """One prompt: token ids from ``prism_megatron.data.encode.encode_prompt`` plus its images.

    ``input_ids`` are the trainer's ids, with every image already expanded to its run of
    ``<|image_pad|>`` tokens (engines also accept one pad per image and expand it, as SGLang
    does). ``images`` are the raw images (PIL images, file paths or encoded bytes): what SGLang
    takes. ``pixel_values`` / ``image_grid_thw`` are optional precomputed vision inputs; the CPU
    engine uses them as they are (no second image preprocessing), the HTTP client ignores them.
    """

    input_ids: list[int]
    images: list[Any] = field(default_factory=list)
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    def __post_init__(self):
        if isinstance(self.input_ids, torch.Tensor):
            self.input_ids = self.input_ids.tolist()
        self.input_ids = [int(t) for t in self.input_ids]
        if not self.input_ids:
            raise ValueError("a rollout prompt needs at least one token")

    @classmethod
    def from_encoded(cls, encoded: Encoded, images: Sequence[Any] = ()) -> "RolloutPrompt":
        """From ``encode_prompt``'s ``Encoded`` (keeps its vision inputs) and the raw images."""
        return cls(encoded.input_ids.tolist(), list(images), encoded.pixel_values,
                   encoded.image_grid_thw)
