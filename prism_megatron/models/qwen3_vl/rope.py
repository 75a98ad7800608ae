"""Qwen3-VL's multimodal rotary position embedding (M-RoPE) for the text decoder.

Every token gets a 3-D position (t, h, w). Text tokens use the same running index on all three
axes; the tokens of an image (after 2x2 patch merging) sit on a grid: t is the image's start
position, h/w its start plus the merged row/column. After an image the running index jumps by
``max(h, w) / merge`` rather than by its token count. This is the one implementation of that rule
(the equivalent of transformers' ``get_rope_index`` for images), shared by SFT, rollouts and scoring.

The rotary frequencies then take each frequency slot from one axis in an INTERLEAVED pattern
(slot j: h if j % 3 == 1, w if j % 3 == 2, within ``3 * mrope_section[axis]`` slots; t otherwise),
unlike Qwen2-VL's contiguous [t | h | w] sections that megatron's MultimodalRotaryEmbedding builds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _runs(mask: Tensor) -> list[tuple[bool, int, int]]:
    """Maximal runs of equal values in a 1-D bool tensor as (value, start, end)."""
    if mask.numel() == 0:
        return []
    change = torch.nonzero(mask[1:] != mask[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), mask.numel()]
    return [(bool(mask[s]), s, e) for s, e in zip(bounds[:-1], bounds[1:])]


def _image_positions(start: int, grid_thw: Tensor, merge: int) -> Tensor:
    """[3, t*h*w/merge^2] positions of one image's merged tokens, offset by ``start``."""
    t, h, w = (int(x) for x in grid_thw)
    gh, gw = h // merge, w // merge
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def get_rope_index(input_ids: Tensor, image_grid_thw: Tensor | None = None,
                   attention_mask: Tensor | None = None, *, image_token_id: int,
                   spatial_merge_size: int, video_token_id: int | None = None,
                   video_grid_thw: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """3-D position ids ``[3, B, S]`` and the per-row offsets ``[B, 1]`` that continue them during
    decoding (``max position + 1 - valid length``), as transformers computes them.

    ``image_grid_thw`` lists the images of the whole batch in order (row by row). Tokens masked
    out by ``attention_mask`` ([B, S], 1 = real) are skipped and get position 0.
    """
    if video_grid_thw is not None or (video_token_id is not None
                                      and bool((input_ids == video_token_id).any())):
        raise NotImplementedError("video inputs are not supported by this rope index yet")
    batch, seq = input_ids.shape
    position_ids = torch.zeros(3, batch, seq, dtype=torch.long)
    deltas = torch.zeros(batch, 1, dtype=torch.long)
    grids = list(image_grid_thw.cpu()) if image_grid_thw is not None else []
    next_grid = 0
    for b in range(batch):
        valid = (attention_mask[b].bool().cpu() if attention_mask is not None
                 else torch.ones(seq, dtype=torch.bool))
        tokens = input_ids[b].cpu()[valid]
        pieces, pos = [], 0
        for is_image, start, end in _runs(tokens == image_token_id):
            if not is_image:
                pieces.append(torch.arange(end - start).expand(3, -1) + pos)
                pos += end - start
                continue
            # A run of image tokens holds one image (several only if nothing separates them).
            while start < end:
                if next_grid >= len(grids):
                    raise ValueError(f"row {b} has more image tokens than image_grid_thw describes "
                                     f"({len(grids)} images)")
                grid = grids[next_grid]
                next_grid += 1
                image = _image_positions(pos, grid, spatial_merge_size)
                if start + image.shape[1] > end:
                    raise ValueError(f"row {b}: image {next_grid - 1} with grid {grid.tolist()} needs "
                                     f"{image.shape[1]} tokens but its run has {end - start}")
                pieces.append(image)
                pos += max(int(grid[1]), int(grid[2])) // spatial_merge_size
                start += image.shape[1]
        if pieces:
            row = torch.cat(pieces, dim=1)
            position_ids[:, b, valid] = row
            deltas[b] = row.max() + 1 - tokens.numel()
    if next_grid != len(grids):
        raise ValueError(f"image_grid_thw describes {len(grids)} images but the input ids hold "
                         f"image tokens for {next_grid}")
    return position_ids.to(input_ids.device), deltas.to(input_ids.device)


def rope_index(hf_config, input_ids: Tensor, image_grid_thw: Tensor | None = None,
               attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``get_rope_index`` with the token ids and merge size read from a ``Qwen3VLConfig``."""
    return get_rope_index(input_ids, image_grid_thw, attention_mask,
                          image_token_id=hf_config.image_token_id,
                          video_token_id=hf_config.video_token_id,
                          spatial_merge_size=hf_config.vision_config.spatial_merge_size)


def rope_index_for_sample(input_ids: Tensor, image_grid_thw: Tensor | None = None, *,
                          hf_config) -> Tensor:
    """``[3, S]`` positions of one unpadded sample (the data pipeline's position function)."""
    return rope_index(hf_config, input_ids[None], image_grid_thw)[0][:, 0]


# ------------------------------------------------------------------------------ frequencies

def interleaved_axis(num_slots: int, section: list[int]) -> Tensor:
    """Which position axis (0 = t, 1 = h, 2 = w) drives each of the ``head_dim / 2`` slots."""
    axis = torch.zeros(num_slots, dtype=torch.long)
    for a in (1, 2):
        axis[a:min(3 * section[a], num_slots):3] = a
    return axis


class InterleavedMRoPE(nn.Module):
    """Rotary angles ``[S, B, 1, head_dim]`` for megatron's (non-interleaved, rotate-half)
    ``apply_rotary_pos_emb`` from 3-D position ids ``[3, B, S]``.

    Drop-in for GPTModel's ``rotary_pos_emb`` (same call signature as megatron's
    MultimodalRotaryEmbedding), so the attention layers apply it unchanged.
    """

    def __init__(self, head_dim: int, rope_theta: float, section: list[int]):
        super().__init__()
        # Same expression as transformers, so the fp32 frequencies are bit-identical. Plain
        # attributes, not buffers: a bf16 cast of the model must not round them.
        self.inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float)
                                              / head_dim))
        self.axis = interleaved_axis(head_dim // 2, section)

    def forward(self, position_ids: Tensor, mrope_section=None, cp_group=None) -> Tensor:
        if cp_group is not None and cp_group.size() > 1:
            raise NotImplementedError("context parallelism is not supported for Qwen3-VL yet")
        if position_ids.dim() == 2:  # [B, S] text-only positions: the same on all axes
            position_ids = position_ids.expand(3, -1, -1)
        device = position_ids.device
        angles = position_ids[..., None].float() * self.inv_freq.to(device)             # [3,B,S,D/2]
        index = self.axis.to(device).view(1, 1, 1, -1).expand(1, *angles.shape[1:])
        angles = angles.gather(0, index)[0]                                              # [B,S,D/2]
        emb = torch.cat([angles, angles], dim=-1)
        return emb.transpose(0, 1)[:, :, None, :].contiguous()                           # [S,B,1,D]
