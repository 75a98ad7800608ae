"""SFT data: row parsing, label masking, truncation, bad rows, packing, resumable sampling."""

import json

import pytest
import torch
from PIL import Image

from prism_megatron.data.collate import (collate, collate_packed, collate_padded, empty_batch,
                                         pack_greedy, pad_batch, segment_attention_mask,
                                         shifted_labels)
from prism_megatron.data.encode import IGNORE_INDEX, Encoded, encode_conversation, load_processor
from prism_megatron.data.sampler import ResumableSampler
from prism_megatron.data.sft import load_sft_samples
from prism_megatron.data.images import load_images
from prism_megatron.data.rows import row_messages
from prism_megatron.data.sharegpt import BadRow, count_placeholders

RESPONSE = "<caption>- 2 red cells</caption>\n<think>2 + 1 = 3</think>\n<answer>3</answer>"


def arange_positions(ids, grid):
    return torch.arange(len(ids)).expand(3, -1)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)


@pytest.fixture()
def image_dir(tmp_path):
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (96, 64), (0, 0, 255)).save(tmp_path / "blue.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    return tmp_path


def encode_row(row, processor, base, **kw):
    messages = row_messages(row)
    images = load_images(row, base, count_placeholders(messages))
    kw.setdefault("max_prompt_length", 512)
    kw.setdefault("max_response_length", 512)
    return encode_conversation(processor, messages, images, **kw)


def test_shifted_labels_only_predict_trained_tokens():
    sample = Encoded(torch.tensor([10, 11, 12, 13, 14]),
                     torch.tensor([False, False, False, True, True]), None, None)
    assert shifted_labels(sample).tolist() == [IGNORE_INDEX, IGNORE_INDEX, 13, 14, IGNORE_INDEX]


def test_only_assistant_tokens_are_trained(processor, image_dir):
    row = {"messages": [{"role": "user", "content": "<image>How many?"},
                        {"role": "assistant", "content": RESPONSE}], "images": ["red.png"]}
    sample = encode_row(row, processor, image_dir)
    tok = processor.tokenizer
    assert tok.decode(sample.input_ids[sample.trainable]) == RESPONSE + "<|im_end|>"
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    n_image_tokens = int((sample.input_ids == image_pad).sum())
    assert n_image_tokens == int(sample.image_grid_thw.prod()) // 4  # 2x2 merge
    assert not sample.trainable[sample.input_ids == image_pad].any()
    prompt = tok.decode(sample.input_ids[:sample.prompt_length])
    assert prompt.endswith("How many?<|im_end|>\n<|im_start|>assistant\n")


def test_multi_turn_trains_every_assistant_turn_and_both_layouts_agree(processor, image_dir):
    turns = [("human", "<image>First?"), ("gpt", "A1"), ("human", "<image>Second?"), ("gpt", "A2")]
    convo = {"conversations": [{"from": f, "value": v} for f, v in turns],
             "images": ["red.png", "blue.png"]}
    msgs = {"messages": [{"role": {"human": "user", "gpt": "assistant"}[f], "content": v}
                         for f, v in turns], "images": ["red.png", "blue.png"]}
    a, b = encode_row(convo, processor, image_dir), encode_row(msgs, processor, image_dir)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.trainable, b.trainable)
    tok = processor.tokenizer
    assert tok.decode(a.input_ids[a.trainable]) == "A1<|im_end|>A2<|im_end|>"
    assert a.image_grid_thw.tolist() == [[1, 4, 4], [1, 4, 6]]


def test_truncation_never_cuts_the_prompt(processor, image_dir):
    row = {"messages": [{"role": "user", "content": "<image>Q"},
                        {"role": "assistant", "content": RESPONSE}], "images": ["red.png"]}
    full = encode_row(row, processor, image_dir)
    cut = encode_row(row, processor, image_dir, max_response_length=5)
    assert int(cut.trainable.sum()) == 5
    assert torch.equal(cut.input_ids, full.input_ids[:full.prompt_length + 5])
    with pytest.raises(BadRow) as err:
        encode_row(row, processor, image_dir, max_prompt_length=full.prompt_length - 1)
    assert err.value.reason == "prompt_too_long"


def test_bad_rows_are_counted_by_reason_and_threshold_fails(processor, image_dir):
    good = {"messages": [{"role": "user", "content": "<image>Q"},
                         {"role": "assistant", "content": RESPONSE}], "images": ["red.png"]}
    bad = [
        dict(good, images=["nope.png"]),
        dict(good, images=["broken.png"]),
        dict(good, images=["red.png", "blue.png"]),
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}]},
    ]
    path = image_dir / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, good] + bad) + "\n")
    samples, stats = load_sft_samples([str(path)], processor, max_prompt_length=512,
                                      max_response_length=512, max_skip_fraction=0.7,
                                      progress=False)
    assert len(samples) == 2 and stats.seen == 6
    assert dict(stats.skipped) == {"missing_image": 1, "corrupt_image": 1,
                                   "image_count_mismatch": 1, "empty_assistant": 1}
    with pytest.raises(ValueError, match="too many unusable rows"):
        stats.check(0.5)


