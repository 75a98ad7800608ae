"""Memory planner: will a stage's configuration fit its GPUs? From config.json and the config only.

    prism plan CONFIG [key=value ...] --stage sft --gpus-per-node 8 --nodes 1 --gpu-memory 80

Nothing is built and no weight is read: parameter counts come from the HF ``config.json`` shapes
(``model.hf_dir``, or the ``hf_config/`` of ``model.megatron_dir`` / ``discriminator.megatron_dir``,
or a published shape named with ``--shape``), laid out as the Megatron model lays them out (TP
shards, padded vocabulary, pipeline stages, experts over EP), so they equal the converted
checkpoint's tensor sizes exactly (tests/test_plan.py checks every tiny preset).

Per-GPU bytes, for the worst GPU of the layout (the first pipeline stage, which also holds the
vision tower, or the last when it holds more; a GPU that hosts an SGLang server):

* weights: params x 2 (bf16) or 4 (fp32) bytes.
* grads: megatron's DDP main-grad buffer, fp32 (``grad_reduce_in_fp32``) unless
  ``optimizer.main_grads_dtype=bf16`` (2 bytes, plus the fp32 copy of the grads the optimizer
  updates: its shard with the distributed optimizer, all of them without).
* optimizer: Adam m and v in fp32, plus an fp32 master copy when the weights are bf16 (12 or 8
  bytes/param); divided over data-parallel ranks with ``parallel.distributed_optimizer`` (expert
  parameters over the expert-data-parallel ranks); ``optimizer.cpu_offload`` moves
  ``offload_fraction`` of it to host memory.
* activations: the tensors autograd keeps for backward, counted term by term for one Qwen3
  decoder layer in the manner of Korthikanti et al. 2022, "Reducing Activation Recomputation in
  Large Transformer Models" (§4.1: per layer ``sbh(34 + 5as/h)`` bytes for a GPT layer; here
  GQA, QK-norm, SwiGLU and RMSNorm give other coefficients, see ``layer_activation_bytes``),
  with the same TP rule (tensors of width ``h`` replicated, head and FFN widths split ``1/t``),
  times the layers of the stage and the micro-batches 1F1B keeps in flight on it (``pp - rank``).
  Full recompute keeps each layer's input (``sbh`` per layer) plus one layer being recomputed;
  selective recompute (``core_attn``) drops the attention internals. The unfused (local spec)
  attention keeps its ``[a, s, s]`` softmax; TE's fused attention does not.
* logits: the fp32 softmax the vocab-parallel cross entropy keeps (``s b V / t``) plus the bf16
  logits themselves while the loss is formed.
* reference model (``algorithm.kl_coef > 0``): weights only.
* discriminator (align, warmup): weights, grads, optimizer, activations, its experts over EP.
* SGLang: ``rollout.sglang_mem_fraction`` of the GPU (SGLang's ``--mem-fraction-static``: weights
  plus the KV pool) on the GPUs that host a server; with ``rollout.release_memory_between_phases``
  it is released while training, so the peak is the larger of the two phases.
* cuda context + NCCL: a fixed 3 GB, and the plan keeps 5% of the GPU free for fragmentation.

``check_fits(cfg, stage)`` is the start-up check a stage calls on GPU: it refuses (MemoryPlanError,
after logging the table) a configuration whose plan does not fit the device it runs on.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from prism_megatron.errors import PrismError

log = logging.getLogger("prism.plan")

GB = 1e9
STAGES = ("sft", "warmup", "align", "rlvr")
CUDA_OVERHEAD_GB = 3.0     # CUDA context, cuBLAS workspaces, NCCL buffers
HEADROOM = 0.05            # share of the GPU the plan leaves free for allocator fragmentation
HF_CONFIG_DIR = "hf_config"   # a converted / trained Megatron checkpoint keeps config.json here


class MemoryPlanError(PrismError):
    """The configuration does not fit the GPUs (or the plan cannot be made); names the fix."""


# Shapes of the released checkpoints' config.json (Qwen/Qwen3-VL-{2B,4B,8B}-Instruct), the keys
# the model is built from: lets `prism plan --shape` plan a run before the checkpoint is here.
_VISION_SMALL = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                     deepstack_visual_indexes=[5, 11, 17])
_VISION_8B = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                  deepstack_visual_indexes=[8, 16, 24])


def _published(hidden, ffn, layers, heads, kv_heads, tied, vision) -> dict:
    return {
        "model_type": "qwen3_vl", "tie_word_embeddings": tied,
        "text_config": dict(vocab_size=151936, hidden_size=hidden, intermediate_size=ffn,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=kv_heads, head_dim=128),
        "vision_config": dict(**vision, out_hidden_size=hidden, patch_size=16, in_channels=3,
                              spatial_merge_size=2, temporal_patch_size=2,
                              num_position_embeddings=2304),
    }


PUBLISHED_SHAPES = {
    "qwen3-vl-2b": _published(2048, 6144, 28, 16, 8, True, _VISION_SMALL),
    "qwen3-vl-4b": _published(2560, 9728, 36, 32, 8, True, _VISION_SMALL),
    "qwen3-vl-8b": _published(4096, 12288, 36, 32, 8, False, _VISION_8B),
}


# ----------------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class Shape:
    """The parts of a Qwen3-VL config.json that decide parameter counts and activations."""
    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    v_depth: int
    v_hidden: int
    v_ffn: int
    v_heads: int
    v_out: int
    v_patch: int
    v_temporal: int
    v_merge: int
    v_channels: int
    v_positions: int
    deepstack: int            # DeepStack mergers (one per listed vision layer)

    @classmethod
    def from_config(cls, data: dict) -> "Shape":
        t, v = data["text_config"], data["vision_config"]
        return cls(vocab=t["vocab_size"], hidden=t["hidden_size"], ffn=t["intermediate_size"],
                   layers=t["num_hidden_layers"], heads=t["num_attention_heads"],
                   kv_heads=t["num_key_value_heads"],
                   head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
                   tied=bool(data["tie_word_embeddings"]), v_depth=v["depth"],
                   v_hidden=v["hidden_size"], v_ffn=v["intermediate_size"], v_heads=v["num_heads"],
                   v_out=v["out_hidden_size"], v_patch=v["patch_size"],
                   v_temporal=v["temporal_patch_size"], v_merge=v["spatial_merge_size"],
                   v_channels=v.get("in_channels", 3), v_positions=v["num_position_embeddings"],
                   deepstack=len(v.get("deepstack_visual_indexes") or []))


def read_shape(source: str | Path | dict) -> Shape:
    """A Shape from a published name (``qwen3-vl-8b``), a config dict, an HF checkpoint dir, or a
    Megatron checkpoint dir holding ``hf_config/config.json``. Reads JSON only."""
    if isinstance(source, dict):
        return Shape.from_config(source)
    if str(source) in PUBLISHED_SHAPES:
        return Shape.from_config(PUBLISHED_SHAPES[str(source)])
    from prism_megatron.models.qwen3_vl.config import read_config_json

    path = Path(source)
    if not (path / "config.json").is_file() and (path / HF_CONFIG_DIR / "config.json").is_file():
        path = path / HF_CONFIG_DIR
    return Shape.from_config(read_config_json(path))


def padded_vocab(vocab: int, tp: int, divisible_by: int = 128) -> int:
    from prism_megatron.weights.layout import padded_vocab_size

    return padded_vocab_size(vocab, tp, divisible_by)


# ----------------------------------------------------------------------------- parameters

@dataclass
class StageParams:
    """Parameters one rank holds (TP shard of one pipeline stage)."""
    dense: int = 0            # replicated over data parallel (and over EP for the discriminator)
    expert: int = 0           # MoE expert weights: this rank's num_experts / ep experts

    @property
    def total(self) -> int:
        return self.dense + self.expert


def vision_params(s: Shape, tp: int = 1) -> int:
    """The vision tower on one TP rank (it lives on the first pipeline stage)."""
    h, f = s.v_hidden, s.v_ffn
    patch = s.v_channels * s.v_temporal * s.v_patch ** 2 * h + h          # Conv3d + bias
    pos = s.v_positions * h
    block = (4 * h                                         # two LayerNorms (weight + bias)
             + (3 * h * h + 3 * h) // tp                   # qkv (column, biased)
             + h * h // tp + h                             # proj (row; its bias is replicated)
             + (h * f + f) // tp + f * h // tp + h)        # fc1 (column), fc2 (row)
    merged = h * s.v_merge ** 2

    def merger(norm_width: int) -> int:
        return (2 * norm_width + (merged * merged + merged) // tp + merged * s.v_out // tp
                + s.v_out)

    return patch + pos + s.v_depth * block + merger(h) + s.deepstack * merger(merged)


def text_layer_params(s: Shape, tp: int = 1, *, num_experts: int = 0, ep: int = 1
                      ) -> StageParams:
    """One decoder layer on one TP rank; ``num_experts`` > 0: the discriminator's MoE layer
    (router over all experts, ``num_experts / ep`` SwiGLU experts of the dense FFN width)."""
    h, d = s.hidden, s.head_dim
    attn = (2 * h                                          # input + pre-MLP RMSNorm
            + (s.heads + 2 * s.kv_heads) * d * h // tp     # fused qkv
            + 2 * d                                        # q / k RMSNorm (per head dim)
            + h * s.heads * d // tp)                       # output projection
    mlp = 3 * h * s.ffn // tp
    if not num_experts:
        return StageParams(dense=attn + mlp)
    return StageParams(dense=attn + num_experts * h, expert=num_experts // ep * mlp)


def stage_params(s: Shape, *, tp: int = 1, pp: int = 1, pp_rank: int = 0,
                 pp_layers: list[int] | None = None, num_experts: int = 0, ep: int = 1,
                 lm_head: bool = True) -> StageParams:
    """Parameters of pipeline stage ``pp_rank`` on one TP rank, as megatron builds it: embedding
    and vision tower on the first stage; final norm and output layer (a copy of the embedding
    when tied and pp > 1) on the last; ``lm_head=False``: the discriminator's value head."""
    from prism_megatron.weights.layout import stage_layer_counts

    counts = stage_layer_counts(s.layers, pp, list(pp_layers) if pp_layers else None)
    layer = text_layer_params(s, tp, num_experts=num_experts, ep=ep)
    out = StageParams(dense=counts[pp_rank] * layer.dense, expert=counts[pp_rank] * layer.expert)
    first, last = pp_rank == 0, pp_rank == pp - 1
    vocab_rows = padded_vocab(s.vocab, tp) // tp
    if first:
        out.dense += vision_params(s, tp) + vocab_rows * s.hidden
    if last:
        out.dense += s.hidden                                   # final RMSNorm
        if not lm_head:
            out.dense += s.hidden                               # value head: Linear(H -> 1)
        elif not s.tied or not first:
            out.dense += vocab_rows * s.hidden
    return out


