"""Reading sharegpt-style multimodal rows and turning them into chat messages.

The readers of every published layout (verl, LLaMA-Factory, warm-up pairs, ...) and the one
row -> messages normaliser live in ``prism_megatron.data.rows``; the functions here are the
plain-sharegpt pieces they build on (role aliases, ``<image>`` placeholders -> typed parts), and
``BadRow`` / ``SkipStats`` / ``DataError``, the bad-input vocabulary of every loader.

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
from typing import Any

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


def count_placeholders(messages: list[dict[str, Any]]) -> int:
    return sum(1 for m in messages if isinstance(m["content"], list)
               for part in m["content"] if part["type"] == "image")
