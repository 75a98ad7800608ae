"""The pipeline's configuration: its stages, what each needs, and one-line config errors."""

from __future__ import annotations

from dataclasses import dataclass, field

from prism_megatron.config import ConfigError, load_config

STAGES = ("convert", "sft", "pairs", "upcycle", "warmup", "align", "prism_rlvr", "baseline_rlvr")
NEEDS = {"convert": (), "sft": ("convert",), "pairs": ("sft",), "upcycle": (),
         "warmup": ("pairs", "upcycle"), "align": ("sft", "warmup"), "prism_rlvr": ("align",),
         "baseline_rlvr": ("sft",)}
POLICY_STAGES = ("sft", "align", "prism_rlvr", "baseline_rlvr")   # report held-out accuracy
BENCHMARK_STAGES = ("align", "prism_rlvr", "baseline_rlvr")   # evaluated with `benchmarks`


@dataclass
class StageSpec:
    config: str = ""                  # the stage's YAML (examples/tiny/sft.yaml style)
    overrides: list[str] = field(default_factory=list)   # key=value for it, applied last
    skip: bool = False
    nproc: int = 0                    # processes for this stage; 0 = the pipeline's nproc


@dataclass
class PairsSpec(StageSpec):
    """Warm-up pairs: teacher demos of ``data.align_file`` vs the SFT policy's samples. ``config``
    (optional) is any stage YAML whose ``rollout`` section picks the engine (default: local)."""
    samples: int = 1                  # policy samples per prompt (training pairs)
    heldout_rows: int = 16            # last align rows kept for held-out pairwise accuracy
    max_rows: int = 0                 # use only the first N align rows; 0 = all
    max_new_tokens: int = 256


@dataclass
class UpcycleSpec:
    hf_dir: str = ""                  # dense model to upcycle; empty = the pipeline's hf_dir
    num_experts: int = 4
    top_k: int = 2
    noise_std: float = 0.01
    skip: bool = False


@dataclass
class PipelineData:
    sft_files: list[str] = field(default_factory=list)
    align_file: str = ""              # prompts + teacher_caption / teacher_cot
    rl_file: str = ""
    test_files: list[str] = field(default_factory=list)   # held-out: the results table


@dataclass
class PipelineConfig:
    work_dir: str = "runs/pipeline"
    hf_dir: str = ""                  # base policy (HF): processor, tokenizer, initial weights
    megatron_dir: str = ""            # already converted base; empty = convert hf_dir
    seed: int = 0
    nproc: int = 1
    stages: list[str] = field(default_factory=list)   # run only these (empty = all)
    until: str = ""                   # stop after this stage
    show_output: bool = True          # stream the stages' output to the console too
    threads: int = 0                  # CPU threads per stage process (OMP_NUM_THREADS); 0 = all
    # stage -> another work_dir whose finished stage is reused, not run here (the demo shares
    # SFT and the discriminator between its seeds)
    shared: dict[str, str] = field(default_factory=dict)
    policy_overrides: list[str] = field(default_factory=list)  # for sft/align/rlvr (eval.limit)
    # a `prism eval` config (e.g. examples/eval_paper.yaml): after each RL stage its policy is
    # exported to HF and evaluated on it; the results table gains a column per benchmark
    benchmarks: str = ""
    benchmark_overrides: list[str] = field(default_factory=list)   # key=value for that eval
    data: PipelineData = field(default_factory=PipelineData)
    convert: StageSpec = field(default_factory=StageSpec)
    sft: StageSpec = field(default_factory=StageSpec)
    pairs: PairsSpec = field(default_factory=PairsSpec)
    upcycle: UpcycleSpec = field(default_factory=UpcycleSpec)
    warmup: StageSpec = field(default_factory=StageSpec)
    align: StageSpec = field(default_factory=StageSpec)
    rlvr: StageSpec = field(default_factory=StageSpec)   # both prism_rlvr and baseline_rlvr


def load_pipeline_config(path: str | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Defaults <- YAML <- ``key=value`` (``prism_megatron.config.load_config``, the one loader),
    then the pipeline's own checks; every problem is one ConfigError line."""
    cfg = load_config(path or None, overrides, PipelineConfig, label="pipeline config", check=None)
    check_config(cfg)
    return cfg


def check_config(cfg: PipelineConfig) -> None:
    def known(key, names):
        bad = [n for n in names if n not in STAGES]
        if bad:
            raise ConfigError(f"{key}: unknown stage(s) {bad}; stages are {list(STAGES)}")

    known("stages", cfg.stages)
    known("until", [cfg.until] if cfg.until else [])
    known("shared", list(cfg.shared))
    empty = [stage for stage, work in cfg.shared.items() if not work]
    if empty:
        raise ConfigError(f"shared: no work_dir given for {empty}")
    if cfg.nproc < 1:
        raise ConfigError(f"nproc={cfg.nproc} must be >= 1")
    if cfg.threads < 0:
        raise ConfigError(f"threads={cfg.threads} must be >= 0 (0: torch's default)")
    if not cfg.hf_dir:
        raise ConfigError("hf_dir is empty: the base policy's HF directory")
    needed = {"sft": (cfg.sft, "data.sft_files", cfg.data.sft_files),
              "pairs": (cfg.pairs, "data.align_file", cfg.data.align_file),
              "align": (cfg.align, "data.align_file", cfg.data.align_file),
              "prism_rlvr": (cfg.rlvr, "data.rl_file", cfg.data.rl_file),
              "baseline_rlvr": (cfg.rlvr, "data.rl_file", cfg.data.rl_file)}
    for stage, (spec, key, value) in needed.items():
        if selected(cfg, stage) and not spec.skip and stage not in cfg.shared:
            if not value:
                raise ConfigError(f"{key} is empty (stage {stage} needs it)")
    for name, stages in (("sft", ("sft",)), ("warmup", ("warmup",)), ("align", ("align",)),
                         ("rlvr", ("prism_rlvr", "baseline_rlvr"))):
        spec = getattr(cfg, name)
        wanted = [s for s in stages if selected(cfg, s) and s not in cfg.shared]
        if wanted and not spec.skip and not spec.config:
            raise ConfigError(f"{name}.config is empty: the stage's YAML, e.g. "
                              f"examples/tiny/{'rlvr_grpo' if name == 'rlvr' else name}.yaml")
        if spec.nproc < 0:
            raise ConfigError(f"{name}.nproc={spec.nproc} must be >= 0")
    if not cfg.data.test_files:
        raise ConfigError("data.test_files is empty: the held-out files of the results table")
    if cfg.pairs.heldout_rows < 1 or cfg.pairs.samples < 1:
        raise ConfigError("pairs.heldout_rows and pairs.samples must be >= 1")


def selected(cfg: PipelineConfig, stage: str) -> bool:
    if cfg.stages and stage not in cfg.stages:
        return False
    return not cfg.until or STAGES.index(stage) <= STAGES.index(cfg.until)