def model_params(s: Shape, **kw) -> int:
    """Unique parameters of the whole model at TP1/PP1 (= the converted checkpoint's tensors)."""
    return stage_params(s, **kw).total


def hf_params(s: Shape) -> int:
    """The HF checkpoint's parameter count (no vocabulary padding)."""
    padded = padded_vocab(s.vocab, 1)
    rows = (1 if s.tied else 2) * (padded - s.vocab)
    return model_params(s) - rows * s.hidden


# ---------------------------------------------------------------------------- activations

@dataclass(frozen=True)
class ActivationSpec:
    seq: int                 # tokens per sequence (s)
    micro_batch: int         # sequences per micro-batch (b)
    bytes_per_elem: int      # 2 (bf16) or 4 (fp32)
    tp: int = 1
    fused_attention: bool = False   # TE / flash attention: no [a, s, s] softmax kept
    recompute: str = "none"  # none | selective | full


def layer_activation_bytes(s: Shape, a: ActivationSpec, *, num_experts: int = 0,
                           top_k: int = 1) -> int:
    """Bytes one Qwen3 decoder layer keeps for backward for one micro-batch (no recompute).

    Per token, counted tensor by tensor as autograd keeps them in megatron-core's layer (the
    Korthikanti et al. 2022 method; their GPT layer gives ``34 h + 5 a s``):
      RMSNorm x2 ...................... 3h each (input, normalised, weighted) + fp32 rstd
      fused QKV output ................ (q + 2kv) / t
      q / k RMSNorm ................... 2q / t + heads,  kv / t + kv heads
      unfused core attention .......... rotated q, k and v expanded to all heads: 3q / t,
                                        softmax [a/t, s, s] (fp32, + its bf16 copy), bool mask s^2
      fused core attention ............ rotated q, k: (q + kv) / t (+ fp32 log-sum-exp); the
                                        same for selective recompute (core_attn re-run)
      output projection input ......... q / t
      SwiGLU MLP ...................... fc1 out 2f/t, silu out f/t, gate*up f/t, fc2 in f/t
    with q = heads * head_dim, kv = kv_heads * head_dim, f = FFN width (x top_k for MoE: each
    token's hidden state goes to top_k experts). M-RoPE keeps 4 [s, b, head_dim] fp32 tables.
    """
    e, t, T = a.bytes_per_elem, a.tp, a.seq * a.micro_batch
    h, q, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    heads, kv_heads = s.heads // t, max(s.kv_heads // t, 1)
    f = s.ffn * (top_k if num_experts else 1)
    norms = 2 * (3 * h * e + 4)
    qkv = (q + 2 * kv) // t * e
    qk_norm = (2 * q + kv) // t * e + (heads + kv_heads) * 4
    proj = q // t * e
    mlp = 5 * f // t * e
    if num_experts:
        mlp += h * e + num_experts * 4 * 2   # dispatched copy of the tokens; router logits/probs
    rope = 4 * s.head_dim * 4          # M-RoPE cos/sin tables, per token (positions per sample)
    if a.fused_attention or a.recompute == "selective":
        # rotated q and k (v stays a view of the fused QKV output); flash adds an fp32 LSE
        core = (q + kv) // t * e + (heads * 4 if a.recompute != "selective" else 0)
        scores = 0
    else:
        core = 3 * q // t * e
        softmax_bytes = 4 + (e if e != 4 else 0)
        scores = heads * a.seq * a.seq * a.micro_batch * softmax_bytes + a.seq * a.seq
    per_token = norms + qkv + qk_norm + core + proj + mlp + rope
    return T * per_token + scores


