"""Qwen3-VL's vision tower on megatron-core.

pixels (already cut into patches by the processor, in 2x2 merge-block order)
  -> Conv3d patch embedding + learned position embedding resampled to each image's grid
  -> ViT blocks (megatron TransformerLayers, TP-sharded) with 2-D rotary attention inside each image
  -> patch merger: 2x2 neighbouring patches -> one LLM token (LayerNorm, fc1, GELU, fc2)
  -> DeepStack mergers on the outputs of some blocks, injected later into the first text layers.

Shapes inside the blocks follow megatron: ``[patches, 1, hidden]`` (sequence first, batch 1).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.utils import sharded_state_dict_default

from prism_megatron.models.qwen3_vl.specs import vision_block_spec

LAYERNORM_EPS = 1e-6  # transformers' Qwen3-VL vision norms


# ------------------------------------------------------------------------------ geometry

def patch_coordinates(grid_thw: Tensor, merge: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row, col, image height, image width) of every patch, in the processor's order: frame by
    frame, each frame as merge x merge blocks in raster order, raster order inside a block."""
    rows, cols, heights, widths = [], [], [], []
    for t, h, w in grid_thw.tolist():
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)
        rows.append(r.reshape(blocks).transpose(1, 2).flatten().repeat(t))
        cols.append(c.reshape(blocks).transpose(1, 2).flatten().repeat(t))
        heights.append(torch.full((t * h * w,), h))
        widths.append(torch.full((t * h * w,), w))
    return torch.cat(rows), torch.cat(cols), torch.cat(heights), torch.cat(widths)


def bilinear_taps(index: Tensor, size: Tensor, side: int) -> tuple[Tensor, Tensor]:
    """The two source cells and weights that ``F.interpolate(bilinear, align_corners=True)``
    blends for target ``index`` of an axis of length ``size`` read from a ``side``-long table."""
    src = index.float() * (side - 1) / torch.clamp(size - 1, min=1)
    floor = torch.floor(src)
    offsets = torch.arange(2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def rotary_2d(rows: Tensor, cols: Tensor, head_dim: int, theta: float) -> Tensor:
    """Axial 2-D rope angles ``[patches, 1, 1, head_dim]``: the first quarter of the slots turn
    with the row, the second with the column, and the second half repeats them (rotate-half)."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
    angles = torch.cat([rows[:, None].float() * inv_freq, cols[:, None].float() * inv_freq], -1)
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


def frame_cu_seqlens(grid_thw: Tensor) -> Tensor:
    """Cumulative patch counts of the attention segments: every frame attends only to itself."""
    lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


# ------------------------------------------------------------------------------ modules

class PatchEmbed(nn.Module):
    """A Conv3d whose kernel equals its stride: one linear map per (temporal x spatial) patch."""

    def __init__(self, hf_vision, dtype: torch.dtype):
        super().__init__()
        self.patch_shape = (hf_vision.in_channels, hf_vision.temporal_patch_size,
                            hf_vision.patch_size, hf_vision.patch_size)
        kernel = self.patch_shape[1:]
        self.proj = nn.Conv3d(hf_vision.in_channels, hf_vision.hidden_size, kernel_size=kernel,
                              stride=kernel, bias=True, dtype=dtype)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = pixel_values.view(-1, *self.patch_shape).to(self.proj.weight.dtype)
        return self.proj(x).view(x.shape[0], -1)


class PatchMerger(MegatronModule):
    """merge x merge patches -> one LLM token. The main merger normalises each patch before
    concatenating; the DeepStack mergers ("post-shuffle norm") normalise the concatenation."""

    def __init__(self, config, out_hidden: int, merge: int, postshuffle_norm: bool):
        super().__init__(config=config)
        self.in_dim = config.hidden_size * merge * merge
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.in_dim if postshuffle_norm else config.hidden_size,
                                 eps=LAYERNORM_EPS, dtype=config.params_dtype)
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            self.in_dim, self.in_dim, config=config, init_method=config.init_method, bias=True,
            gather_output=False, skip_bias_add=False)
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            self.in_dim, out_hidden, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False)

    def forward(self, hidden: Tensor) -> Tensor:
        """[patches, 1, H] -> [tokens, out_hidden]."""
        if self.postshuffle_norm:
            x = self.norm(hidden.reshape(-1, self.in_dim))
        else:
            x = self.norm(hidden).reshape(-1, self.in_dim)
        x, _ = self.linear_fc1(x[:, None])
        x, _ = self.linear_fc2(F.gelu(x))  # exact GELU here (the blocks use the tanh form)
        return x[:, 0]


class ShardedModuleList(nn.ModuleList):
    """A ModuleList whose members keep their own (TP-sharded) sharded_state_dict."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        out = {}
        for name, module in self.named_children():
            out.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets,
                                                  metadata))
        return out


