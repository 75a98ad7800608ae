"""Image values of a data row -> PIL RGB images.

# placeholder: replaced by the image-decoder branch at merge
Minimal version so the row readers can be tested: file paths (resolved against ``base_dirs`` in
order), HF Image structs ``{"bytes", "path"}``, raw bytes, base64 / data URIs and PIL images.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any, Sequence

from PIL import Image


def _bad(reason: str, detail: str):
    from prism_megatron.data.sharegpt import BadRow

    return BadRow(reason, detail)


def _open_bytes(data: bytes, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _bad("corrupt_image", f"{where}: {exc}") from None


def decode_image(value: Any, *, base_dirs: Sequence[str | Path] = (), where: str = "") -> Image.Image:
    """One image value of a row as an RGB ``PIL.Image``; ``BadRow`` when it cannot be read."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes"):
            return _open_bytes(bytes(value["bytes"]), where)
        if value.get("path"):
            return decode_image(value["path"], base_dirs=base_dirs, where=where)
        raise _bad("bad_image_value", f"{where}: image struct without bytes or path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _open_bytes(bytes(value), where)
    if not isinstance(value, str) or not value:
        raise _bad("bad_image_value", f"{where}: image value of type {type(value).__name__}")
    if value.startswith(("http://", "https://")):
        raise _bad("remote_image", f"{where}: {value[:80]} (offline: download it first)")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
        try:
            return _open_bytes(base64.b64decode(value, validate=True), where)
        except binascii.Error:
            raise _bad("corrupt_image", f"{where}: invalid base64") from None
    path = Path(value)
    candidates = [path] if path.is_absolute() else [Path(d) / path for d in base_dirs] or [path]
    for candidate in candidates:
        if candidate.is_file():
            try:
                with Image.open(candidate) as image:
                    return image.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise _bad("corrupt_image", f"{where}: {candidate}: {exc}") from None
    raise _bad("missing_image", f"{where}: {candidates[0]}")