def text_activation_bytes(s: Shape, a: ActivationSpec, layers: int, *, num_experts: int = 0,
                          top_k: int = 1) -> int:
    """``layers`` decoder layers of one micro-batch, under ``a.recompute``."""
    one = layer_activation_bytes(s, a, num_experts=num_experts, top_k=top_k)
    if a.recompute == "full":
        T = a.seq * a.micro_batch
        # each layer's input is kept (plus the RoPE table); one layer is recomputed at a time
        return layers * T * s.hidden * a.bytes_per_elem + T * s.head_dim * 4 + one
    return layers * one


def head_activation_bytes(s: Shape, a: ActivationSpec, *, lm_head: bool = True) -> int:
    """Last stage: final RMSNorm (3h + rstd per token) and the loss's fp32 softmax over the
    vocabulary shard (``s b V/t`` x 4 bytes; the bf16 logits are counted in ``logits_peak``)."""
    T = a.seq * a.micro_batch
    out = T * (3 * s.hidden * a.bytes_per_elem + 4)
    if lm_head:
        out += T * padded_vocab(s.vocab, a.tp) // a.tp * 4
    return out


def vision_activation_bytes(s: Shape, patches: int, a: ActivationSpec, images: int = 1) -> int:
    """The vision blocks for ``patches`` patches in ``images`` images (attention within each),
    counted as for the text layer (measured on the tiny tower, tests/test_plan.py). Per patch:
    LayerNorm x2 (input, output; fp32 mean + rstd), rotated q and k, the fused biased QKV output
    (v is a view of it), the attention output, GELU input and output (2f), half of the 2-D RoPE
    tables; unfused attention adds the ``[a, p, p]`` softmax of each image. Once per tower: the
    other RoPE half and the bool mask."""
    e, t = a.bytes_per_elem, a.tp
    h, f = s.v_hidden, s.v_ffn
    hd = h // s.v_heads
    per_patch = 4 * h * e + 16 + 6 * h // t * e + 2 * f // t * e + 8 * hd
    per_image = patches // max(images, 1)
    scores = 0 if a.fused_attention or a.recompute == "selective" else (
        s.v_heads // t * per_image * per_image * (4 + (e if e != 4 else 0)) * images)
    layer = patches * per_patch + scores
    once = 8 * patches * hd + (0 if a.fused_attention else per_image * per_image * images)
    if a.recompute == "full":
        return s.v_depth * patches * h * e + layer + once
    return s.v_depth * layer + once


# ------------------------------------------------------------------------------------ plan

@dataclass
class Plan:
    stage: str
    gpus: int
    gpu_memory_gb: float
    per_gpu_gb: dict[str, float] = field(default_factory=dict)
    phases: dict[str, list[str]] = field(default_factory=dict)   # phase -> its components
    params: dict[str, int] = field(default_factory=dict)
    cpu_gb: dict[str, float] = field(default_factory=dict)
    layout: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    infeasible: list[str] = field(default_factory=list)   # reasons beyond the byte count

    @property
    def usable_gb(self) -> float:
        return self.gpu_memory_gb * (1 - HEADROOM)

    @property
    def phase_totals(self) -> dict[str, float]:
        return {p: sum(self.per_gpu_gb[c] for c in comps) for p, comps in self.phases.items()}

    @property
    def peak_gb(self) -> float:
        return max(self.phase_totals.values(), default=0.0)

    @property
    def peak_phase(self) -> str:
        totals = self.phase_totals
        return max(totals, key=totals.get) if totals else ""

    @property
    def fits(self) -> bool:
        return self.peak_gb <= self.usable_gb and not self.infeasible

    def largest(self, n: int = 3) -> list[str]:
        comps = self.phases.get(self.peak_phase, [])
        return sorted(comps, key=lambda c: -self.per_gpu_gb[c])[:n]

    def to_json(self) -> dict:
        return {"stage": self.stage, "fits": self.fits, "peak_gb": round(self.peak_gb, 2),
                "usable_gb": round(self.usable_gb, 2), "gpu_memory_gb": self.gpu_memory_gb,
                "gpus": self.gpus, "peak_phase": self.peak_phase,
                "per_gpu_gb": {k: round(v, 3) for k, v in self.per_gpu_gb.items()},
                "phase_gb": {k: round(v, 2) for k, v in self.phase_totals.items()},
                "largest": self.largest(), "params": self.params,
                "cpu_gb": {k: round(v, 2) for k, v in self.cpu_gb.items()},
                "layout": self.layout, "notes": self.notes, "infeasible": self.infeasible}

    def table(self) -> str:
        lines = [f"prism plan: {self.stage} on {self.gpus} GPUs x {self.gpu_memory_gb:g} GB "
                 f"({', '.join(f'{k} {v}' for k, v in self.layout.items())})",
                 f"  {'component (per GPU)':<46}{'GB':>9}  phases"]
        for comp, gb in self.per_gpu_gb.items():
            phases = ",".join(p for p, c in self.phases.items() if comp in c)
            lines.append(f"  {comp:<46}{gb:>9.2f}  {phases}")
        for phase, total in self.phase_totals.items():
            lines.append(f"  {'= ' + phase + ' phase':<46}{total:>9.2f}")
        for name, gb in self.cpu_gb.items():
            lines.append(f"  {'host memory: ' + name:<46}{gb:>9.2f}")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  peak {self.peak_gb:.1f} GB ({self.peak_phase}) of {self.usable_gb:.1f} GB "
                     f"usable ({100 * (1 - HEADROOM):.0f}% of {self.gpu_memory_gb:g}): {verdict}; "
                     f"largest: {', '.join(self.largest())}")
        for name, n in self.params.items():
            lines.append(f"  params {name}: {n:,}")
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  DOES NOT FIT: {n}" for n in self.infeasible]
        return "\n".join(lines)


