"""Reading sharegpt-style multimodal rows and turning them into chat messages.

Two row layouts are accepted (PRISM's SFT data uses the first):
  {"messages": [{"role": "user", "content": "<image>What ..."}, ...], "images": ["a.png"]}
  {"conversations": [{"from": "human", "value": "<image>What ..."}, ...], "images": [...]}
``<image>`` placeholders are matched to ``images`` in order; relative image paths are resolved
against the data file's directory. Problems are reported as a ``BadRow`` with a reason that the
loaders count (``SkipStats``), never as a crash in the middle of a run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from prism_megatron.data.template import IMAGE_PLACEHOLDER

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system", "model": "assistant"}


class BadRow(Exception):
    """A row that cannot be used; ``reason`` is a short key counted in the logs."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class SkipStats:
    """Rows seen and rows skipped, by reason."""

    seen: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.seen - self.skipped_total}/{self.seen} rows usable; skipped: {reasons}"

    def check(self, max_skip_fraction: float) -> None:
        """Fail (clearly) when more than ``max_skip_fraction`` of the rows were unusable."""
        if self.seen and self.skipped_total / self.seen > max_skip_fraction:
            raise ValueError(f"too many unusable rows ({self.summary()}); the limit is "
                             f"data.max_skip_fraction={max_skip_fraction}")


def _content_parts(text: str) -> list[dict[str, Any]]:
    """'<image>Describe' -> [{"type": "image"}, {"type": "text", "text": "Describe"}]."""
    parts: list[dict[str, Any]] = []
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            parts.append({"type": "image"})
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def row_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Normalise a row to HF chat messages with typed content parts (images as parts)."""
    turns = row.get("messages") or row.get("conversations")
    if not turns:
        raise BadRow("no_messages")
    messages = []
    for turn in turns:
        role = ROLE_ALIASES.get(turn.get("role") or turn.get("from") or "")
        text = turn.get("content", turn.get("value"))
        if role is None or not isinstance(text, str):
            raise BadRow("bad_turn", repr(turn)[:80])
        if role == "assistant":
            if not text.strip():
                raise BadRow("empty_assistant")
            messages.append({"role": role, "content": text})
        else:
            messages.append({"role": role, "content": _content_parts(text)})
    return messages


def count_placeholders(messages: list[dict[str, Any]]) -> int:
    return sum(1 for m in messages if isinstance(m["content"], list)
               for part in m["content"] if part["type"] == "image")


def load_images(row: dict[str, Any], base_dir: Path, expected: int, *,
                base_dirs: tuple = (), min_pixels: int | None = None,
                max_pixels: int | None = None, max_side: int | None = None,
                factor: int | None = None, where: str = "") -> list[Image.Image]:
    """The row's images as RGB, fitted to the pixel budget (``data/images.py``, the one decoder).

    Relative paths are tried against ``base_dir`` (the data file's directory) and then each of
    ``base_dirs`` (``media_dir``, ``data.image_root``). BadRow if an image is missing, corrupt,
    too large, remote, of a wrong type, or if their number does not match the placeholders.
    ``factor``: see ``data.images.fit_pixels`` (SGLang rollouts: ``SGLANG_IMAGE_FACTOR``).
    """
    from prism_megatron.data.images import ImageError, load_fitted   # (it imports BadRow)

    values = row.get("images")
    if values is None:
        values = []
    elif isinstance(values, (str, dict, bytes, Path)):
        values = [values]
    elif not isinstance(values, (list, tuple)):
        raise ImageError("bad_image_value", f"images must be a list, got {type(values).__name__}",
                         where)
    if len(values) != expected:
        raise BadRow("image_count_mismatch", f"{expected} placeholders, {len(values)} images")
    dirs = (base_dir, *base_dirs)
    return [load_fitted(v, base_dirs=dirs, where=where, min_pixels=min_pixels,
                        max_pixels=max_pixels, max_side=max_side, factor=factor) for v in values]
