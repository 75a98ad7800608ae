"""The PRISM discriminator: Qwen3-VL with MoE MLPs in every text layer and a value head.

``Qwen3VLDiscriminator`` is ``Qwen3VLModel`` (vision tower, M-RoPE, DeepStack, TP/PP plumbing)
built with the MoE block spec of ``specs.py`` and without its LM head; the last pipeline stage
maps the final-norm hidden states to one value per token (``ValueHead``). A score is the value at
a segment's last token (``batching.read_scores``).

Per forward the caller says which rows are caption passes and which are reasoning passes
(``kind``) and which tokens are padding (``valid_tokens``); the routers use that for
``expert_routing: segment``, for the padding-masked load-balancing loss and for the expert-load
counts (``take_load``).
"""

from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from prism_megatron.config import ConfigError
from prism_megatron.models.discriminator.routing import (
    ROUTING_MODES, RoutingContext, allowed_experts, attach_routing_context, layer_aux_weight)
from prism_megatron.models.discriminator.specs import moe_text_block_spec
from prism_megatron.models.discriminator.value_head import ValueHead
from prism_megatron.models.qwen3_vl import config as qcfg
from prism_megatron.models.qwen3_vl.model import Qwen3VLModel
from prism_megatron.models.qwen3_vl.rope import rope_index_for_sample
from prism_megatron.weights import ckpt_layout as lay
from prism_megatron.weights.load import load_megatron_checkpoint

INFO_FILE = "prism_discriminator.json"   # written by the upcycler next to hf_config/
DISPATCHERS = ("alltoall", "allgather")


def check_moe_layout(num_experts: int, top_k: int, routing: str, *, tp: int, ep: int,
                     spec: str = "local", dispatcher: str = "alltoall") -> None:
    """Reject configurations megatron would fail on deep inside, with the fix in the message."""
    if routing not in ROUTING_MODES:
        raise ConfigError(f"discriminator.expert_routing={routing!r}: choose one of "
                          f"{ROUTING_MODES}")
    if dispatcher not in DISPATCHERS:
        raise ConfigError(f"discriminator.dispatcher={dispatcher!r}: choose one of {DISPATCHERS}")
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ConfigError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, "
                          f"num_experts={num_experts}")
    if routing == "segment":
        if num_experts % 2:
            raise ConfigError(f"expert_routing=segment splits the experts into a perception and a "
                              f"reasoning half: num_experts={num_experts} must be even")
        if top_k > num_experts // 2:
            raise ConfigError(f"expert_routing=segment routes within half of the experts: "
                              f"top_k={top_k} must be <= num_experts/2 = {num_experts // 2}")
    if ep < 1 or num_experts % ep:
        raise ConfigError(f"expert parallel size ep={ep} must divide num_experts={num_experts}")


def moe_config_fields(num_experts: int, top_k: int, moe_ffn_hidden_size: int, *, ep: int,
                      dispatcher: str, grouped_gemm: bool = False) -> dict:
    """TransformerConfig fields of the MoE layers. Routing as HF Qwen3-VL-MoE: fp32 softmax over
    the experts, top-k, renormalised (= softmax over the top-k logits, megatron's default
    post-softmax top-k); no shared expert; megatron's own aux loss off (see routing.py).
    megatron refuses post-softmax top-1 (its weight is always 1, so the router gets no gradient
    from the loss, as in HF): top-1 runs pre-softmax and ``SegmentRouter`` renormalises."""
    return dict(num_moe_experts=num_experts, moe_router_topk=top_k,
                moe_ffn_hidden_size=moe_ffn_hidden_size, moe_router_score_function="softmax",
                moe_router_pre_softmax=top_k == 1, moe_router_dtype="fp32",
                moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=grouped_gemm,
                moe_permute_fusion=False, expert_model_parallel_size=ep)