def test_packing_keeps_samples_apart():
    a = Encoded(torch.tensor([1, 2, 3]), torch.tensor([False, True, True]), None, None)
    b = Encoded(torch.tensor([4, 5]), torch.tensor([False, True]), None, None)
    c = Encoded(torch.tensor([6, 7, 8, 9]), torch.tensor([False, False, True, True]), None, None)
    assert pack_greedy([3, 2, 4], capacity=6) == [[1, 2], [0]]  # first-fit decreasing
    packed = collate_packed([a, b, c], 6, pad_id=0, position_fn=arange_positions)
    assert packed["input_ids"].tolist() == [[4, 5, 6, 7, 8, 9], [1, 2, 3, 0, 0, 0]]
    assert packed["labels"].tolist() == [[5, -100, -100, 8, 9, -100], [2, 3, -100, -100, -100, -100]]
    assert packed["segment_ids"].tolist() == [[1, 1, 2, 2, 2, 2], [1, 1, 1, 0, 0, 0]]
    assert packed["position_ids"][0, 0].tolist() == [0, 1, 0, 1, 2, 3]
    mask = segment_attention_mask(packed["segment_ids"])[0, 0]
    assert not mask[1, 0] and mask[2, 1] and mask[3, 0] and mask[0, 1]  # True = masked
    assert not mask[5, 2] and mask[5, 1]
    padded = collate_padded([a, b], pad_id=0, position_fn=arange_positions)
    assert padded["loss_mask"].tolist() == [[1, 1, 0], [1, 0, 0]]


def test_padding_a_collated_batch_equals_collating_at_that_length():
    a = Encoded(torch.tensor([1, 2, 3]), torch.tensor([False, True, True]), None, None)
    b = Encoded(torch.tensor([4, 5]), torch.tensor([False, True]), None, None)
    kwargs = dict(pad_id=7, position_fn=lambda ids, grid: torch.arange(1, len(ids) + 1).expand(3, -1))
    short = collate([a, b], [[0], [1], []], **kwargs)
    assert short["input_ids"].shape == (3, 3)
    padded, direct = pad_batch(short, 8, pad_id=7), collate([a, b], [[0], [1], []], length=8, **kwargs)
    assert padded.keys() == direct.keys()
    assert all(torch.equal(padded[k], direct[k]) for k in direct)
    assert padded["input_ids"][1].tolist() == [4, 5, 7, 7, 7, 7, 7, 7]
    empty = empty_batch(2, 8, pad_id=7)
    assert empty["input_ids"].tolist() == [[7] * 8] * 2 and empty["loss_mask"].sum() == 0
    with pytest.raises(ValueError, match="exceeds 2"):
        pad_batch(short, 2, pad_id=7)


def test_sampler_is_deterministic_and_resumes_mid_epoch():
    s = ResumableSampler(10, seed=3)
    first = s.next_indices(4)
    state = s.state_dict()
    rest = s.next_indices(13)  # crosses into epoch 1
    resumed = ResumableSampler(10, seed=3)
    resumed.load_state_dict(state)
    assert resumed.next_indices(13) == rest
    assert sorted(first + rest[:6]) == list(range(10))
    assert ResumableSampler(10, seed=3).next_indices(4) == first
    assert ResumableSampler(10, seed=4).next_indices(10) != first + rest[:6]


def test_bad_lines_of_any_kind_are_counted_rows_naming_file_and_line(image_dir, processor, caplog):
    """Issue 19 item 7: a broken JSON line, ``messages`` as a string, ``images`` as an integer,
    a non-object line and a Latin-1 line are counted bad rows (the log names file:line); the
    good rows still load."""
    good = {"messages": [{"role": "user", "content": "<image>Q"},
                         {"role": "assistant", "content": RESPONSE}], "images": ["red.png"]}
    path = image_dir / "mixed.jsonl"
    lines = [json.dumps(good).encode(), b'{"messages": [', json.dumps(dict(good, messages="Q")).encode(),
             json.dumps(dict(good, images=3)).encode(), b"[1, 2]",
             json.dumps(dict(good, images=["red.png"], note="caf\u00e9"),
                        ensure_ascii=False).encode("latin-1"), json.dumps(good).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    samples, stats = load_sft_samples([str(path)], processor, max_prompt_length=512,
                                      max_response_length=512, max_skip_fraction=0.8,
                                      progress=False)
    assert len(samples) == 2 and stats.seen == 7
    assert dict(stats.skipped) == {"bad_json": 1, "bad_messages": 1, "bad_images": 1,
                                   "not_an_object": 1, "bad_encoding": 1}
    assert f"{path}:2: Expecting value" in caplog.text and f"{path}:6: not UTF-8" in caplog.text