def _get(cfg, dotted: str, default=None):
    for part in dotted.split("."):
        cfg = getattr(cfg, part, None)
        if cfg is None:
            return default
    return cfg


def _policy_shape(cfg, shape: str | None) -> Shape:
    if shape:
        return read_shape(shape)
    for source in (_get(cfg, "model.hf_dir"), _get(cfg, "model.megatron_dir")):
        if source and (Path(source) / "config.json").is_file() or (
                source and (Path(source) / HF_CONFIG_DIR / "config.json").is_file()):
            return read_shape(source)
    raise MemoryPlanError(
        f"model.hf_dir={_get(cfg, 'model.hf_dir')!r} has no config.json (nor model.megatron_dir "
        f"an {HF_CONFIG_DIR}/config.json): point model.hf_dir at the checkpoint, or plan a "
        f"published shape with --shape {{{','.join(PUBLISHED_SHAPES)}}}")


def _disc_shape(cfg, shape: str | None) -> Shape:
    if shape:
        return read_shape(shape)
    source = _get(cfg, "discriminator.megatron_dir")
    if source and (Path(source) / HF_CONFIG_DIR / "config.json").is_file():
        return read_shape(source)
    raise MemoryPlanError(
        f"discriminator.megatron_dir={source!r} has no {HF_CONFIG_DIR}/config.json: point it at "
        f"the upcycled discriminator (tools/upcycle_discriminator.py), or plan a published shape "
        f"with --disc-shape {{{','.join(PUBLISHED_SHAPES)}}}")


