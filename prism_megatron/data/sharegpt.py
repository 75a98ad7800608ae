"""Reading sharegpt-style multimodal rows and turning them into chat messages.

The readers of every published layout (verl, LLaMA-Factory, warm-up pairs, ...) live in
``prism_megatron.data.rows``; the functions here are the plain-sharegpt row functions they build
on, and ``BadRow`` / ``SkipStats`` / ``DataError``, the bad-input vocabulary of every loader.

Two row layouts are accepted (PRISM's SFT data uses the first):
  {"messages": [{"role": "user", "content": "<image>What ..."}, ...], "images": ["a.png"]}
  {"conversations": [{"from": "human", "value": "<image>What ..."}, ...], "images": [...]}
``<image>`` placeholders are matched to ``images`` in order; relative image paths are resolved
against the data file's directory. Problems are reported as a ``BadRow`` with a reason that the
loaders count (``SkipStats``), never as a crash in the middle of a run.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from prism_megatron.data.template import IMAGE_PLACEHOLDER
from prism_megatron.errors import PrismError

log = logging.getLogger(__name__)
WARN_FIRST = 5    # bad rows logged one by one (WARNING) before the rest go to DEBUG

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system", "model": "assistant"}


class BadRow(Exception):
    """A row that cannot be used; ``reason`` is a short key counted in the logs."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class DataError(PrismError, ValueError):
    """A data file (or the data as a whole) that cannot serve the stage; one line naming it."""


@dataclass
class SkipStats:
    """Rows seen and rows skipped, by reason, and the layouts of the files they came from."""

    seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    layouts: list = field(default_factory=list)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @property
    def usable(self) -> int:
        return self.seen - self.skipped_total

    @property
    def layout(self) -> str:
        return "+".join(dict.fromkeys(self.layouts)) or "none"

    def add_layout(self, layout: str) -> None:
        self.layouts.append(layout)

    def skip(self, bad: "BadRow") -> None:
        """Count a bad row; the first few are logged with their file:line and reason."""
        self.skipped[bad.reason] += 1
        level = logging.WARNING if self.skipped_total <= WARN_FIRST else logging.DEBUG
        log.log(level, "skipped row: %s%s", bad,
                " (further skipped rows at DEBUG)" if self.skipped_total == WARN_FIRST else "")

    def merge(self, other: "SkipStats") -> None:
        self.seen += other.seen
        self.skipped.update(other.skipped)
        self.layouts += other.layouts

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"layout {self.layout}: {self.usable}/{self.seen} rows usable; "
                f"skipped: {reasons}")

    def as_dict(self) -> dict:
        return {"rows": self.seen, "usable": self.usable, "skipped": dict(sorted(
            self.skipped.items())), "layout": self.layout}

    def check(self, max_skip_fraction: float, what: str = "") -> None:
        """Fail (one line) when more than ``max_skip_fraction`` of the rows were unusable, or
        when no row at all is usable."""
        where = f" in {what}" if what else ""
        if self.usable == 0:
            raise DataError(f"no usable rows{where} ({self.summary()})")
        if self.skipped_total / self.seen > max_skip_fraction:
            raise DataError(f"too many unusable rows{where} ({self.summary()}); the limit is "
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
    if "__bad_row__" in row:          # a bad row handed on by ``rows.read_rows``
        raise BadRow(*row["__bad_row__"])
    if isinstance(row.get("messages", row.get("conversations")), str):
        raise BadRow("bad_messages", "messages is a string, not a list of turns")
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
