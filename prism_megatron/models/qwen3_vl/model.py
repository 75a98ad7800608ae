"""Qwen3-VL on megatron-core: vision tower + Qwen3 text decoder (megatron GPTModel), TP and PP.

Pipeline placement: the vision tower and the token embedding live on the first stage, the final
norm, output layer and loss on the last. DeepStack adds visual features after the first ``K``
text layers (``K`` = number of DeepStack mergers). When a split puts one of those layers on a
later stage, the features travel with the hidden states: every stage boundary then carries
``[S, B, H * (1 + K)]`` (hidden states, then the K dense feature maps), and the config turns on
``variable_seq_lengths`` so megatron's schedules exchange that shape.

Numerics follow transformers' Qwen3VLForConditionalGeneration; the padded vocabulary rows (TP)
are masked to the dtype's minimum in the logits so that the loss and any softmax ignore them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.spec_utils import build_module

from prism_megatron.data import packing
from prism_megatron.models.qwen3_vl import config as qcfg
from prism_megatron.models.qwen3_vl.rope import InterleavedMRoPE, rope_index
from prism_megatron.models.qwen3_vl.specs import get_backend, text_block_spec
from prism_megatron.models.qwen3_vl.vision import Qwen3VLVisionModel
from prism_megatron.weights.layout import vocab_padding
from prism_megatron.weights.load import load_megatron_checkpoint


def deepstack_levels(hf) -> int:
    """Text layers that receive DeepStack features (transformers skips features beyond the last
    layer)."""
    return min(len(hf.vision_config.deepstack_visual_indexes or []), hf.text_config.num_hidden_layers)


def causal_padding_mask(attention_mask: Tensor) -> Tensor:
    """HF-style ``[B, S]`` (1 = token, 0 = padding) -> megatron ``[B, 1, S, S]`` bool, True =
    masked: causal, and never attending to padding."""
    seq = attention_mask.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    return ~allowed[:, None]


class Qwen3VLModel(MegatronModule):
    """One pipeline stage of Qwen3-VL.

    ``forward`` returns logits ``[B, S, V]`` (``labels`` None; gathered over TP, padding columns
    dropped, unless ``parallel_output`` / ``runtime_gather_output`` keep them vocab-parallel),
    the per-token loss ``[B, S]`` (``labels`` given, megatron convention: ``labels[t]`` is the
    target of position ``t``), or on a non-last stage the tensor for the next stage.
    """

    def __init__(self, hf_config, text_config, vision_config, *, spec: str = "local",
                 pre_process: bool = True, post_process: bool = True,
                 parallel_output: bool = True, padded_vocab_size: int | None = None,
                 block_spec=None, lm_head: bool = True):
        # block_spec: the text decoder's TransformerBlockSubmodules (default text_block_spec;
        # the MoE discriminator passes MoE layers). lm_head=False: no output layer (nothing to
        # tie); the last stage returns the final-norm hidden states [S, B, H] instead of logits.
        super().__init__(config=text_config)
        text = hf_config.text_config
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = text_config.pipeline_model_parallel_size
        if text_config.context_parallel_size > 1:
            raise NotImplementedError("context parallelism is not supported for Qwen3-VL yet")
        if text_config.virtual_pipeline_model_parallel_size:
            raise NotImplementedError("virtual (interleaved) pipeline stages are not supported "
                                      "for Qwen3-VL yet")
        get_backend(spec)  # fails early, with the install hint, when TE is missing
        self.hf_config = hf_config
        self.spec = spec
        # How packed samples are kept apart (data/packing.py): THD on TE, the block mask locally.
        self.packed_layout = packing.layout_for_spec(spec)
        self.pre_process, self.post_process = pre_process, post_process
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.image_token_id = hf_config.image_token_id
        self.vocab_size = text.vocab_size
        self.padded_vocab_size = padded_vocab_size or qcfg.padded_vocab_size(text.vocab_size, tp)
        self.deepstack_levels = deepstack_levels(hf_config)
        self.carry_deepstack = pp > 1 and self.deepstack_levels > self._first_stage_layers()
        if self.carry_deepstack:
            # Stage boundaries carry more than [S, B, H]: let the schedules exchange shapes.
            text_config.variable_seq_lengths = True

        self.vision_model = (Qwen3VLVisionModel(vision_config, hf_config.vision_config, spec)
                             if pre_process else None)
        block_spec = block_spec or text_block_spec(text_config, spec)
        self.language_model = GPTModel(
            config=text_config, transformer_layer_spec=block_spec,
            vocab_size=self.padded_vocab_size, max_sequence_length=text.max_position_embeddings,
            pre_process=pre_process, post_process=post_process and lm_head,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=lm_head and qcfg.tie_word_embeddings(hf_config),
            position_embedding_type="mrope",
            rotary_base=qcfg.rope_theta(hf_config),
            # Sequence parallelism: the image features go in before the scatter (_embed).
            scatter_embedding_sequence_parallel=False)
        # Megatron's mrope lays Qwen2-VL's contiguous sections out; Qwen3-VL interleaves them.
        self.language_model.rotary_pos_emb = InterleavedMRoPE(
            text_config.kv_channels, qcfg.rope_theta(hf_config), text_config.mrope_section)
        if post_process and not lm_head:  # GPTModel built without post-processing: add the norm
            self.language_model.decoder.final_layernorm = build_module(
                block_spec.layer_norm, config=text_config, hidden_size=text_config.hidden_size,
                eps=text_config.layernorm_epsilon)
        if post_process and lm_head and self.padded_vocab_size > self.vocab_size:
            self.language_model.output_layer.register_forward_hook(self._mask_padded_vocab)
        self._input_tensor = None

    def _first_stage_layers(self) -> int:
        if self.config.pipeline_model_parallel_size == 1:
            return self.config.num_layers
        return get_num_layers_to_build(self.config, pp_rank=0)

    # ---- megatron plumbing ------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        """The previous stage's output (megatron's pipeline schedules call this)."""
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "Qwen3-VL takes one tensor from the previous stage"
            input_tensor = input_tensor[0]
        self._input_tensor = input_tensor

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> Tensor | None:
        """For megatron's tied-embedding gradient all-reduce between first and last stage."""
        return self.language_model.shared_embedding_or_output_weight()

    def pipeline_hidden_size(self) -> int:
        """Last dimension of the tensor sent between stages."""
        return self.config.hidden_size * (1 + (self.deepstack_levels if self.carry_deepstack else 0))

    def _mask_padded_vocab(self, module, inputs, output):
        logits, bias = output
        width = logits.shape[-1]
        start = 0 if width == self.padded_vocab_size else (
            parallel_state.get_tensor_model_parallel_rank() * width)
        padding = vocab_padding(start, width, self.vocab_size, logits.device)
        if padding is None:
            return output
        return logits.masked_fill(padding, torch.finfo(logits.dtype).min), bias

    # ---- forward ----------------------------------------------------------------------------
    def _embed(self, input_ids: Tensor, pixel_values: Tensor | None,
               image_grid_thw: Tensor | None, image_mask: Tensor | None = None
               ) -> tuple[Tensor, Tensor | None]:
        """Token embeddings ``[S, B, H]`` with image features at the image tokens (``image_mask``
        ``[B, S]``, default: every image-pad id), and the dense DeepStack features
        ``[K, S, B, H]`` (zero elsewhere; None without images)."""
        embeds = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        if pixel_values is None:
            return self._scatter_sequence(embeds), None
        image_embeds, deepstack = self.vision_model(pixel_values, image_grid_thw)
        if image_mask is None:
            image_mask = input_ids == self.image_token_id
        image_mask = image_mask[..., None]  # [B, S, 1]
        if int(image_mask.sum()) != image_embeds.shape[0]:
            raise ValueError(f"{int(image_mask.sum())} image tokens in input_ids but the images give "
                             f"{image_embeds.shape[0]} features (check image_grid_thw)")
        dtype = embeds.dtype
        # Scatter in [B, S] order, the order the processor lays images out in.
        embeds = embeds.transpose(0, 1).masked_scatter(image_mask, image_embeds.to(dtype))
        levels = [torch.zeros_like(embeds).masked_scatter(image_mask, f.to(dtype))
                  for f in deepstack[:self.deepstack_levels]]
        context = torch.stack(levels).transpose(1, 2) if levels else None
        if context is not None and self.config.sequence_parallel:   # [K, S, B, H]: split S
            context = self._scatter_sequence(context.transpose(0, 1)).transpose(0, 1)
        return self._scatter_sequence(embeds.transpose(0, 1).contiguous()), context

    def _scatter_sequence(self, x: Tensor) -> Tensor:
        """Sequence parallelism: this TP rank's contiguous S/tp slice of ``[S, ...]`` (the
        vision tower and the embedding are replicated over TP, so backward gathers)."""
        if not self.config.sequence_parallel:
            return x
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if x.shape[0] % tp:
            raise ValueError(f"sequence parallelism splits the sequence over tp={tp} ranks: "
                             f"the micro-batch's {x.shape[0]} positions must be a multiple of it "
                             f"(pad the sequence length)")
        return tensor_parallel.scatter_to_sequence_parallel_region(x).contiguous()

    def _pack(self, hidden: Tensor, context: Tensor | None) -> Tensor:
        if not self.carry_deepstack:
            return hidden
        return torch.cat([hidden, context.permute(1, 2, 0, 3).flatten(2)], dim=-1)

    def _unpack(self, received: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self.carry_deepstack:
            return received, None
        hidden_size = self.config.hidden_size
        context = received[..., hidden_size:].unflatten(-1, (self.deepstack_levels, hidden_size))
        return received[..., :hidden_size].contiguous(), context.permute(2, 0, 1, 3)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                image_grid_thw: Tensor | None = None, labels: Tensor | None = None, *,
                image_mask: Tensor | None = None, segment_ids: Tensor | None = None,
                packed_seq_params=None, runtime_gather_output: bool | None = None) -> Tensor:
        """``attention_mask``: None (causal), HF-style ``[B, S]`` padding mask, or megatron's
        ``[B, 1, S, S]`` bool (True = masked; local spec only). ``segment_ids`` ``[B, S]`` (1..
        per packed sample, 0 = padding; instead of a mask): samples attend only within
        themselves, through the layout the spec honours (data/packing.py: THD on TE, the block
        mask locally); outputs keep the ``[B, S]`` layout. ``position_ids`` ``[3, B, S]``;
        computed from the ids, image grids and 2-D mask when None. ``image_mask`` ``[B, S]``:
        where the image features go when not every image-pad id is a prompt image (sampled
        responses may contain one; generation embeds it as a plain token)."""
        if packed_seq_params is not None and self.spec == "local":
            raise ValueError("packed_seq_params (THD) needs model.spec=transformer_engine: the "
                             "local spec's DotProductAttention cannot run THD; pass segment_ids "
                             "(block mask) instead")
        if attention_mask is not None and attention_mask.dim() == 4 and self.spec != "local":
            raise ValueError("Transformer Engine's causal layers ignore an explicit [B, 1, S, S] "
                             "attention mask (packed samples would attend to each other): pass "
                             "segment_ids, which run as THD packed sequences")
        mask_2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if position_ids is None:
            position_ids = rope_index(self.hf_config, input_ids, image_grid_thw, mask_2d)[0]
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(f"position_ids must be [3, B, S] (M-RoPE), got {tuple(position_ids.shape)}")
        if mask_2d is not None and self.packed_layout == "thd" and segment_ids is None:
            # TE takes no dense mask: the (left- or right-) padded rows run as THD sequences.
            segment_ids, attention_mask = mask_2d.long(), None
        elif mask_2d is not None:
            attention_mask = causal_padding_mask(mask_2d)
        rows = None                      # THD: the [B, S] shape the outputs go back to
        if segment_ids is not None:
            if attention_mask is not None or packed_seq_params is not None:
                raise ValueError("pass segment_ids or attention_mask / packed_seq_params, not both")
            if self.packed_layout == "mask":
                attention_mask = packing.segment_attention_mask(segment_ids)
            else:
                if self.config.sequence_parallel:
                    raise NotImplementedError("THD packed sequences with sequence parallelism "
                                              "are not supported yet (stage boundaries would "
                                              "carry sequence slices of the flattened rows)")
                rows = tuple(segment_ids.shape)
                packed_seq_params = packing.thd_params(segment_ids)
                input_ids, position_ids = (packing.flatten_rows(input_ids),
                                           packing.flatten_rows(position_ids, 1))
                labels = packing.flatten_rows(labels) if labels is not None else None
                image_mask = packing.flatten_rows(image_mask) if image_mask is not None else None

        decoder_input = context = None
        if self.pre_process:
            decoder_input, context = self._embed(input_ids, pixel_values, image_grid_thw,
                                                 image_mask)
            if self.carry_deepstack and context is None:
                context = decoder_input.new_zeros(self.deepstack_levels, *decoder_input.shape)
        else:
            received = self._input_tensor
            if rows is not None:         # stages exchange [S, B, X] whatever the layout
                received = packing.sbh_to_thd(received)
            hidden, context = self._unpack(received)
            self.language_model.set_input_tensor(hidden)

        if labels is not None:
            runtime_gather_output = False  # the vocab-parallel loss needs the logits sharded
        output = self.language_model(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels,
            packed_seq_params=packed_seq_params, runtime_gather_output=runtime_gather_output,
            extra_block_kwargs={"context": context} if context is not None else None)
        if not self.post_process:
            output = self._pack(output, context)
        elif not self.language_model.post_process and self.config.sequence_parallel:
            # final-norm hidden states of the last stage: the whole sequence on every TP rank
            # (what follows them is replicated over TP, so backward keeps this rank's slice)
            output = tensor_parallel.gather_from_sequence_parallel_region(
                output, tensor_parallel_output_grad=False)
        if not self.post_process or not self.language_model.post_process:   # hidden states
            return packing.thd_to_sbh(output, rows[0]) if rows is not None else output
        if rows is not None:             # [1, B * S, ...] -> [B, S, ...]
            output = output.reshape(*rows, *output.shape[2:])
        if labels is None and output.shape[-1] == self.padded_vocab_size:
            output = output[..., :self.vocab_size]
        return output


