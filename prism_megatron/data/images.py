"""The one image decoder of training, rollouts and eval, and the pixel budget applied to it.

``decode_image`` turns every encoding the published data uses into an RGB ``PIL.Image``:

* a path (``str`` or ``Path``); a relative one is tried against each of ``base_dirs`` in order
  (the data file's directory, then ``media_dir``, then ``data.image_root``);
* an HF ``datasets`` Image struct ``{"bytes": b"..." | None, "path": "..." | None}`` (the verl
  parquets embed the bytes; the path is used only when there are none);
* raw bytes, a base64 string, or a ``data:image/...;base64,`` URI (the rollout wire form);
* a ``PIL.Image`` (converted to RGB).

Every failure is an ``ImageError`` (a ``BadRow``, so the loaders count it) with one short
``reason``: ``missing_image``, ``corrupt_image``, ``image_too_large`` (PIL's decompression-bomb
limit, ``Image.MAX_IMAGE_PIXELS``, checked from the header before any pixel is decoded),
``remote_image`` (http(s) URLs: training runs offline) or ``bad_image_value`` (an int, a list ...).

``fit_pixels`` resizes (aspect-preserving, bicubic) into a pixel budget
``[min_pixels, max_pixels]`` and a longest-side cap ``max_side``; images are resized to fit,
never skipped. The budget is the same one the checkpoint's image processor is given
(``encode.load_processor(hf_dir, min_pixels, max_pixels)``), so its own ``smart_resize`` (which
rounds each side to a multiple of patch * merge = 32 px for Qwen3-VL and keeps
``h * w <= max_pixels``) sees an image that is already inside the budget; LLaMA-Factory's
``image_max_pixels`` pre-resize works the same way (``int(side * sqrt(max / (w * h)))``).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from prism_megatron.data.sharegpt import BadRow

REASONS = ("missing_image", "corrupt_image", "image_too_large", "remote_image", "bad_image_value")
_MAX_PATH_CHARS = 4096          # longer strings are never file names: try base64
SGLANG_IMAGE_FACTOR = 28       # SGLang's Qwen-VL pre-resize rounds sides to multiples of 28
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


class ImageError(BadRow):
    """An image that cannot be used; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str = "", where: str = ""):
        super().__init__(reason, f"{where}: {detail}" if where and detail else where or detail)


def decode_image(value: Any, *, base_dirs: Sequence[str | Path] = (), where: str = "") -> Image.Image:
    """``value`` in any supported encoding -> an RGB image (see the module doc).

    ``where`` names the row (e.g. ``"data.jsonl line 7"``) in the error messages.
    """
    source = resolve_image(value, base_dirs=base_dirs, where=where)
    if isinstance(source, Image.Image):
        _check_size(source.size, where)
        return source.convert("RGB")
    return _open(source, where)


