"""The one image decoder (prism_megatron.data.images) and pixel budgets shared by every engine."""

from __future__ import annotations

import base64
import io
import math
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from prism_megatron.data.encode import encode_prompt, load_processor
from prism_megatron.data.images import (
    SGLANG_IMAGE_FACTOR, ImageError, decode_image, fit_pixels, resolve_image)
from prism_megatron.data.images import load_images
from prism_megatron.data.rows import row_messages
from prism_megatron.data.sharegpt import BadRow

BUDGET = 768 * 768            # LLaMA-Factory's image_max_pixels, examples/*/sft.yaml


def png(colour="red", size=(8, 6), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height (valid IHDR) with no pixel data: costs ~60 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + \
        chunk(b"IEND", b"")


def colour_of(image: Image.Image) -> tuple:
    return image.getpixel((0, 0))


# --------------------------------------------------------------------------------- fit_pixels

@pytest.mark.parametrize("size, kwargs, expected", [
    ((2000, 1000), {"max_pixels": BUDGET}, (1086, 543)),        # int(2000 * sqrt(B / 2e6))
    ((1000, 2000), {"max_pixels": BUDGET}, (543, 1086)),
    ((1000, 500), {"max_side": 560}, (560, 280)),                # warm-up cap
    ((1000, 500), {"max_side": 560, "max_pixels": 100 * 100}, (141, 70)),
    ((32, 16), {"min_pixels": 4096}, (91, 46)),                  # ceil(32 * sqrt(8))
    ((32, 16), {"min_pixels": 4096, "max_side": 64}, (64, 32)),  # the cap wins
])
def test_fit_pixels_sizes(size, kwargs, expected):
    out = fit_pixels(Image.new("RGB", size, "red"), **kwargs)
    assert out.size == expected
    assert out.getpixel((0, 0)) == (255, 0, 0)


def sglang_qwen_resize(height, width, factor=28, min_pixels=4 * 28 * 28, max_pixels=BUDGET):
    """SGLang's Qwen-VL pre-resize target (multimodal/processors/qwen_vl.py smart_resize), with
    SGLANG_IMAGE_MAX_PIXELS = the budget, as our launch command sets it."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


@pytest.mark.parametrize("size, expected", [
    ((2000, 1000), (1092, 532)), ((1500, 900), (980, 588)), ((500, 375), (504, 364)),
    ((1000, 1000), (756, 756)), ((20, 20), (56, 56)),
])
def test_fit_pixels_factor_is_a_fixed_point_of_sglangs_pre_resize(size, expected):
    """Unaligned, SGLang would resize our image again before its processor (500x375 -> 504x364:
    176 image tokens instead of the trainer's 192); aligned to 28 px it passes through as is
    (with at least SGLang's 4 * 28 * 28 pixels)."""
    out = fit_pixels(Image.new("RGB", size), min_pixels=4 * 28 * 28, max_pixels=BUDGET,
                     factor=SGLANG_IMAGE_FACTOR)
    assert out.size == expected and out.size[0] * out.size[1] <= BUDGET
    assert sglang_qwen_resize(out.size[1], out.size[0]) == (out.size[1], out.size[0])
    assert sglang_qwen_resize(375, 500) == (364, 504)    # what the unaligned image would become


def test_fit_pixels_leaves_images_inside_the_budget_alone():
    image = Image.new("RGB", (768, 768))
    assert fit_pixels(image, min_pixels=4096, max_pixels=BUDGET, max_side=768) is image
    assert fit_pixels(image) is image


def test_budget_agrees_with_the_processor(tiny_model_dir):
    """2000x1000 under 768*768: ours gives 1086x543, the processor's smart_resize 512x1056 (32 px
    multiples) = 528 image tokens, the same as for the unfitted image, and the prompt encoding
    holds exactly that many pads."""
    processor = load_processor(tiny_model_dir, None, BUDGET)
    big = Image.new("RGB", (2000, 1000), "blue")
    fitted = fit_pixels(big, max_pixels=BUDGET)
    grid = processor.image_processor(images=[fitted], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 32, 66]]
    raw_grid = processor.image_processor(images=[big], return_tensors="pt")["image_grid_thw"]
    assert raw_grid.tolist() == [[1, 32, 66]]
    messages = row_messages({"messages": [{"role": "user", "content": "<image>What is it?"}]})
    encoded = encode_prompt(processor, messages, [fitted])
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((encoded.input_ids == pad).sum()) == 32 * 66 // 4 == 528


def test_cpu_engine_and_trainer_see_the_same_image_tokens(tiny_model_dir):
    """A large raw image through the CPU engine (and the server's request parser) under the
    stage's budget: the same pad count as the trainer's encoding; without it, a different one."""
    from prism_megatron.rollout.base import RolloutPrompt
    from prism_megatron.rollout.images import collapse_image_pads, image_to_data_url
    from prism_megatron.rollout.local import LocalEngine
    from prism_megatron.rollout.serve import parse_generate

    trainer = load_processor(tiny_model_dir, None, BUDGET)
    image = Image.new("RGB", (1500, 900), "green")
    messages = row_messages({"messages": [{"role": "user", "content": "<image>Describe."}]})
    encoded = encode_prompt(trainer, messages, [image])
    pad = trainer.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    trainer_pads = int((encoded.input_ids == pad).sum())
    assert trainer_pads == 36 * 60 // 4 == 540      # smart_resize(900, 1500) = 576 x 960 px
    one_pad = collapse_image_pads(encoded.input_ids.tolist(), pad)

    engine = LocalEngine(tiny_model_dir, max_pixels=BUDGET, processor=None)
    prepared = engine.prepare(RolloutPrompt(one_pad, [image]))
    assert prepared.ids.count(pad) == trainer_pads and len(prepared.ids) == len(encoded.input_ids)
    requests, _, _ = parse_generate({"input_ids": one_pad, "image_data": [image_to_data_url(image)],
                                     "sampling_params": {"max_new_tokens": 2}}, engine)
    assert requests[0].prompt.input_ids.count(pad) == trainer_pads

    unbudgeted = LocalEngine(tiny_model_dir, processor=load_processor(tiny_model_dir))
    assert unbudgeted.prepare(RolloutPrompt(one_pad, [image])).ids.count(pad) == 60


# ------------------------------------------------------------------------------ decode_image

def test_every_input_kind(tmp_path):
    first, second = tmp_path / "data", tmp_path / "media"
    (first / "img").mkdir(parents=True)
    (second / "img").mkdir(parents=True)
    (first / "img/a.png").write_bytes(png("red"))
    (second / "img/a.png").write_bytes(png("green"))
    (second / "img/b.png").write_bytes(png("blue"))
    dirs = (first, second)
    assert colour_of(decode_image("img/a.png", base_dirs=dirs)) == (255, 0, 0)   # first dir wins
    assert colour_of(decode_image("img/b.png", base_dirs=dirs)) == (0, 0, 255)   # then the next
    assert colour_of(decode_image(Path("img/b.png"), base_dirs=dirs)) == (0, 0, 255)
    assert colour_of(decode_image(str(second / "img/a.png"))) == (0, 128, 0)     # absolute
    # HF Image structs: the bytes first, then the path
    assert colour_of(decode_image({"bytes": png("blue"), "path": "img/a.png"}, base_dirs=dirs)) \
        == (0, 0, 255)
    assert colour_of(decode_image({"bytes": None, "path": "img/b.png"}, base_dirs=dirs)) \
        == (0, 0, 255)
    data = png((10, 20, 30))
    assert colour_of(decode_image(data)) == (10, 20, 30)
    assert colour_of(decode_image(bytearray(data))) == (10, 20, 30)
    b64 = base64.b64encode(data).decode()
    assert colour_of(decode_image(b64)) == (10, 20, 30)
    assert colour_of(decode_image("data:image/png;base64," + b64)) == (10, 20, 30)
    rgba = Image.new("RGBA", (4, 4), (1, 2, 3, 4))
    out = decode_image(rgba)
    assert out.mode == "RGB" and colour_of(out) == (1, 2, 3)
    assert decode_image(png("red", mode="L")).mode == "RGB"
    assert resolve_image("img/b.png", base_dirs=dirs) == second / "img/b.png"


def test_each_error_reason(tmp_path, monkeypatch):
    truncated = png("red", size=(64, 64))[:60]
    cases = [
        ("missing.png", "missing_image", f"no file {tmp_path / 'missing.png'}"),
        ({"bytes": None, "path": None}, "missing_image", "neither bytes nor path"),
        (None, "missing_image", "no image given"),
        (b"not an image at all", "corrupt_image", "UnidentifiedImageError"),
        (truncated, "corrupt_image", "embedded image bytes"),
        ("data:image/png;base64,@@@", "corrupt_image", "invalid base64"),
        ("data:image/png,rawtext", "corrupt_image", "without a base64 payload"),
        (png_header_only(15000, 15000), "image_too_large", "225000000 pixels"),
        ("https://example.com/a.png", "remote_image",
         "remote image https://example.com/a.png cannot be fetched offline; download the images "
         "and set data.image_root"),
        (7, "bad_image_value", "got int 7"),
        ([1, 2], "bad_image_value", "got list [1, 2]"),
        (3.5, "bad_image_value", "got float"),
    ]
    for value, reason, detail in cases:
        with pytest.raises(ImageError) as info:
            decode_image(value, base_dirs=(tmp_path,), where="train.jsonl line 3")
        assert isinstance(info.value, BadRow) and info.value.reason == reason, value
        assert detail in str(info.value) and "train.jsonl line 3" in str(info.value), str(info.value)
    # PIL's warning band (between MAX_IMAGE_PIXELS and twice it) is an error too
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)
    with pytest.raises(ImageError) as info:
        decode_image(png(size=(20, 10)))
    assert info.value.reason == "image_too_large" and "200 pixels" in str(info.value)
    with pytest.raises(ImageError, match="image_too_large"):
        decode_image(Image.new("RGB", (20, 10)))


def test_load_images_counts_bad_values(tmp_path):
    (tmp_path / "a.png").write_bytes(png("red", size=(100, 50)))
    images = load_images({"images": "a.png"}, tmp_path, 1, max_side=40)
    assert [i.size for i in images] == [(40, 20)]
    media = tmp_path / "media"
    media.mkdir()
    (media / "b.png").write_bytes(png("blue"))
    assert colour_of(load_images({"images": ["b.png"]}, tmp_path, 1, base_dirs=(media,))[0]) \
        == (0, 0, 255)
    for row, reason in [({"images": 7}, "bad_image_value"), ({"images": [7]}, "bad_image_value"),
                        ({"images": ["a.png", "a.png"]}, "image_count_mismatch"),
                        ({"images": [{"bytes": b"junk", "path": None}]}, "corrupt_image")]:
        with pytest.raises(BadRow) as info:
            load_images(row, tmp_path, 1)
        assert info.value.reason == reason


def test_row_tables_apply_the_stages_pixel_budget(tmp_path):
    """The row readers fit every image to ``data.min_pixels/max_pixels/max_image_side``: the
    warm-up's 560 px cap reaches the pixels the discriminator sees."""
    import json
    from types import SimpleNamespace

    from prism_megatron.data.rows import open_rows, row_images

    Image.new("RGB", (2000, 1000), (1, 2, 3)).save(tmp_path / "big.png")
    row = {"messages": [{"role": "user", "content": "<image>Q"},
                        {"role": "assistant", "content": "A"}], "images": ["big.png"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    cfg = SimpleNamespace(system_prompt="", image_root="", media_dir="", min_pixels=None,
                          max_pixels=None, max_image_side=560)
    (image,) = row_images(open_rows(tmp_path / "d.jsonl", data_cfg=cfg)[0])
    assert image.size == (560, 280)
    cfg.max_image_side, cfg.max_pixels = None, 768 * 768
    (image,) = row_images(open_rows(tmp_path / "d.jsonl", data_cfg=cfg)[0])
    assert image.size == (1086, 543)
    (image,) = row_images(open_rows(tmp_path / "d.jsonl")[0])
    assert image.size == (2000, 1000)
