"""Structured configuration: OmegaConf dataclasses, YAML files, ``key=value`` overrides.

Defaults are PRISM's (docs/algorithm.md §1, §3.5, §6) where the spec gives one.
Model hyper-parameters are NOT here: they come from the checkpoint's config.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prism_megatron.rewards.response import SYSTEM_PROMPT
from prism_megatron.errors import PrismError


class ConfigError(PrismError, ValueError):
    """A config file or override that cannot be used; the message names the key and value."""


@dataclass
class ModelConfig:
    hf_dir: str = ""                   # HF checkpoint dir: config.json, tokenizer, processor
    megatron_dir: str = ""             # converted/trained Megatron checkpoint to start from
    spec: str = "local"                # local (pure torch, CPU) | transformer_engine (GPU)
    dtype: str = "fp32"                # fp32 | bf16
    fp8: Optional[str] = None          # None | e4m3 | hybrid (Transformer Engine only)
    recompute: bool = False            # activation recompute (granularity below), every stage
    # full: keep each layer's input, recompute the layer in backward (megatron 'full', uniform,
    # 1 layer); selective: recompute only the core attention (its [heads, s, s] softmax)
    recompute_granularity: str = "full"
    freeze_vision: bool = False


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    pp_layers: Optional[list[int]] = None   # uneven pipeline split, e.g. [1, 3]
    distributed_optimizer: bool = False


@dataclass
class OptimizerConfig:
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    schedule: str = "cosine"           # cosine | constant | linear
    warmup_ratio: float = 0.1
    warmup_steps: int = 0              # overrides warmup_ratio when > 0
    # Memory levers (docs/memory.md). cpu_offload: megatron-core's HybridDeviceOptimizer keeps
    # offload_fraction of the optimizer states (and their update) in host memory; it needs CUDA
    # and the distributed optimizer. main_grads_dtype bf16: megatron's DDP grad buffer in bf16
    # (grad_reduce_in_fp32 off): half the gradient memory, reduced in bf16.
    cpu_offload: bool = False
    offload_fraction: float = 1.0
    main_grads_dtype: str = "fp32"     # fp32 | bf16
    # A step with a non-finite loss or grad norm is skipped (weights unchanged); more than this
    # many in a row stop the run (trainer.py).
    max_skipped_steps: int = 3


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    max_prompt_length: int = 2048
    max_response_length: int = 8192
    min_pixels: Optional[int] = None     # image pixel budget: the processor, the rollout
    max_pixels: Optional[int] = None     # engines and eval all get it (data/images.py)
    max_image_side: Optional[int] = None   # longest side cap at decode (warm-up: 560 px)
    packing: bool = False
    global_batch_size: int = 32
    micro_batch_size: int = 1
    # RL stages: > 0 packs each mini-batch's sequences into micro-batches of one row of this many
    # tokens (balanced over data-parallel ranks by tokens) instead of micro_batch_size padded rows
    max_tokens_per_micro_batch: int = 0
    epochs: int = 1
    shuffle: bool = True
    max_skip_fraction: float = 0.01    # fail if more rows than this are unusable
    # Default system prompt, only for rows without their own system message ("" = none).
    system_prompt: str = SYSTEM_PROMPT
    dataset_info: str = ""             # LLaMA-Factory dataset_info.json (SFT data registry) ...
    datasets: list[str] = field(default_factory=list)   # ... and the dataset names it trains on
    media_dir: str = ""                # LLaMA-Factory media_dir: base of relative image paths
    image_root: str = ""               # base of relative image paths (warm-up pairs, others)
    num_workers: int = 2               # SFT: DataLoader processes encoding rows (0 = in-process)
    prefetch_steps: int = 4            # SFT: steps encoded ahead of training, at most


@dataclass
class RolloutConfig:
    engine: str = "local"              # local (CPU/torch) | sglang
    n: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 8192
    urls: list[str] = field(default_factory=list)   # attach to running servers
    sglang_tp: int = 1
    sglang_mem_fraction: float = 0.5
    weight_bucket_mb: int = 512
    server: str = "sglang"             # managed server: sglang | prism (the CPU server, tests/demo)
    num_servers: int = 1               # managed data-parallel servers on the first node (not with urls)
    # > 0: that many managed servers on EVERY node, launched and owned by the node's local
    # rank 0 (sglang_tp GPUs each); the sender dispatches to all of them. 0: num_servers instead
    servers_per_node: int = 0
    launch_timeout_s: float = 900.0    # wait for a launched server to answer /health_generate
    request_timeout_s: float = 600.0
    max_retries: int = 3               # per request, exponential backoff from 0.5 s
    restart_on_failure: bool = False   # relaunch a dead managed server instead of failing
    release_memory_between_phases: bool = False   # release/resume_memory_occupation around training
    weights_cpu_backup: bool = False   # --enable-weights-cpu-backup: released weights survive in host RAM
    # --enable-deterministic-inference: SGLang honours sampling_seed (own RNG, slower kernels)
    deterministic: bool = False
    # auto: tensor for an in-process engine and servers on this node (launched here or at a
    # loopback url), distributed for servers elsewhere | tensor (update_weights_from_tensor) |
    # distributed (each PP stage broadcasts its layers to the servers) | disk (safetensors dir)
    weight_sync: str = "auto"
    weight_check_tensors: int = 2      # tensors per sending rank read back after a sync (0 = off)


@dataclass
class RewardConfig:
    accuracy_weight: float = 0.8
    format_weight: float = 0.2
    num_workers: int = 0
    overlong_buffer: int = 0           # DAPO: 4096; 0 = off
    overlong_penalty_factor: float = 1.0


@dataclass
class AlgorithmConfig:
    name: str = "grpo"                 # grpo | dapo | gspo | prism
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = 3.0
    loss_agg: str = "token-mean"
    ppo_epochs: int = 1
    mini_batch_prompts: int = 0        # 0 = the whole step batch (one optimizer step)
    norm_adv_by_std: bool = True
    kl_coef: float = 0.0
    kl_kind: str = "low_var_kl"
    entropy_coef: float = 0.0          # entropy bonus: policy loss - entropy_coef * agg(H) (verl)
    dynamic_sampling: bool = False
    max_num_gen_batches: int = 10
    gen_batch_prompts: int = 0         # DAPO prompts per generation round; 0 = prompts_per_step
    tis_cap: Optional[float] = None    # truncated importance sampling cap; None = off
    off_policy_steps: int = 0          # 1: generate step t+1 while training step t (RLVR)
    prompts_per_step: int = 32
    caption_weight: float = 0.5        # PRISM alignment advantage (spec §4)
    reasoning_weight: float = 0.5
    format_penalty: float = 1.5


@dataclass
class DiscriminatorConfig:
    megatron_dir: str = ""
    num_experts: int = 4
    top_k: int = 2
    noise_std: float = 0.01
    expert_routing: str = "learned"    # learned | segment (spec §9.6)
    value_head_dropout: float = 0.0
    lr: float = 1e-6
    score_clip: float = 10.0
    score_reg: float = 0.001
    aux_loss_coef: float = 0.0         # warm-up uses 0.01 (spec §9.5)
    tp: int = 1
    ep: int = 1
    pp: int = 1
    dispatcher: str = "alltoall"       # MoE token dispatcher: alltoall | allgather
    moe_grouped_gemm: bool = False     # TE's grouped GEMM for the experts (transformer_engine spec)
    warmup_aux_loss_coef: float = 0.01  # load-balancing coef of the warm-up stage (spec §3.6, §9.5)
    eval_interval: int = 0             # warm-up: held-out pairwise accuracy every N steps (0 = end)
    frozen: bool = False               # alignment: never updated (ablation; pair stats still logged)


@dataclass
class EvalTaskConfig:
    """One benchmark under ``eval.harness: lmms-eval`` (prism_megatron/eval/lmms.py, TASKS)."""
    max_new_tokens: int = 0            # 0: the lmms-eval task's own budget
    temperature: Optional[float] = None   # None: the task yaml's (e.g. HallusionBench greedy)
    top_p: Optional[float] = None
    system_prompt: bool = True         # the response-format prompt as the default system message
    lmms_tasks: list[str] = field(default_factory=list)   # lmms-eval task names; []: the default


@dataclass
class EvalConfig:
    """Held-out generation + verifiable scoring (``data.eval_files``, ``harness: builtin``) and,
    in ``prism eval``, the paper's benchmarks with ``harness: lmms-eval`` (``tasks``, through
    lmms-eval against an OpenAI-compatible server)."""
    max_new_tokens: int = 256
    limit: int = 0                     # rows per file (per lmms-eval task); 0 = all
    temperature: float = 0.0           # 0 = greedy
    top_p: float = 1.0
    n: int = 1                         # samples per prompt (pass@n when > 1)
    batch_size: int = 32
    interval: int = 0                  # training stages: also every N steps (0: before and after)
    probe_rows: int = 0                # alignment: teacher-NLL of the first N prompts per step (0: off)
    harness: str = "builtin"           # builtin | lmms-eval
    tasks: dict[str, EvalTaskConfig] = field(default_factory=dict)   # lmms-eval: name -> settings
    datasets: dict[str, str] = field(default_factory=dict)   # lmms-eval task -> local copy dir
    datasets_cache: str = ""           # an HF datasets cache holding the downloads (offline)
    judge_url: str = ""                # OpenAI-compatible /v1 base of the LLM judge
    judge_model: str = "default"       # the model name the judge server answers to
    server_url: str = ""               # attach to a running policy server (/v1 base); "": launch
    lmms_python: str = ""              # interpreter with lmms-eval installed; "": this one
    concurrency: int = 16              # requests lmms-eval keeps in flight
    request_timeout_s: float = 3600.0  # per request (49k-token answers take a while)
    system_prompt: str = SYSTEM_PROMPT  # the response-format prompt (tasks[*].system_prompt)


@dataclass
class CheckpointConfig:
    """A training stage needs ``save_dir`` (an empty one is refused: the weights would be lost)
    unless ``enabled: false`` says to train without saving (nor resuming)."""
    save_dir: str = ""
    enabled: bool = True               # false: no checkpoints at all (save_dir ignored)
    save_interval: int = 100
    keep_last: int = 3                 # newest complete checkpoints kept (by step); <= 0: all
    # auto: the newest complete checkpoint in save_dir (refused if it holds only broken ones)
    # | never: start from step 0 (alias: none) | <path>: that checkpoint
    resume: str = "auto"


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"      # metrics.jsonl, config.yaml, stage.log, tensorboard/
    log_interval: int = 1              # console line / progress bar / tensorboard / wandb every N
                                       # steps (metrics.jsonl gets every step)
    tensorboard: bool = True
    plots: bool = True
    wandb_project: str = ""            # log to Weights & Biases too (needs `pip install wandb`)


@dataclass
class PrismConfig:
    seed: int = 1234
    train_steps: int = 0               # 0 = derived from data and epochs
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


CHOICES = {
    "model.spec": ("local", "transformer_engine"),
    "model.dtype": ("fp32", "bf16"),
    "model.fp8": (None, "e4m3", "hybrid"),
    "model.recompute_granularity": ("full", "selective"),
    "optimizer.schedule": ("cosine", "constant", "linear"),
    "optimizer.main_grads_dtype": ("fp32", "bf16"),
    "rollout.engine": ("local", "sglang"),
    "rollout.weight_sync": ("auto", "tensor", "distributed", "disk"),
    "algorithm.name": ("grpo", "dapo", "gspo", "prism"),
    "algorithm.loss_agg": ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                           "seq-mean-token-sum-norm", "token-mean-micro"),
    "algorithm.kl_kind": ("kl", "abs", "mse", "low_var_kl"),
    "discriminator.expert_routing": ("learned", "segment"),
}


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    detail = str(exc).splitlines()[0]
    return f"{key}: {detail}" if key else detail


# (key, low, low inclusive, high, high inclusive); None = unbounded. A key that is None in the
# config (an optional knob left off) is not checked.
RANGES = (
    ("train_steps", 0, True, None, None),
    ("parallel.tp", 1, True, None, None), ("parallel.pp", 1, True, None, None),
    ("parallel.ep", 1, True, None, None),
    ("optimizer.lr", 0, False, None, None), ("optimizer.min_lr", 0, True, None, None),
    ("optimizer.weight_decay", 0, True, None, None),
    ("optimizer.adam_beta1", 0, True, 1, False), ("optimizer.adam_beta2", 0, True, 1, False),
    ("optimizer.adam_eps", 0, True, None, None),   # 0 is legal (and how tests provoke NaNs)
    ("optimizer.clip_grad", 0, True, None, None), ("optimizer.max_skipped_steps", 0, True, None, None),
    ("optimizer.offload_fraction", 0, True, 1, True),
    ("optimizer.warmup_ratio", 0, True, 1, True), ("optimizer.warmup_steps", 0, True, None, None),
    ("data.max_prompt_length", 1, True, None, None), ("data.max_response_length", 1, True, None, None),
    ("data.min_pixels", 1, True, None, None), ("data.max_pixels", 1, True, None, None),
    ("data.global_batch_size", 1, True, None, None), ("data.micro_batch_size", 1, True, None, None),
    ("data.max_tokens_per_micro_batch", 0, True, None, None),
    ("data.epochs", 1, True, None, None), ("data.max_skip_fraction", 0, True, 1, True),
    ("data.num_workers", 0, True, None, None), ("data.prefetch_steps", 1, True, None, None),
    ("rollout.n", 1, True, None, None), ("rollout.temperature", 0, True, None, None),
    ("rollout.top_p", 0, False, 1, True), ("rollout.max_new_tokens", 1, True, None, None),
    ("rollout.sglang_tp", 1, True, None, None), ("rollout.sglang_mem_fraction", 0, False, 1, False),
    ("rollout.weight_bucket_mb", 1, True, None, None), ("rollout.num_servers", 1, True, None, None),
    ("rollout.launch_timeout_s", 0, False, None, None),
    ("rollout.request_timeout_s", 0, False, None, None), ("rollout.max_retries", 0, True, None, None),
    ("rollout.weight_check_tensors", 0, True, None, None),
    ("rollout.servers_per_node", 0, True, None, None),
    ("rewards.accuracy_weight", 0, True, None, None), ("rewards.format_weight", 0, True, None, None),
    ("rewards.num_workers", 0, True, None, None), ("rewards.overlong_buffer", 0, True, None, None),
    ("rewards.overlong_penalty_factor", 0, True, None, None),
    ("algorithm.clip_low", 0, True, None, None), ("algorithm.clip_high", 0, True, None, None),
    ("algorithm.dual_clip", 1, False, None, None), ("algorithm.ppo_epochs", 1, True, None, None),
    ("algorithm.mini_batch_prompts", 0, True, None, None), ("algorithm.kl_coef", 0, True, None, None),
    ("algorithm.max_num_gen_batches", 1, True, None, None),
    ("algorithm.gen_batch_prompts", 0, True, None, None), ("algorithm.tis_cap", 0, False, None, None),
    ("algorithm.off_policy_steps", 0, True, 1, True),
    ("algorithm.prompts_per_step", 1, True, None, None),
    ("algorithm.caption_weight", 0, True, None, None),
    ("algorithm.reasoning_weight", 0, True, None, None),
    ("algorithm.format_penalty", 0, True, None, None),
    ("discriminator.num_experts", 1, True, None, None), ("discriminator.top_k", 1, True, None, None),
    ("discriminator.noise_std", 0, True, None, None),
    ("discriminator.value_head_dropout", 0, True, 1, False),
    ("discriminator.lr", 0, False, None, None), ("discriminator.score_clip", 0, False, None, None),
    ("discriminator.score_reg", 0, True, None, None),
    ("discriminator.aux_loss_coef", 0, True, None, None),
    ("discriminator.warmup_aux_loss_coef", 0, True, None, None),
    ("discriminator.tp", 1, True, None, None), ("discriminator.ep", 1, True, None, None),
    ("discriminator.pp", 1, True, None, None), ("discriminator.eval_interval", 0, True, None, None),
    ("eval.max_new_tokens", 1, True, None, None), ("eval.limit", 0, True, None, None),
    ("eval.temperature", 0, True, None, None), ("eval.top_p", 0, False, 1, True),
    ("eval.n", 1, True, None, None), ("eval.batch_size", 1, True, None, None),
    ("eval.interval", 0, True, None, None), ("eval.probe_rows", 0, True, None, None),
    ("checkpoint.save_interval", 1, True, None, None), ("checkpoint.keep_last", 0, True, None, None),
    ("logging.log_interval", 1, True, None, None),
)


def _interval(low, low_inc, high, high_inc) -> str:
    if high is None:
        return f"must be {'>=' if low_inc else '>'} {low}"
    return f"must be in {'[' if low_inc else '('}{low}, {high}{']' if high_inc else ')'}"


def validate(cfg: PrismConfig | DictConfig) -> None:
    """Checks the enumerated options and the numeric ranges before anything is loaded; raises
    ConfigError naming the key, the bad value and the allowed range."""
    for dotted, allowed in CHOICES.items():
        value = _get(cfg, dotted, allowed[0])
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is not one of {list(allowed)}")
    for dotted, low, low_inc, high, high_inc in RANGES:
        value = _get(cfg, dotted, None)
        if value is None or isinstance(value, bool):
            continue
        ok = (value >= low if low_inc else value > low) and (
            high is None or (value <= high if high_inc else value < high))
        if not ok:
            raise ConfigError(f"{dotted}={value!r} {_interval(low, low_inc, high, high_inc)}")
    if _get(cfg, "optimizer.min_lr", 0) > _get(cfg, "optimizer.lr", 1):
        raise ConfigError(f"optimizer.min_lr={_get(cfg, 'optimizer.min_lr')} is above "
                          f"optimizer.lr={_get(cfg, 'optimizer.lr')}: the schedule decays from lr "
                          f"to min_lr")
    top_k = _get(cfg, "rollout.top_k", -1)
    if top_k is not None and top_k < 1 and top_k not in (-1, 0):
        raise ConfigError(f"rollout.top_k={top_k} must be -1 or 0 (off) or >= 1")
    if _get(cfg, "discriminator.top_k", 1) > _get(cfg, "discriminator.num_experts", 1):
        raise ConfigError(f"discriminator.top_k={_get(cfg, 'discriminator.top_k')} exceeds "
                          f"discriminator.num_experts={_get(cfg, 'discriminator.num_experts')}")
    min_pixels, max_pixels = _get(cfg, "data.min_pixels", None), _get(cfg, "data.max_pixels", None)
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ConfigError(f"data.min_pixels={min_pixels} is above data.max_pixels={max_pixels}")
    if _get(cfg, "rollout.servers_per_node", 0) and _get(cfg, "rollout.num_servers", 1) > 1:
        raise ConfigError(f"rollout.servers_per_node={_get(cfg, 'rollout.servers_per_node')} and "
                          f"rollout.num_servers={_get(cfg, 'rollout.num_servers')}: set one (per "
                          f"node on every node, or all on the first node)")
    pp_layers = _get(cfg, "parallel.pp_layers", None)
    if pp_layers is not None:
        pp = _get(cfg, "parallel.pp", 1)
        if len(pp_layers) != pp or min(pp_layers, default=0) < 1:
            raise ConfigError(f"parallel.pp_layers={list(pp_layers)} must list pp={pp} stages of "
                              f">= 1 decoder layer each")


_MISSING = object()


def _get(cfg: Any, dotted: str, default: Any = _MISSING) -> Any:
    """``cfg.a.b`` for ``"a.b"``; ``default`` when a key does not exist in this schema."""
    for part in dotted.split("."):
        try:
            cfg = getattr(cfg, part)
        except (AttributeError, OmegaConfBaseException):
            if default is _MISSING:
                raise
            return default
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type = PrismConfig, *, label: str = "config",
                check: Callable[[DictConfig], None] | None = validate) -> Any:
    """Defaults <- YAML file <- ``key=value`` overrides, type-checked against ``schema`` (the one
    loader of every structured config: the stages' and the pipeline's). ``check`` validates the
    merged config before it becomes dataclasses; every problem is one ConfigError line."""
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        cfg = OmegaConf.structured(schema)
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file {path} does not exist")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"bad {label} ({path or 'defaults'}): {_describe(exc)}") from None
    if check is not None:
        check(cfg)
    return OmegaConf.to_object(cfg)


def to_yaml(cfg: PrismConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