def resolve_image(value: Any, *, base_dirs: Sequence[str | Path] = (),
                  where: str = "") -> bytes | Path | Image.Image:
    """Where the image's bytes are, without decoding them: the file (relative paths resolved),
    the embedded / base64 bytes, or the PIL image itself. Raises ``ImageError``."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):                       # HF datasets Image struct
        data, path = value.get("bytes"), value.get("path")
        if data:
            return resolve_image(data, base_dirs=base_dirs, where=where)
        if path:
            return resolve_image(path, base_dirs=base_dirs, where=where)
        raise ImageError("missing_image", "image struct with neither bytes nor path", where)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, Path):
        return _existing(value, base_dirs, where)
    if value is None:
        raise ImageError("missing_image", "no image given", where)
    if not isinstance(value, str):
        raise ImageError("bad_image_value", f"expected a path, bytes, base64 or an image struct, "
                                            f"got {type(value).__name__} {repr(value)[:40]}", where)
    text = value.strip()
    if not text:
        raise ImageError("missing_image", "empty image path", where)
    if text.lower().startswith(("http://", "https://")):
        raise ImageError("remote_image", f"remote image {text[:200]} cannot be fetched offline; "
                                         f"download the images and set data.image_root", where)
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep or ";base64" not in header:
            raise ImageError("corrupt_image", "data URI without a base64 payload", where)
        return _b64(payload, where)
    if len(text) <= _MAX_PATH_CHARS:
        found = _find(Path(text), base_dirs)
        if found is not None:
            return found
    data = _b64_or_none(text)
    if data is not None and (len(text) > 128 or data.startswith(_MAGIC)):
        return data     # a base64 image (short strings must look like one: "abcd" is base64 too)
    if len(text) > _MAX_PATH_CHARS:
        raise ImageError("corrupt_image", "invalid base64 image data", where)
    return _existing(Path(text), base_dirs, where)     # reports it missing


def check_image(source: bytes | Path | Image.Image, where: str = "") -> None:
    """Header-level check (format, size limit, checksum where the format has one) without
    decoding the pixels: for loaders that decode lazily. Raises ``ImageError``."""
    if isinstance(source, Image.Image):
        _check_size(source.size, where)
        return
    _guarded(source, where, lambda image: image.verify())


def fit_pixels(image: Image.Image, *, min_pixels: int | None = None, max_pixels: int | None = None,
               max_side: int | None = None, factor: int | None = None) -> Image.Image:
    """Resize (aspect-preserving, bicubic) so ``w * h`` lies in ``[min_pixels, max_pixels]`` and
    ``max(w, h) <= max_side``; the upper bounds win when they conflict with ``min_pixels``.
    An image already inside the budget is returned as is.

    ``factor``: also make both sides multiples of it (nearest, or floored where rounding would
    break a cap). With ``factor=SGLANG_IMAGE_FACTOR`` the image is a fixed point of SGLang's own
    Qwen-VL pre-resize (``multimodal/processors/qwen_vl.py``: ``smart_resize`` with factor 28
    and ``SGLANG_IMAGE_MAX_PIXELS``, before the HF processor), so an SGLang server and the
    trainer hand the same pixels to the same processor settings.
    """
    width, height = image.size
    w, h = float(width), float(height)
    if max_side and max(w, h) > max_side:
        w, h = w * max_side / max(w, h), h * max_side / max(w, h)
    if max_pixels and w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
        w, h = w * scale, h * scale
    if w < width or h < height:       # floor: the result never exceeds the caps
        size = (max(1, int(w)), max(1, int(h)))
    elif min_pixels and width * height < min_pixels:
        up = math.sqrt(min_pixels / (width * height))
        if max_pixels:
            up = min(up, math.sqrt(max_pixels / (width * height)))
        if max_side:
            up = min(up, max_side / max(width, height))
        size = (max(1, math.ceil(width * up)), max(1, math.ceil(height * up)))
    else:
        size = (width, height)
    if factor:
        size = _aligned(size, factor, min_pixels, max_pixels, max_side)
    if size == (width, height):
        return image
    return image.resize(size, Image.Resampling.BICUBIC)


def _aligned(size: tuple[int, int], factor: int, min_pixels: int | None,
             max_pixels: int | None, max_side: int | None) -> tuple[int, int]:
    def sides(rounding):
        return tuple(max(factor, int(rounding(x / factor)) * factor) for x in size)

    out = sides(round)
    if (max_pixels and out[0] * out[1] > max_pixels) or (max_side and max(out) > max_side):
        out = sides(math.floor)
    elif min_pixels and out[0] * out[1] < min_pixels:
        out = sides(math.ceil)
    return out


def load_fitted(value: Any, *, base_dirs: Sequence[str | Path] = (), where: str = "",
                min_pixels: int | None = None, max_pixels: int | None = None,
                max_side: int | None = None, factor: int | None = None) -> Image.Image:
    """``decode_image`` then ``fit_pixels``: what every loader calls."""
    return fit_pixels(decode_image(value, base_dirs=base_dirs, where=where),
                      min_pixels=min_pixels, max_pixels=max_pixels, max_side=max_side,
                      factor=factor)


# ------------------------------------------------------------------------------------ helpers

def _find(path: Path, base_dirs: Sequence[str | Path]) -> Path | None:
    candidates = [path] if path.is_absolute() else [Path(b) / path for b in base_dirs] or [path]
    for candidate in candidates:
        try:
            if candidate.is_file():
                return candidate
        except (OSError, ValueError):     # name too long, embedded NUL ...
            continue
    return None


def _existing(path: Path, base_dirs: Sequence[str | Path], where: str) -> Path:
    found = _find(path, base_dirs)
    if found is None:
        tried = [str(path)] if path.is_absolute() or not base_dirs else \
            [str(Path(b) / path) for b in base_dirs]
        raise ImageError("missing_image", f"no file {' or '.join(tried)}", where)
    return found


def _b64_or_none(text: str) -> bytes | None:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


def _b64(text: str, where: str) -> bytes:
    data = _b64_or_none(text)
    if data is None:
        raise ImageError("corrupt_image", "invalid base64 image data", where)
    return data


def load_images(row: dict[str, Any], base_dir: Path, expected: int, *,
                base_dirs: tuple = (), min_pixels: int | None = None,
                max_pixels: int | None = None, max_side: int | None = None,
                factor: int | None = None, where: str = "") -> list[Image.Image]:
    """A stored row's ``images`` as RGB, fitted to the pixel budget (``load_fitted``).

    Relative paths are tried against ``base_dir`` (the data file's directory) and then each of
    ``base_dirs`` (``media_dir``, ``data.image_root``). BadRow if an image is missing, corrupt,
    too large, remote, of a wrong type, or if their number is not ``expected`` (the row's
    placeholders). The row readers' own path is ``rows.row_images``.
    """
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


def _check_size(size: tuple[int, int], where: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        raise ImageError("image_too_large", f"{size[0]}x{size[1]} pixels is over PIL's limit of "
                                            f"{limit} (Image.MAX_IMAGE_PIXELS)", where)


def _open(source: bytes | Path, where: str) -> Image.Image:
    return _guarded(source, where, lambda image: image.convert("RGB"))


def _guarded(source: bytes | Path, where: str, use):
    """Open ``source`` and apply ``use``; PIL's decompression-bomb warning counts as an error."""
    name = str(source) if isinstance(source, Path) else "embedded image bytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                _check_size(image.size, where)
                return use(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("image_too_large", f"{name}: {exc}", where) from None
    except FileNotFoundError:
        raise ImageError("missing_image", f"no file {name}", where) from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ...)
        raise ImageError("corrupt_image", f"{name}: {type(exc).__name__}: {exc}", where) from None