# ------------------------------------------------------------------------------ building

def _field(obj: Any, name: str, default=None):
    value = getattr(obj, name, None) if obj is not None else None
    return default if value is None else value


def build_qwen3vl_model(source, parallel=None, *, spec: str | None = None, dtype=None,
                        fp8: str | None = None, fp8_recipe: str = "delayed",
                        recompute: bool | None = None, freeze_vision: bool | None = None,
                        pre_process: bool | None = None, post_process: bool | None = None,
                        parallel_output: bool = True, padded_vocab_size: int | None = None,
                        make_vocab_size_divisible_by: int = 128, **text_overrides):
    """The Qwen3-VL stage of this rank. Returns ``(model, text TransformerConfig)``.

    ``source``: a HF checkpoint dir, a ``Qwen3VLConfig``, or a model config object (``hf_dir``,
    ``spec``, ``dtype``, ``fp8``, ``recompute``, ``freeze_vision``; keyword arguments win).
    ``parallel`` (optional, e.g. ``ParallelConfig``) supplies ``pp_layers`` and is checked
    against the initialised megatron parallel state, which decides TP/PP and this stage.
    """
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron's parallel state is not initialised: call "
                           "prism_megatron.distributed.init_distributed(tp=..., pp=...) first")
    hf = qcfg.load_hf_config(source)
    model_cfg = None if isinstance(source, (str, bytes)) or hasattr(source, "text_config") else source
    spec = spec or _field(model_cfg, "spec", "local")
    dtype = dtype or _field(model_cfg, "dtype", "fp32")
    fp8 = fp8 or _field(model_cfg, "fp8")
    if recompute is None:   # model.recompute + model.recompute_granularity (full | selective)
        recompute = (_field(model_cfg, "recompute_granularity", "full")
                     if _field(model_cfg, "recompute", False) else False)
    freeze_vision = bool(_field(model_cfg, "freeze_vision", False) if freeze_vision is None
                         else freeze_vision)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    for name, have in (("tp", tp), ("pp", pp)):
        want = _field(parallel, name)
        if want is not None and int(want) != have:
            raise ValueError(f"parallel.{name}={want} but megatron was initialised with {name}={have}")
    pp_layers = _field(parallel, "pp_layers")
    pp_layers = list(pp_layers) if pp_layers is not None else None

    text_config = qcfg.text_transformer_config(
        hf, tp=tp, pp=pp, pp_layers=pp_layers, spec=spec, dtype=dtype, fp8=fp8,
        fp8_recipe=fp8_recipe, recompute=recompute, **text_overrides)
    vision_config = qcfg.vision_transformer_config(hf, tp=tp, spec=spec, dtype=dtype,
                                                   recompute=recompute)
    if padded_vocab_size is None:
        padded_vocab_size = qcfg.padded_vocab_size(hf.text_config.vocab_size, tp,
                                                   make_vocab_size_divisible_by)
    model = Qwen3VLModel(
        hf, text_config, vision_config, spec=spec,
        pre_process=parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=parallel_state.is_pipeline_last_stage() if post_process is None else post_process,
        parallel_output=parallel_output, padded_vocab_size=padded_vocab_size)
    if text_config.params_dtype != torch.float32:
        # What megatron's Float16Module does: torch norms are created in fp32 whatever the config.
        model.to(dtype=text_config.params_dtype)
    if freeze_vision and model.vision_model is not None:
        model.vision_model.requires_grad_(False)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model, text_config


def model_provider(source, parallel=None, **kwargs):
    """Megatron-LM style ``provider(pre_process, post_process) -> model`` (e.g. for get_model)."""

    def provide(pre_process: bool = True, post_process: bool = True, **_):
        return build_qwen3vl_model(source, parallel, pre_process=pre_process,
                                   post_process=post_process, **kwargs)[0]

    return provide


def load_initial_weights(model: Qwen3VLModel, model_cfg) -> str:
    """Fill this stage from ``model_cfg.megatron_dir`` (a converted or trained checkpoint, legacy
    at this TP/PP or reshardable torch_dist). Returns the checkpoint format."""
    megatron_dir = _field(model_cfg, "megatron_dir", "")
    if not megatron_dir:
        raise ValueError("model.megatron_dir is empty: convert the HF checkpoint first, e.g. "
                         "tools/convert_hf_to_megatron.py --hf-dir HF --out DIR --format torch_dist, "
                         "and set model.megatron_dir=DIR")
    return load_megatron_checkpoint(model, megatron_dir)