class Qwen3VLDiscriminator(Qwen3VLModel):
    """One pipeline stage of the discriminator. ``forward`` returns values ``[B, S]`` (fp32) on
    the last stage, the hidden states for the next stage elsewhere."""

    def __init__(self, hf_config, text_config, vision_config, *, spec: str = "local",
                 pre_process: bool = True, post_process: bool = True,
                 expert_routing: str = "learned", value_head_dropout: float = 0.0,
                 padded_vocab_size: int | None = None):
        super().__init__(hf_config, text_config, vision_config, spec=spec,
                         pre_process=pre_process, post_process=post_process,
                         padded_vocab_size=padded_vocab_size,
                         block_spec=moe_text_block_spec(text_config, spec), lm_head=False)
        self.expert_routing = expert_routing
        self.v_head = (ValueHead(text_config.hidden_size, value_head_dropout,
                                 dtype=text_config.params_dtype) if post_process else None)
        self.routing_context = RoutingContext(
            allowed_experts(expert_routing, text_config.num_moe_experts),
            text_config.moe_router_topk)
        self.num_routers = attach_routing_context(self, self.routing_context)
        self._load = torch.zeros(text_config.num_layers, 2, text_config.num_moe_experts,
                                 dtype=torch.float64)
        self._aux = torch.zeros(2, dtype=torch.float64)      # (sum over layer-forwards, count)
        self.aux_loss_coef = 0.0

    @property
    def position_fn(self):
        """(input_ids [S], image_grid_thw) -> [3, S]: the policy's M-RoPE positions (spec §9.3)."""
        return partial(rope_index_for_sample, hf_config=self.hf_config)

    # ---- load-balancing loss ------------------------------------------------------------------
    def set_aux_loss(self, coef: float) -> None:
        """Load-balancing coefficient of the current stage (spec §9.5: warm-up 0.01,
        alignment 0)."""
        self.aux_loss_coef = float(coef)

    def set_step_aux_scale(self, mean_loss_weight: float) -> None:
        """Constant aux gradient weight of each layer for the coming step: ``coef x top_k / L``
        (L: MoE layers of the whole model; the reference's pooled scale, ``layer_aux_weight``)
        x this rank's mean loss count per micro-batch, so the aux loss enters as ``coef x top_k
        x`` its mean over layers, micro-batches and ranks."""
        weight = layer_aux_weight(self.aux_loss_coef, self.config.moe_router_topk,
                                  self.config.num_layers)
        self.routing_context.aux_scale = weight * float(mean_loss_weight)

    # ---- statistics ---------------------------------------------------------------------------
    def take_load(self) -> Tensor:
        """[num_layers, 2, E] routed slots per (global) layer, segment type, expert on this rank
        since the last call (layers of other pipeline stages are zero)."""
        load, self._load = self._load, torch.zeros_like(self._load)
        return load

    def take_aux(self) -> float:
        """Mean load-balancing loss per layer-forward since the last call (this rank; training
        forwards with a non-zero coefficient only), the logged ``aux_loss``: 1 at balance in
        both routing modes; the loss added to the objective is ``coef x top_k x`` this (the
        reference's pooled loss is ``top_k`` at balance)."""
        total = self._aux.clone()
        self._aux.zero_()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        return (total[0] / total[1]).item() if total[1] > 0 else 0.0

    def _collect(self) -> None:
        ctx = self.routing_context
        for layer, counts in ctx.load.items():
            self._load[layer - 1] += counts.double().cpu()
        for aux in ctx.aux.values():
            self._aux += torch.tensor([float(aux), 1.0], dtype=torch.float64)

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                image_grid_thw: Tensor | None = None, *, kind: Tensor,
                valid_tokens: Tensor) -> Tensor:
        """``kind`` [B] (CAPTION / REASONING per row), ``valid_tokens`` [B, S] (False = padding)."""
        # Kept until the next forward: an activation-recompute pass in this micro-batch's
        # backward must route exactly as the forward did (hence no recompute with pp > 1).
        self.routing_context.set_batch(kind.to(input_ids.device), valid_tokens.to(input_ids.device))
        if self.spec != "local" and attention_mask is not None and attention_mask.dim() == 4:
            # One right-padded sequence per row (collate_sequences): causal attention alone keeps
            # valid tokens off padding and other rows, and TE's causal layers take no mask.
            attention_mask = None
        try:
            output = super().forward(input_ids, position_ids, attention_mask, pixel_values,
                                     image_grid_thw)
        finally:
            self._collect()
        if not self.post_process:
            return output
        hidden = output[..., :self.config.hidden_size]       # [S, B, H]
        return self.v_head(hidden).transpose(0, 1).contiguous()


# ------------------------------------------------------------------------------ building

def read_info(megatron_dir: str | Path) -> tuple[object, dict]:
    """(dense HF Qwen3-VL config, MoE info dict) of a discriminator checkpoint directory (an
    upcycled one, or a warm-up save_dir, which carries copies of both)."""
    try:
        root = lay.checkpoint_root(lay.resolve_checkpoint_dir(megatron_dir))
    except Exception as exc:  # ConversionError: not a checkpoint directory
        raise ConfigError(f"discriminator.megatron_dir: {exc}") from None
    info_path = root / INFO_FILE
    if not info_path.is_file() or not (root / lay.HF_CONFIG_DIR / "config.json").is_file():
        raise ConfigError(f"{root} is not a discriminator checkpoint (no {INFO_FILE} / "
                          f"{lay.HF_CONFIG_DIR}/config.json): make one with "
                          f"tools/upcycle_discriminator.py")
    return (qcfg.load_hf_config(root / lay.HF_CONFIG_DIR),
            json.loads(info_path.read_text()))


