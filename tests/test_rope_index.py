"""Qwen3-VL M-RoPE: the 3-D position index and the interleaved frequencies equal transformers'."""

from functools import partial
from types import SimpleNamespace

import pytest
import torch

from prism_megatron.models.qwen3_vl.rope import (
    InterleavedMRoPE, get_rope_index, interleaved_axis, rope_index, rope_index_for_sample)

IMAGE, VIDEO, START, END = 100, 101, 98, 99


def make_config(mrope_section=(24, 20, 20), head_dim=128, merge=2):
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=head_dim, intermediate_size=64,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                          "mrope_section": list(mrope_section),
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32,
                           out_hidden_size=64, spatial_merge_size=merge,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
        vision_end_token_id=END)


def hf_rope_index(config, input_ids, image_grid_thw, attention_mask):
    """transformers' Qwen3VLModel.get_rope_index, without building the model."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    fake = SimpleNamespace(config=config,
                           get_vision_position_ids=partial(Qwen3VLModel.get_vision_position_ids, None))
    mm_token_type_ids = (input_ids == config.image_token_id).int()
    return Qwen3VLModel.get_rope_index(fake, input_ids, mm_token_type_ids,
                                       image_grid_thw=image_grid_thw, attention_mask=attention_mask)


def sample(grids, merge=2, text=(3, 5, 2), seed=0):
    """Text, then per image: <vision_start> pads <vision_end> text."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 90, (text[0],), generator=gen).tolist()
    for k, (t, h, w) in enumerate(grids):
        ids += [START] + [IMAGE] * (t * h * w // merge ** 2) + [END]
        ids += torch.randint(0, 90, (text[(k + 1) % len(text)],), generator=gen).tolist()
    return ids


def batch(rows, pad_left=True):
    seq = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), seq, dtype=torch.long)
    mask = torch.zeros(len(rows), seq, dtype=torch.long)
    for b, r in enumerate(rows):
        cols = slice(seq - len(r), seq) if pad_left else slice(0, len(r))
        ids[b, cols], mask[b, cols] = torch.tensor(r), 1
    return ids, mask


CASES = {
    "text only": [[]],
    "one square image": [[(1, 4, 4)]],
    "two images of different sizes": [[(1, 4, 4), (1, 6, 4)]],
    "wide and tall images, batch of 3, padded": [[(1, 4, 8)], [(1, 8, 4), (1, 2, 2)], []],
    "odd merged grid": [[(1, 6, 10)], [(1, 10, 2)]],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("pad_left", [True, False])
def test_rope_index_equals_transformers(case, pad_left):
    config = make_config()
    rows = [sample(g, seed=i) for i, g in enumerate(CASES[case])]
    ids, mask = batch(rows, pad_left)
    grids = [g for row in CASES[case] for g in row]
    thw = torch.tensor(grids) if grids else None
    want_pos, want_delta = hf_rope_index(config, ids, thw, mask)
    got_pos, got_delta = rope_index(config, ids, thw, mask)
    assert got_pos.shape == (3, *ids.shape)
    assert torch.equal(got_pos, want_pos)
    assert torch.equal(got_delta, want_delta)


def test_rope_index_without_mask_and_per_sample():
    config = make_config()
    ids = torch.tensor([sample([(1, 4, 6), (1, 2, 2)])])
    thw = torch.tensor([[1, 4, 6], [1, 2, 2]])
    want, _ = hf_rope_index(config, ids, thw, None)
    assert torch.equal(rope_index(config, ids, thw)[0], want)
    assert torch.equal(rope_index_for_sample(ids[0], thw, hf_config=config), want[:, 0])
    # After an image the index jumps by max(h, w) / merge, not by the image's token count.
    assert int(want.max()) + 1 < ids.shape[1]


def test_merge_size_one():
    config = make_config(merge=1)
    ids = torch.tensor([sample([(1, 3, 5)], merge=1)])
    thw = torch.tensor([[1, 3, 5]])
    got = get_rope_index(ids, thw, image_token_id=IMAGE, spatial_merge_size=1)[0]
    assert torch.equal(got, hf_rope_index(config, ids, thw, None)[0])


def test_rope_index_errors_name_the_problem():
    config = make_config()
    ids = torch.tensor([sample([(1, 4, 4)])])
    with pytest.raises(ValueError, match="more image tokens"):
        rope_index(config, ids, None)
    with pytest.raises(ValueError, match="needs 9 tokens"):
        rope_index(config, ids, torch.tensor([[1, 6, 6]]))
    with pytest.raises(ValueError, match="describes 2 images"):
        rope_index(config, ids, torch.tensor([[1, 4, 4], [1, 4, 4]]))
    with pytest.raises(NotImplementedError, match="video"):
        rope_index(config, torch.tensor([[1, VIDEO, 2]]), None)


@pytest.mark.parametrize("section,head_dim", [((24, 20, 20), 128), ((16, 8, 8), 64),
                                               ((6, 5, 5), 32), ((4, 2, 2), 16)])
def test_interleaved_frequencies_equal_transformers(section, head_dim):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    config = make_config(section, head_dim)
    rows = [sample(g, seed=i) for i, g in enumerate(CASES["wide and tall images, batch of 3, padded"])]
    ids, mask = batch(rows)
    position_ids = rope_index(config, ids, torch.tensor([[1, 4, 8], [1, 8, 4], [1, 2, 2]]), mask)[0]
    hf = Qwen3VLTextRotaryEmbedding(config.text_config)
    cos, sin = hf(torch.zeros(1, dtype=torch.float32), position_ids)
    emb = InterleavedMRoPE(head_dim, 5e6, list(section))(position_ids)  # [S, B, 1, D]
    assert emb.shape == (ids.shape[1], ids.shape[0], 1, head_dim)
    angles = emb[:, :, 0].transpose(0, 1)
    assert torch.equal(angles.cos(), cos) and torch.equal(angles.sin(), sin)


def test_interleaved_axis_pattern():
    # Qwen3-VL's default [24, 20, 20] over 64 slots: t h w t h w ... for 60 slots, then t.
    axis = interleaved_axis(64, [24, 20, 20])
    assert axis[:6].tolist() == [0, 1, 2, 0, 1, 2] and axis[60:].tolist() == [0, 0, 0, 0]
    assert [int((axis == a).sum()) for a in range(3)] == [24, 20, 20]