@dataclass
class _Model:
    """One trained model's per-GPU states."""
    params: StageParams
    weight_bytes: int
    grad_bytes: int
    optim_bytes_per_param: int
    dp: int
    expert_dp: int


def _states(m: _Model, *, distributed: bool, offload: float) -> tuple[float, float, float, float]:
    """(weights, grads, optimizer on GPU, optimizer on host) in GB."""
    weights = m.params.total * m.weight_bytes / GB
    grads = m.params.total * m.grad_bytes
    if m.grad_bytes < 4 and m.weight_bytes < 4:
        # bf16 grad buffer: the optimizer upcasts the grads it updates (its shard) to fp32
        grads += (m.params.dense / m.dp + m.params.expert / m.expert_dp if distributed
                  else m.params.total) * 4
    grads /= GB
    if distributed:
        optim = (m.params.dense / m.dp + m.params.expert / m.expert_dp) * m.optim_bytes_per_param
    else:
        optim = m.params.total * m.optim_bytes_per_param
    optim /= GB
    return weights, grads, optim * (1 - offload), optim * offload


def make_plan(cfg, stage: str, *, gpus_per_node: int, nodes: int = 1, gpu_memory_gb: float,
              shape: str | None = None, disc_shape: str | None = None,
              images_per_sample: int = 1) -> Plan:
    """The memory plan of ``stage`` under ``cfg`` (a PrismConfig) on ``nodes x gpus_per_node``
    GPUs of ``gpu_memory_gb`` each."""
    if stage not in STAGES:
        raise MemoryPlanError(f"stage {stage!r}: choose one of {list(STAGES)}")
    world = gpus_per_node * nodes
    tp, pp = int(_get(cfg, "parallel.tp", 1)), int(_get(cfg, "parallel.pp", 1))
    if world % (tp * pp):
        raise MemoryPlanError(f"{world} GPUs are not a multiple of parallel.tp x parallel.pp = "
                              f"{tp * pp}: change --gpus-per-node/--nodes or the layout")
    dp = world // (tp * pp)
    bf16 = _get(cfg, "model.dtype", "fp32") == "bf16"
    e = 2 if bf16 else 4
    spec = _get(cfg, "model.spec", "local")
    recompute = _get(cfg, "model.recompute", False)
    granularity = _get(cfg, "model.recompute_granularity", None) or "full"
    recompute = granularity if recompute else "none"
    main_grads = 2 if _get(cfg, "optimizer.main_grads_dtype", "fp32") == "bf16" else 4
    optim_bpp = 12 if bf16 else 8
    distributed = bool(_get(cfg, "parallel.distributed_optimizer", False))
    offload = (float(_get(cfg, "optimizer.offload_fraction", 1.0))
               if _get(cfg, "optimizer.cpu_offload", False) else 0.0)
    plan = Plan(stage, world, float(gpu_memory_gb))
    plan.layout = {"tp": tp, "pp": pp, "dp": dp}
    mbs = int(_get(cfg, "data.micro_batch_size", 1))
    prompt = int(_get(cfg, "data.max_prompt_length", 2048))
    response = int(_get(cfg, "data.max_response_length", 8192))
    new_tokens = int(_get(cfg, "rollout.max_new_tokens", 8192))
    pp_layers = _get(cfg, "parallel.pp_layers")
    comps, train, rollout = plan.per_gpu_gb, [], []
    disc_train = train          # alignment: its own list (the discriminator's update phase)

    def add(name: str, gb: float, *phases: list) -> None:
        comps[name] = gb
        for phase in phases:
            if name not in phase:
                phase.append(name)

    def add_states(who: str, model) -> None:
        """A trained model's resident weights, grads and optimizer (+ what is offloaded)."""
        w, g, o, o_cpu = _states(model, distributed=distributed, offload=offload)
        add(f"{who} weights", w, train, rollout)
        add(f"{who} grads", g, train, rollout)
        add(f"{who} optimizer", o, train, rollout)
        if o_cpu:
            plan.cpu_gb[f"{who} optimizer (offloaded)"] = o_cpu

    def activations(s: Shape, seq: int, *, tp_: int, pp_: int, layers_split, num_experts=0,
                    top_k=1, lm_head=True, mbs_: int, micro_batches: int) -> tuple[float, float]:
        """(kept activations, transient logits) in GB on the worst pipeline stage."""
        from prism_megatron.weights.layout import stage_layer_counts

        a = ActivationSpec(seq, mbs_, e, tp_, fused_attention=spec == "transformer_engine",
                           recompute=recompute)
        counts = stage_layer_counts(s.layers, pp_, list(layers_split) if layers_split else None)
        patches = images_per_sample * mbs_ * _patches(cfg, s)
        worst = 0
        for rank, layers in enumerate(counts):
            in_flight = min(pp_ - rank, max(micro_batches, 1))
            one = text_activation_bytes(s, a, layers, num_experts=num_experts, top_k=top_k)
            if rank == 0:
                one += vision_activation_bytes(s, patches, a, images=images_per_sample * mbs_)
            if rank == pp_ - 1:
                one += head_activation_bytes(s, a, lm_head=lm_head)
            worst = max(worst, one * in_flight)
        logits = seq * mbs_ * padded_vocab(s.vocab, tp_) // tp_ * e if lm_head else 0
        return worst / GB, logits / GB

    def worst_stage(s: Shape, **kw) -> StageParams:
        stages = [stage_params(s, tp=kw.get("tp", 1), pp=kw.get("pp", 1), pp_rank=r,
                               pp_layers=kw.get("pp_layers"), num_experts=kw.get("num_experts", 0),
                               ep=kw.get("ep", 1), lm_head=kw.get("lm_head", True))
                  for r in range(kw.get("pp", 1))]
        return max(stages, key=lambda p: p.total)

    if stage in ("sft", "rlvr", "align"):
        s = _policy_shape(cfg, shape)
        plan.params["policy"] = model_params(s)
        plan.params["policy_hf"] = hf_params(s)
        per_rank = worst_stage(s, tp=tp, pp=pp, pp_layers=pp_layers)
        add_states("policy", _Model(per_rank, e, main_grads, optim_bpp, dp, dp))
        seq = prompt + (response if stage == "sft" else new_tokens)
        gbs = int(_get(cfg, "data.global_batch_size", 1))
        micro = max(1, gbs // (dp * mbs)) if stage == "sft" else max(1, pp)
        act, logits = activations(s, seq, tp_=tp, pp_=pp, layers_split=pp_layers, mbs_=mbs,
                                  micro_batches=micro)
        add(f"policy activations (s={seq}, b={mbs})", act, train)
        add("policy logits (bf16, transient)" if bf16 else "policy logits (transient)",
            logits, train)
        if stage != "sft" and float(_get(cfg, "algorithm.kl_coef", 0.0) or 0.0) > 0:
            add("reference weights (kl_coef > 0)", per_rank.total * e / GB, train, rollout)
    if stage in ("warmup", "align"):
        ds = _disc_shape(cfg, disc_shape)
        experts, top_k = int(_get(cfg, "discriminator.num_experts", 4)), int(
            _get(cfg, "discriminator.top_k", 2))
        d_tp = int(_get(cfg, "discriminator.tp", 1)) if stage == "warmup" else tp
        d_pp = int(_get(cfg, "discriminator.pp", 1)) if stage == "warmup" else pp
        ep = int(_get(cfg, "discriminator.ep", 1))
        if world % (d_tp * d_pp * ep) or experts % ep:
            raise MemoryPlanError(f"discriminator.ep={ep}: must divide num_experts={experts} and "
                                  f"{world} GPUs / (tp {d_tp} x pp {d_pp})")
        d_dp = world // (d_tp * d_pp)
        plan.layout.update(disc_ep=ep)
        plan.params["discriminator"] = model_params(ds, num_experts=experts, lm_head=False)
        per_rank = worst_stage(ds, tp=d_tp, pp=d_pp, num_experts=experts, ep=ep, lm_head=False)
        add_states("discriminator", _Model(per_rank, e, main_grads, optim_bpp, d_dp, d_dp // ep))
        seq = prompt + (response if stage == "warmup" else new_tokens)
        d_mbs = mbs
        act, _ = activations(ds, seq, tp_=d_tp, pp_=d_pp, layers_split=None, num_experts=experts,
                             top_k=top_k, lm_head=False, mbs_=d_mbs, micro_batches=max(1, d_pp))
        name = f"discriminator activations (s={seq}, b={d_mbs})"
        if stage == "warmup":
            add(name, act, train)
        else:
            # the policy and the discriminator step one after the other: one set of activations
            disc_train = [c for c in train if not c.startswith("policy activations")
                          and not c.startswith("policy logits")]
            add(name, act, disc_train)
    release = bool(_get(cfg, "rollout.release_memory_between_phases", False))
    if stage in ("rlvr", "align") and _get(cfg, "rollout.engine", "local") == "sglang" \
            and not _get(cfg, "rollout.urls"):
        frac = float(_get(cfg, "rollout.sglang_mem_fraction", 0.5))
        per_node = int(_get(cfg, "rollout.servers_per_node", 0)) or int(_get(cfg, "rollout.num_servers", 1))
        servers = per_node * int(_get(cfg, "rollout.sglang_tp", 1))   # SGLang GPUs per node
        if servers > gpus_per_node:
            plan.notes.append(f"{servers} SGLang GPUs asked for on a {gpus_per_node}-GPU node")
        name = f"sglang weights + KV (mem_fraction {frac:g})"
        policy = _policy_shape(cfg, shape)
        sg_tp = int(_get(cfg, "rollout.sglang_tp", 1))
        weights_gb = hf_params(policy) * 2 / sg_tp / GB          # SGLang serves bf16
        kv_token = policy.layers * 2 * policy.kv_heads * policy.head_dim * 2 / min(
            sg_tp, policy.kv_heads)
        kv_tokens = int(max(frac * gpu_memory_gb - weights_gb, 0) * GB / kv_token)
        plan.layout["sglang_kv_tokens"] = kv_tokens
        if kv_tokens == 0:
            plan.infeasible.append(f"rollout.sglang_mem_fraction={frac:g} x {gpu_memory_gb:g} GB "
                                   f"does not hold the {weights_gb:.1f} GB of bf16 weights")
        elif kv_tokens < prompt + new_tokens:
            plan.notes.append(f"SGLang's KV pool holds {kv_tokens} tokens, less than one "
                              f"sequence ({prompt + new_tokens})")
        # released while training (memory saver), else resident in every phase
        add(name, frac * gpu_memory_gb, rollout, *(() if release else (train, disc_train)))
    add("cuda context + nccl", CUDA_OVERHEAD_GB, train, rollout, disc_train)
    plan.phases = {"train": train}
    if disc_train is not train and stage == "align":
        plan.phases = {"policy_train": train, "disc_train": disc_train}
    if any(c.startswith("sglang") for c in rollout):
        plan.phases["rollout"] = rollout
    if spec != "transformer_engine":
        plan.notes.append("local spec: unfused attention keeps the [heads, s, s] softmax")
    return plan


def _patches(cfg, s: Shape) -> int:
    """Vision patches of one image at ``data.max_pixels`` (the processor's upper bound)."""
    max_pixels = _get(cfg, "data.max_pixels") or 1024 * 1024
    side = s.v_patch * s.v_merge
    tokens = max(1, int(max_pixels) // (side * side))
    return tokens * s.v_merge ** 2


# --------------------------------------------------------------------------------- runtime

def check_fits(cfg, stage: str, *, gpu_memory_gb: float | None = None,
               gpus_per_node: int | None = None, nodes: int | None = None) -> Plan | None:
    """Start-up check for a stage on GPU: plan ``cfg`` on this job's GPUs (device memory from
    torch, world size from torchrun's environment) and raise MemoryPlanError, after logging the
    table, when it does not fit. Returns the plan; None on a CPU-only host (nothing to check)."""
    import torch

    if gpu_memory_gb is None:
        if not torch.cuda.is_available():
            return None
        gpu_memory_gb = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GB
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    gpus_per_node = gpus_per_node or local
    nodes = nodes or max(1, world // max(gpus_per_node, 1))
    plan = make_plan(cfg, stage, gpus_per_node=gpus_per_node, nodes=nodes,
                     gpu_memory_gb=gpu_memory_gb)
    if plan.infeasible:
        log.error("%s", plan.table())
        raise MemoryPlanError(f"{stage}: {plan.infeasible[0]}: see the table above or "
                              f"`prism plan`")
    if not plan.fits:
        log.error("%s", plan.table())
        raise MemoryPlanError(
            f"{stage}: the memory plan needs {plan.peak_gb:.1f} GB per GPU ({plan.peak_phase} "
            f"phase; largest: {', '.join(plan.largest())}) but {plan.usable_gb:.1f} GB are usable: "
            f"see the table above or `prism plan`; try model.recompute=true, "
            f"parallel.distributed_optimizer=true, optimizer.cpu_offload=true, a larger "
            f"parallel.tp or a smaller data.micro_batch_size")
    log.info("memory plan: peak %.1f of %.1f GB usable per GPU (%s)", plan.peak_gb,
             plan.usable_gb, plan.peak_phase)
    return plan


# ------------------------------------------------------------------------------------- cli

def cli(argv: list[str]) -> None:
    import argparse

    from prism_megatron.config import load_config

    p = argparse.ArgumentParser(prog="prism plan", description=(
        "per-GPU memory plan of a stage from config.json and the config alone (nothing is "
        "loaded); prints a table and one JSON line; exit status 2 when it does not fit"))
    p.add_argument("config", nargs="?", help="stage YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--stage", choices=STAGES, help="default: from the config file name")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU")
    p.add_argument("--shape", choices=sorted(PUBLISHED_SHAPES),
                   help="plan a published policy shape instead of model.hf_dir's config.json")
    p.add_argument("--disc-shape", choices=sorted(PUBLISHED_SHAPES),
                   help="the discriminator's dense shape instead of discriminator.megatron_dir's")
    p.add_argument("--json-only", action="store_true")
    args = p.parse_intermixed_args(argv)   # overrides before or after the options
    overrides = list(args.overrides)
    if args.config and "=" in args.config:
        overrides.insert(0, args.config)
        args.config = None
    stage = args.stage or _stage_from_name(args.config)
    cfg = load_config(args.config, overrides)
    plan = make_plan(cfg, stage, gpus_per_node=args.gpus_per_node, nodes=args.nodes,
                     gpu_memory_gb=args.gpu_memory, shape=args.shape, disc_shape=args.disc_shape)
    if not args.json_only:
        print(plan.table())
    print(json.dumps(plan.to_json()))
    if not plan.fits:
        raise MemoryPlanError(f"{stage} does not fit: " + (
            f"{plan.infeasible[0]}; " if plan.infeasible else "") +
            f"{plan.peak_gb:.1f} GB per GPU needed ({plan.peak_phase}), {plan.usable_gb:.1f} GB "
            f"usable; largest: {', '.join(plan.largest())}")


def _stage_from_name(config: str | None) -> str:
    name = Path(config or "").stem
    for stage in STAGES:
        if name.startswith(stage):
            return stage
    raise MemoryPlanError(f"cannot tell the stage from {config!r}: pass --stage "
                          f"{{{','.join(STAGES)}}}")
