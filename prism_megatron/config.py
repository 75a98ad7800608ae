"""Structured configuration: OmegaConf dataclasses, YAML files, ``key=value`` overrides.

Defaults are PRISM's (../shared/PRISM_SPEC.md §1, §3.5, §6) where the spec gives one.
Model hyper-parameters are NOT here: they come from the checkpoint's config.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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
    recompute: bool = False            # full activation recompute
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


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    max_prompt_length: int = 2048
    max_response_length: int = 8192
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    packing: bool = False
    global_batch_size: int = 32
    micro_batch_size: int = 1
    epochs: int = 1
    shuffle: bool = True
    max_skip_fraction: float = 0.01    # fail if more rows than this are unusable
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
    num_servers: int = 1               # managed data-parallel servers (ignored with urls)
    launch_timeout_s: float = 900.0    # wait for a launched server to answer /health_generate
    request_timeout_s: float = 600.0
    max_retries: int = 3               # per request, exponential backoff from 0.5 s
    restart_on_failure: bool = False   # relaunch a dead managed server instead of failing
    release_memory_between_phases: bool = False   # release/resume_memory_occupation around training
    weight_sync: str = "tensor"        # tensor (update_weights_from_tensor) | disk (safetensors dir)


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
    entropy_coef: float = 0.0
    dynamic_sampling: bool = False
    max_num_gen_batches: int = 10
    gen_batch_prompts: int = 0         # DAPO prompts per generation round; 0 = prompts_per_step
    tis_cap: Optional[float] = None    # truncated importance sampling cap; None = off
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
    warmup_aux_loss_coef: float = 0.01  # load-balancing coef of the warm-up stage (spec §3.6, §9.5)
    eval_interval: int = 0             # warm-up: held-out pairwise accuracy every N steps (0 = end)


@dataclass
class EvalConfig:
    """Held-out generation + verifiable scoring (``data.eval_files``) and, in ``prism eval``,
    the paper's benchmarks (``benchmarks``: name -> local file, see prism_megatron/eval/)."""
    max_new_tokens: int = 256
    limit: int = 0                     # rows per file; 0 = all
    temperature: float = 0.0           # 0 = greedy
    top_p: float = 1.0
    n: int = 1                         # samples per prompt (pass@n when > 1)
    batch_size: int = 32
    benchmarks: dict[str, str] = field(default_factory=dict)   # e.g. {mathvista: testmini.json}


@dataclass
class CheckpointConfig:
    save_dir: str = ""
    save_interval: int = 100
    keep_last: int = 3
    resume: str = "auto"               # auto | none | <path>
    format: str = "torch_dist"


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    log_interval: int = 1
    tensorboard: bool = True
    plots: bool = True


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
    "optimizer.schedule": ("cosine", "constant", "linear"),
    "rollout.engine": ("local", "sglang"),
    "algorithm.name": ("grpo", "dapo", "gspo", "prism"),
    "algorithm.loss_agg": ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                           "seq-mean-token-sum-norm"),
    "algorithm.kl_kind": ("kl", "abs", "mse", "low_var_kl"),
    "discriminator.expert_routing": ("learned", "segment"),
    "checkpoint.format": ("torch_dist", "legacy"),
}


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    detail = str(exc).splitlines()[0]
    return f"{key}: {detail}" if key else detail


def validate(cfg: PrismConfig | DictConfig) -> None:
    """Checks the enumerated options; raises ConfigError naming the key and the bad value."""
    for dotted, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, dotted) if isinstance(cfg, DictConfig) else _get(cfg, dotted)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is not one of {list(allowed)}")
    for dotted in ("parallel.tp", "parallel.pp", "parallel.ep", "rollout.n",
                   "data.global_batch_size", "data.micro_batch_size", "data.prefetch_steps"):
        if _get(cfg, dotted) < 1:
            raise ConfigError(f"{dotted}={_get(cfg, dotted)} must be >= 1")
    if _get(cfg, "data.num_workers") < 0:
        raise ConfigError(f"data.num_workers={_get(cfg, 'data.num_workers')} must be >= 0")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type = PrismConfig) -> PrismConfig:
    """Defaults <- YAML file <- ``key=value`` overrides, type-checked against ``schema``."""
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
        raise ConfigError(f"bad config ({path or 'defaults'}): {_describe(exc)}") from None
    validate(cfg)
    return OmegaConf.to_object(cfg)


def to_yaml(cfg: PrismConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