def build_discriminator_from_config(hf_config, *, num_experts: int, top_k: int,
                                    expert_routing: str = "learned",
                                    value_head_dropout: float = 0.0,
                                    spec: str = "local", dtype="fp32", recompute: bool = False,
                                    dispatcher: str = "alltoall", pp_layers=None,
                                    padded_vocab_size: int | None = None,
                                    grouped_gemm: bool = False):
    """This rank's discriminator stage for a dense Qwen3-VL HF config, at the initialised
    megatron parallel state. Returns ``(model, text TransformerConfig)``."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("call prism_megatron.distributed.init_distributed(tp, pp, ep) first")
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    ep = ps.get_expert_model_parallel_world_size()
    check_moe_layout(num_experts, top_k, expert_routing, tp=tp, ep=ep, spec=spec,
                     dispatcher=dispatcher)
    if recompute and pp > 1:
        raise ConfigError("activation recompute with pp > 1 is not supported for the "
                          "discriminator: the routers' per-micro-batch inputs (segment type, "
                          "padding) would be stale when 1F1B recomputes an older micro-batch")
    if grouped_gemm and spec != "transformer_engine":
        raise ConfigError("discriminator.moe_grouped_gemm=true needs model.spec="
                          "transformer_engine (TE's grouped GEMM, on GPU); the local spec runs "
                          "the experts one after another: set discriminator.moe_grouped_gemm=false")
    hf = copy.deepcopy(hf_config)
    moe = moe_config_fields(num_experts, top_k, hf.text_config.intermediate_size, ep=ep,
                            dispatcher=dispatcher, grouped_gemm=grouped_gemm)
    # megatron's MoE layers need sequence parallelism with TP (the text decoder runs it; the
    # vision tower does not); the experts are tensor-parallel over the same ranks (ETP = TP).
    text_config = qcfg.text_transformer_config(hf, tp=tp, pp=pp, pp_layers=pp_layers, spec=spec,
                                               dtype=dtype, recompute=recompute,
                                               sequence_parallel=tp > 1, **moe)
    vision_config = qcfg.vision_transformer_config(hf, tp=tp, spec=spec, dtype=dtype,
                                                   recompute=recompute)
    model = Qwen3VLDiscriminator(
        hf, text_config, vision_config, spec=spec, pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(), expert_routing=expert_routing,
        value_head_dropout=value_head_dropout, padded_vocab_size=padded_vocab_size)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model, text_config


def build_discriminator(megatron_dir: str | Path, disc_cfg, model_cfg=None, *,
                        dropout: float | None = None):
    """The discriminator described by a checkpoint directory, with the run's routing mode, value
    head dropout, dispatcher and layer spec / dtype (``model_cfg``: spec, dtype, recompute)."""
    hf, info = read_info(megatron_dir)
    if int(disc_cfg.num_experts) != info["num_experts"] or int(disc_cfg.top_k) != info["top_k"]:
        raise ConfigError(f"discriminator.num_experts/top_k = {disc_cfg.num_experts}/"
                          f"{disc_cfg.top_k} but {megatron_dir} holds a "
                          f"{info['num_experts']}-expert top-{info['top_k']} model")
    spec = getattr(model_cfg, "spec", "local") if model_cfg is not None else "local"
    return build_discriminator_from_config(
        hf, num_experts=info["num_experts"], top_k=info["top_k"],
        expert_routing=disc_cfg.expert_routing,
        value_head_dropout=disc_cfg.value_head_dropout if dropout is None else dropout,
        spec=spec, dtype=getattr(model_cfg, "dtype", "fp32") if model_cfg is not None else "fp32",
        recompute=(getattr(model_cfg, "recompute_granularity", None) or "full")
        if model_cfg is not None and getattr(model_cfg, "recompute", False) else False,
        dispatcher=getattr(disc_cfg, "dispatcher", "alltoall"),
        padded_vocab_size=info.get("padded_vocab_size"),
        grouped_gemm=bool(getattr(disc_cfg, "moe_grouped_gemm", False)))


def load_discriminator(model: Qwen3VLDiscriminator, megatron_dir: str | Path) -> None:
    """Fill this rank's stage from a torch_dist discriminator checkpoint (any EP/DP/PP)."""
    load_megatron_checkpoint(model, megatron_dir)