class Qwen3VLVisionModel(MegatronModule):
    """Vision tower: ``forward(pixel_values, grid_thw) -> (image embeds [tokens, text hidden],
    DeepStack features [levels][tokens, text hidden])`` with tokens in image order."""

    def __init__(self, config, hf_vision, spec: str = "local"):
        super().__init__(config=config)
        self.spec = spec
        self.merge = hf_vision.spatial_merge_size
        self.head_dim = config.kv_channels
        self.rope_theta = float((hf_vision.rope_parameters or {}).get("rope_theta", 10000.0))
        self.grid_side = int(hf_vision.num_position_embeddings ** 0.5)
        self.deepstack_indexes = list(hf_vision.deepstack_visual_indexes or [])

        self.patch_embed = PatchEmbed(hf_vision, config.params_dtype)
        self.pos_embed = nn.Embedding(hf_vision.num_position_embeddings, config.hidden_size,
                                      dtype=config.params_dtype)
        self.decoder = TransformerBlock(config, vision_block_spec(config, spec),
                                        post_layer_norm=False, pre_process=True, post_process=False)
        merger = partial(PatchMerger, config, hf_vision.out_hidden_size, self.merge)
        self.merger = merger(postshuffle_norm=False)
        self.deepstack_mergers = ShardedModuleList(
            [merger(postshuffle_norm=True) for _ in self.deepstack_indexes])

    def position_embedding(self, rows, cols, heights, widths) -> Tensor:
        """The learned square grid of position embeddings, bilinearly resampled to each image."""
        h_taps, h_weights = bilinear_taps(rows, heights, self.grid_side)
        w_taps, w_weights = bilinear_taps(cols, widths, self.grid_side)
        taps = (h_taps[:, :, None] * self.grid_side + w_taps[:, None, :]).reshape(-1, 4)
        weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
        device = self.pos_embed.weight.device
        return (self.pos_embed(taps.to(device)) * weights.to(device)[:, :, None]).sum(1)

    def _attention_inputs(self, grid_thw: Tensor, device) -> tuple[Tensor | None, PackedSeqParams | None]:
        """Per-frame bidirectional attention: packed cu_seqlens for TE, else a block-diagonal mask
        ([1, 1, N, N], True = masked) for megatron's local DotProductAttention."""
        cu_seqlens = frame_cu_seqlens(grid_thw)
        if self.spec == "transformer_engine":
            longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            cu = cu_seqlens.to(device)
            return None, PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                         max_seqlen_q=longest, max_seqlen_kv=longest)
        segment = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1),
                                          (cu_seqlens[1:] - cu_seqlens[:-1]).long())
        mask = segment[:, None] != segment[None, :]
        return mask[None, None].to(device), None

    def _run_layer(self, layer, hidden, mask, rotary, packed_seq_params):
        def run(hidden, mask, rotary):
            return layer(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary,
                         packed_seq_params=packed_seq_params)[0]

        if self.config.recompute_granularity == "full" and self.training:
            return tensor_parallel.checkpoint(run, False, hidden, mask, rotary)
        return run(hidden, mask, rotary)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> tuple[Tensor, list[Tensor]]:
        grid_thw = grid_thw.cpu().long()
        device = self.pos_embed.weight.device
        rows, cols, heights, widths = patch_coordinates(grid_thw, self.merge)
        hidden = self.patch_embed(pixel_values.to(device))
        hidden = hidden + self.position_embedding(rows, cols, heights, widths).to(hidden.dtype)
        rotary = rotary_2d(rows, cols, self.head_dim, self.rope_theta).to(device)
        mask, packed_seq_params = self._attention_inputs(grid_thw, device)

        hidden = hidden[:, None]  # [N, 1, H]
        deepstack = []
        for index, layer in enumerate(self.decoder.layers):
            hidden = self._run_layer(layer, hidden, mask, rotary, packed_seq_params)
            if index in self.deepstack_indexes:
                deepstack.append(self.deepstack_mergers[self.deepstack_indexes.index(index)](hidden))
        return self.merger(hidden), deepstack
