"""Packed micro-batches under both attention layouts (data/packing.py), against unpacked samples.

* THD plumbing: ``cu_seqlens`` of a packed ``[B, S]`` batch, per-sample M-RoPE positions and the
  DeepStack / image features each sample gets in the flattened ``[1, B * S]`` order, checked
  against the values of every sample run alone.
* Transformer Engine's THD attention does not run on CPU, so the end-to-end THD forward runs the
  model's real THD path (flattening, megatron's THD rotary with ``cu_seqlens``, DeepStack, the
  reshape back) with the core attention swapped for a per-sequence torch SDPA reference that reads
  the same ``PackedSeqParams``: per-sample losses equal the unpacked ones. The block-mask path
  (local spec) is checked the same way.
* The refusals: THD params on the local spec; a dense mask on a TE-spec model.
"""

from __future__ import annotations

import pytest
import torch

from prism_megatron.data import packing
from prism_megatron.data.collate import collate, collate_packed
from prism_megatron.data.encode import Encoded

TOL = 1e-5


@pytest.fixture(scope="module")
def megatron_tp1():
    from prism_megatron.distributed import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=1, seed=1234)
    yield
    destroy_distributed()


@pytest.fixture(scope="module")
def model(megatron_tp1, tiny_model_dir):
    from prism_megatron.models.qwen3_vl.model import build_qwen3vl_model

    model, _ = build_qwen3vl_model(str(tiny_model_dir))
    return model.eval()


def make_sample(hf, grids, length: int, seed: int) -> Encoded:
    """Random text with ``grids`` images (vision start, image pads, vision end); the tokens
    after the first 4 are trained on."""
    gen = torch.Generator().manual_seed(seed)
    vc, merge = hf.vision_config, hf.vision_config.spatial_merge_size
    special = min(hf.image_token_id, hf.vision_start_token_id, hf.vision_end_token_id,
                  hf.video_token_id)
    ids = []
    for grid in grids:
        ids += torch.randint(3, special, (2,), generator=gen).tolist()
        ids += [hf.vision_start_token_id] + [hf.image_token_id] * (
            grid[0] * grid[1] * grid[2] // merge ** 2) + [hf.vision_end_token_id]
    ids += torch.randint(3, special, (length - len(ids),), generator=gen).tolist()
    trainable = torch.zeros(length, dtype=torch.bool)
    trainable[4:] = True
    pixels = thw = None
    if grids:
        thw = torch.tensor(grids)
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        pixels = torch.randn(int(thw.prod(-1).sum()), patch_dim, generator=gen)
    return Encoded(torch.tensor(ids), trainable, pixels, thw)


@pytest.fixture(scope="module")
def samples(model):
    hf = model.hf_config
    # 17, 13 and 9 tokens packed into rows of 24: [[C], [A, B]] with padding tails of 7 and 2
    return [make_sample(hf, [(1, 4, 4)], 13, 1), make_sample(hf, [], 9, 2),
            make_sample(hf, [(1, 6, 4), (1, 4, 4)], 21, 3)]


def position_fn(model):
    from functools import partial

    from prism_megatron.models.qwen3_vl.rope import rope_index_for_sample

    return partial(rope_index_for_sample, hf_config=model.hf_config)


def packed_batch(model, samples, capacity: int = 24) -> tuple[dict, list[list[int]]]:
    rows = [[2], [0, 1]]
    batch = collate(samples, rows, pad_id=0, position_fn=position_fn(model), length=capacity)
    return batch, rows


# ------------------------------------------------------------------------------ plumbing

def test_cu_seqlens_of_a_packed_batch():
    segments = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    # rows flattened: [1 1][2 2 2][0] | [1 1 1 1 1 1] | [1][0 0 0 0 0]; a row boundary always
    # starts a sequence, even when the next row starts with the same id
    assert packing.segment_lengths(segments) == [2, 3, 1, 6, 1, 5]
    params = packing.thd_params(segments)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q.tolist() == [0, 2, 5, 6, 12, 13, 18]
    assert params.cu_seqlens_kv.tolist() == params.cu_seqlens_q.tolist()
    assert params.max_seqlen_q == params.max_seqlen_kv == 6
    assert packing.packed_seq_params([4, 1, 3]).cu_seqlens_q.tolist() == [0, 4, 5, 8]
    with pytest.raises(ValueError, match=">= 1"):
        packing.packed_seq_params([3, 0])


def test_layout_follows_the_spec():
    assert packing.layout_for_spec("transformer_engine") == "thd"
    assert packing.layout_for_spec("local") == "mask"


def test_thd_positions_restart_per_sample(model, samples):
    batch, rows = packed_batch(model, samples)
    flat = packing.flatten_rows(batch["position_ids"], 1)            # [3, 1, B * S]
    cu = packing.thd_params(batch["segment_ids"]).cu_seqlens_q.tolist()
    # THD sequences: C, padding, A, B, padding
    assert cu == [0, 21, 24, 37, 46, 48]
    fn = position_fn(model)
    for k, index in ((0, 2), (2, 0), (3, 1)):
        want = fn(samples[index].input_ids, samples[index].image_grid_thw)
        assert torch.equal(flat[:, 0, cu[k]:cu[k + 1]], want)
    # the image of C moves the text index by max(h, w) / merge, not by its token count
    assert int(flat[0, 0, cu[1] - 1]) < cu[1] - cu[0] - 1


def test_thd_deepstack_and_image_features_land_on_their_sample(model, samples):
    batch, rows = packed_batch(model, samples)
    cu = packing.thd_params(batch["segment_ids"]).cu_seqlens_q.tolist()
    with torch.no_grad():
        packed, packed_context = model._embed(packing.flatten_rows(batch["input_ids"]),
                                              batch["pixel_values"], batch["image_grid_thw"])
        assert packed.shape[:2] == (48, 1) and packed_context.shape[:3] == (
            model.deepstack_levels, 48, 1)
        for k, index in ((0, 2), (2, 0), (3, 1)):
            s = samples[index]
            alone, context = model._embed(s.input_ids[None], s.pixel_values, s.image_grid_thw)
            span = slice(cu[k], cu[k + 1])
            assert torch.allclose(packed[span], alone, atol=TOL, rtol=0)  # vision batched
            if context is None:                       # no image: no DeepStack feature here
                assert not packed_context[:, span].any()
            else:
                assert torch.allclose(packed_context[:, span], context, atol=TOL, rtol=0)
                assert context.abs().sum() > 0


# ------------------------------------------------------------------------------ end to end

class TorchTHDAttention(torch.nn.Module):
    """Reference THD core attention on CPU: causal SDPA within each ``cu_seqlens`` sequence
    (what TEDotProductAttention computes with qkv_format="thd", padding_causal)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        assert attention_mask is None and packed_seq_params.qkv_format == "thd"
        self.calls += 1
        cu = packed_seq_params.cu_seqlens_q.tolist()
        assert query.shape[0] == cu[-1]                       # [T, heads, head_dim]
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        out = [torch.nn.functional.scaled_dot_product_attention(
            query[s:e].transpose(0, 1), key[s:e].transpose(0, 1), value[s:e].transpose(0, 1),
            is_causal=True).transpose(0, 1) for s, e in zip(cu[:-1], cu[1:])]
        return torch.cat(out).reshape(cu[-1], -1)


def swap_attention(model, attentions):
    layers = [layer.self_attention for layer in model.language_model.decoder.layers]
    local = [attention.core_attention for attention in layers]
    for attention, reference in zip(layers, attentions):
        attention.core_attention = reference
    return lambda: [setattr(a, "core_attention", core) for a, core in zip(layers, local)]


def per_sample_losses(model, batch, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["input_ids"], batch["position_ids"],
                     pixel_values=batch.get("pixel_values"),
                     image_grid_thw=batch.get("image_grid_thw"),
                     labels=batch["labels"].clamp(min=0), **kwargs)


def unpacked_losses(model, samples) -> list[torch.Tensor]:
    out = []
    for s in samples:
        batch = collate([s], [[0]], pad_id=0, position_fn=position_fn(model))
        loss = per_sample_losses(model, batch)[0]
        out.append(loss[batch["loss_mask"][0].bool()])
    return out


def sample_losses(loss, batch, rows) -> dict[int, torch.Tensor]:
    out = {}
    for r, row in enumerate(rows):
        for segment, index in enumerate(row, start=1):
            where = (batch["segment_ids"][r] == segment) & batch["loss_mask"][r].bool()
            out[index] = loss[r][where]
    return out


@pytest.mark.parametrize("layout", ["thd", "mask"])
def test_packed_losses_equal_unpacked_per_sample(model, samples, layout, monkeypatch):
    want = unpacked_losses(model, samples)
    batch, rows = packed_batch(model, samples)
    attentions = ([TorchTHDAttention() for _ in model.language_model.decoder.layers]
                  if layout == "thd" else [])
    if layout == "thd":
        monkeypatch.setattr(model, "packed_layout", "thd")
    restore = swap_attention(model, attentions)
    try:
        loss = per_sample_losses(model, batch, segment_ids=batch["segment_ids"])
    finally:
        restore()
    assert loss.shape == batch["input_ids"].shape                # [B, S] whatever the layout
    got = sample_losses(loss, batch, rows)
    for index, expected in enumerate(want):
        assert got[index].shape == expected.shape and len(expected) > 0
        assert torch.allclose(got[index], expected, atol=TOL, rtol=0), (
            layout, index, (got[index] - expected).abs().max())
    assert [a.calls for a in attentions] == [1] * len(attentions)


def test_hf_padding_mask_runs_as_thd_sequences(model, samples, monkeypatch):
    """A left-padded batch with an HF ``[B, S]`` mask (the padding and the tokens of each row are
    two THD sequences) gives the local spec's masked logits at every real token."""
    a, c = samples[0], samples[2]
    width = len(c.input_ids)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    ids[0, width - len(a.input_ids):], mask[0, width - len(a.input_ids):] = a.input_ids, 1
    ids[1], mask[1] = c.input_ids, 1
    inputs = dict(attention_mask=mask, pixel_values=torch.cat([a.pixel_values, c.pixel_values]),
                  image_grid_thw=torch.cat([a.image_grid_thw, c.image_grid_thw]))
    with torch.no_grad():
        want = model(ids, **inputs)
        monkeypatch.setattr(model, "packed_layout", "thd")
        restore = swap_attention(model, [TorchTHDAttention()
                                         for _ in model.language_model.decoder.layers])
        try:
            got = model(ids, **inputs)
        finally:
            restore()
    real = mask.bool()
    assert got.shape == want.shape
    assert torch.allclose(got[real], want[real], atol=1e-4, rtol=0), (
        (got[real] - want[real]).abs().max())


def test_packing_sft_batches_keeps_capacity_rows(model, samples):
    """``collate_packed`` rows turn into THD sequences that cover the whole flattened row."""
    batch = collate_packed(samples, 32, pad_id=0, position_fn=position_fn(model))
    lengths = packing.segment_lengths(batch["segment_ids"])
    # first-fit-decreasing into 32, index order per row: [B(9), C(21), pad 2], [A(13), pad 19]
    assert lengths == [9, 21, 2, 13, 19]
    assert sum(lengths) == batch["input_ids"].numel()


# ------------------------------------------------------------------------------ refusals

def test_local_spec_refuses_thd(model, samples):
    batch, _ = packed_batch(model, samples)
    with pytest.raises(ValueError, match="needs model.spec=transformer_engine"):
        per_sample_losses(model, batch, packed_seq_params=packing.thd_params(batch["segment_ids"]))


def test_te_spec_refuses_a_dense_mask(model, samples, monkeypatch):
    batch, _ = packed_batch(model, samples)
    monkeypatch.setattr(model, "spec", "transformer_engine")
    with pytest.raises(ValueError, match="ignore an explicit"):
        per_sample_losses(model, batch,
                          attention_mask=packing.segment_attention_mask(batch["segment_ids"]))
    with pytest.raises(ValueError, match="not both"):
        per_sample_losses(model, batch, segment_ids=batch["segment_ids"],
                          attention_mask=torch.ones_like(batch["input_ids"]))
