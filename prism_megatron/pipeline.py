"""``prism pipeline CONFIG [key=value ...]``: the whole recipe and its baseline, resumable.

    convert (HF -> Megatron) -> sft -> pairs (the SFT policy's own samples vs the teacher demos)
    -> upcycle (dense base -> MoE discriminator) -> warmup -> align -> prism_rlvr
    and, from the same SFT checkpoint, baseline_rlvr (SFT -> RLVR without alignment)
    -> results.json / results.md / rlvr_comparison.png in the work directory.

Why subprocesses: every stage runs exactly the command a user would type
(``python -m prism_megatron.cli <stage> <yaml> key=value ...``, under ``torch.distributed.run``
when a stage has more than one process), so a pipeline result is reproducible stage by stage, a
crash in one stage cannot leave torch.distributed or megatron state behind for the next, and this
process never imports torch. Its output is teed to ``<work>/<stage>/stage.log``.

Why markers: a stage is done when ``<work>/<stage>/done.json`` exists; the pipeline writes it
after the subprocess succeeded (with the command and the stage's first/last metrics rows). Done
stages are skipped. A stage without a marker is simply started again: the training stages resume
from their own latest checkpoint (``checkpoint.resume=auto``), the tool steps (conversion,
pairs, upcycling) write their outputs atomically and start over. So a killed pipeline continues at
the stage and the step it had reached. ``shared_from`` + ``shared_stages`` read finished stages
from another work directory (``make demo`` shares SFT and the discriminator between its seeds).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prism_megatron.config import ConfigError
from prism_megatron.errors import PrismError

STAGES = ("convert", "sft", "pairs", "upcycle", "warmup", "align", "prism_rlvr", "baseline_rlvr")
NEEDS = {"convert": (), "sft": ("convert",), "pairs": ("sft",), "upcycle": (),
         "warmup": ("pairs", "upcycle"), "align": ("sft", "warmup"), "prism_rlvr": ("align",),
         "baseline_rlvr": ("sft",)}
TOOL_STEPS = ("convert", "pairs", "upcycle")          # library calls, run by this module's main
POLICY_STAGES = ("sft", "align", "prism_rlvr", "baseline_rlvr")   # report held-out accuracy
REPO = Path(__file__).resolve().parents[1]


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
    shared_from: str = ""             # another work_dir whose finished stages are reused ...
    shared_stages: list[str] = field(default_factory=list)   # ... for these stages
    policy_overrides: list[str] = field(default_factory=list)  # for sft/align/rlvr (eval.limit)
    data: PipelineData = field(default_factory=PipelineData)
    convert: StageSpec = field(default_factory=StageSpec)
    sft: StageSpec = field(default_factory=StageSpec)
    pairs: PairsSpec = field(default_factory=PairsSpec)
    upcycle: UpcycleSpec = field(default_factory=UpcycleSpec)
    warmup: StageSpec = field(default_factory=StageSpec)
    align: StageSpec = field(default_factory=StageSpec)
    rlvr: StageSpec = field(default_factory=StageSpec)   # both prism_rlvr and baseline_rlvr


def load_pipeline_config(path: str | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Defaults <- YAML <- ``key=value``; every problem is one ConfigError line."""
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        cfg = OmegaConf.structured(PipelineConfig)
        if path:
            if not Path(path).is_file():
                raise ConfigError(f"config file {path} does not exist")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        cfg = OmegaConf.to_object(OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides)))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        detail = str(exc).splitlines()[0]
        raise ConfigError(f"bad pipeline config ({path or 'defaults'}): "
                          + (f"{key}: {detail}" if key else detail)) from None
    check_config(cfg)
    return cfg


def check_config(cfg: PipelineConfig) -> None:
    def known(key, names):
        bad = [n for n in names if n not in STAGES]
        if bad:
            raise ConfigError(f"{key}: unknown stage(s) {bad}; stages are {list(STAGES)}")

    known("stages", cfg.stages)
    known("until", [cfg.until] if cfg.until else [])
    known("shared_stages", cfg.shared_stages)
    if cfg.shared_stages and not cfg.shared_from:
        raise ConfigError("shared_stages needs shared_from (the work_dir that ran them)")
    if cfg.nproc < 1:
        raise ConfigError(f"nproc={cfg.nproc} must be >= 1")
    if not cfg.hf_dir:
        raise ConfigError("hf_dir is empty: the base policy's HF directory")
    needed = {"sft": (cfg.sft, "data.sft_files", cfg.data.sft_files),
              "pairs": (cfg.pairs, "data.align_file", cfg.data.align_file),
              "align": (cfg.align, "data.align_file", cfg.data.align_file),
              "prism_rlvr": (cfg.rlvr, "data.rl_file", cfg.data.rl_file),
              "baseline_rlvr": (cfg.rlvr, "data.rl_file", cfg.data.rl_file)}
    for stage, (spec, key, value) in needed.items():
        if selected(cfg, stage) and not spec.skip and stage not in cfg.shared_stages:
            if not value:
                raise ConfigError(f"{key} is empty (stage {stage} needs it)")
    for name, stages in (("sft", ("sft",)), ("warmup", ("warmup",)), ("align", ("align",)),
                         ("rlvr", ("prism_rlvr", "baseline_rlvr"))):
        spec = getattr(cfg, name)
        wanted = [s for s in stages if selected(cfg, s) and s not in cfg.shared_stages]
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


# ------------------------------------------------------------------------------ the runner

class Pipeline:
    def __init__(self, cfg: PipelineConfig, log=print):
        self.cfg, self.log = cfg, log
        self.work = Path(cfg.work_dir).resolve()
        self.status: dict[str, dict] = {}

    def dir(self, stage: str) -> Path:
        if stage in self.cfg.shared_stages:
            return Path(self.cfg.shared_from).resolve() / stage
        return self.work / stage

    def marker(self, stage: str) -> dict | None:
        path = self.dir(stage) / "done.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def available(self, stage: str) -> bool:
        return (stage == "convert" and bool(self.cfg.megatron_dir)) or self.marker(stage) is not None

    # paths every stage agrees on
    def base_megatron(self) -> str:
        return str(Path(self.cfg.megatron_dir).resolve()) if self.cfg.megatron_dir \
            else str(self.dir("convert") / "megatron")

    def ckpt(self, stage: str) -> str:
        return str(self.dir(stage) / "ckpt")

    def command(self, stage: str) -> list[str]:
        c, d = self.cfg, self.cfg.data
        hf, seed = str(_path(c.hf_dir)), f"seed={c.seed}"
        files = lambda paths: "[" + ",".join(str(_path(p)) for p in paths) + "]"   # noqa: E731
        run = [f"checkpoint.save_dir={self.ckpt(stage)}", f"logging.run_dir={self.dir(stage)}"]
        tests = f"data.eval_files={files(d.test_files)}"
        disc = [f"discriminator.num_experts={c.upcycle.num_experts}",
                f"discriminator.top_k={c.upcycle.top_k}"]
        if stage == "convert":
            return _tool(stage, hf_dir=hf, out=self.base_megatron())
        if stage == "pairs":
            return _tool(stage, policy=self.ckpt("sft"), hf_dir=hf, align_file=str(_path(
                d.align_file)), out=str(self.dir(stage)), seed=c.seed, samples=c.pairs.samples,
                heldout_rows=c.pairs.heldout_rows, max_rows=c.pairs.max_rows,
                max_new_tokens=c.pairs.max_new_tokens,
                rollout_config=str(_path(c.pairs.config)) if c.pairs.config else "",
                overrides=list(c.pairs.overrides))
        if stage == "upcycle":
            u = c.upcycle
            return _tool(stage, hf_dir=str(_path(u.hf_dir or c.hf_dir)),
                         out=str(self.dir(stage) / "discriminator"), num_experts=u.num_experts,
                         top_k=u.top_k, noise_std=u.noise_std, seed=c.seed)
        if stage == "sft":
            args = [f"model.megatron_dir={self.base_megatron()}",
                    f"data.train_files={files(d.sft_files)}", tests]
        elif stage == "warmup":
            pairs = self.dir("pairs")
            args = [f"discriminator.megatron_dir={self.dir('upcycle') / 'discriminator'}", *disc,
                    f"data.train_files=[{pairs / 'pairs_train.jsonl'}]",
                    f"data.eval_files=[{pairs / 'pairs_heldout.jsonl'}]"]
        elif stage == "align":
            args = [f"model.megatron_dir={self.ckpt('sft')}",
                    f"discriminator.megatron_dir={self.ckpt('warmup')}", *disc,
                    f"data.train_files={files([d.align_file])}", tests]
        else:   # prism_rlvr / baseline_rlvr
            start = "align" if stage == "prism_rlvr" else "sft"
            args = [f"model.megatron_dir={self.ckpt(start)}",
                    f"data.train_files={files([d.rl_file])}", tests]
        spec = self.spec(stage)
        extra = c.policy_overrides if stage in POLICY_STAGES else []
        nproc = spec.nproc or c.nproc
        name = "rlvr" if stage.endswith("rlvr") else stage
        launcher = [sys.executable, "-m", "prism_megatron.cli"]
        if nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                        str(nproc), "--master_addr", "127.0.0.1", "--master_port",
                        str(_free_port()), "-m", "prism_megatron.cli"]
        return [*launcher, name, str(_path(spec.config)), seed, f"model.hf_dir={hf}", *args,
                *run, *extra, *spec.overrides]

    def spec(self, stage: str):
        return getattr(self.cfg, "rlvr" if stage.endswith("rlvr") else stage)

    def check_inputs(self) -> None:
        """Missing inputs fail here, in one line, not minutes later inside a stage."""
        c, d = self.cfg, self.cfg.data
        wanted = {"hf_dir": ([c.hf_dir], STAGES), "data.sft_files": (d.sft_files, ("sft",)),
                  "data.align_file": ([d.align_file], ("pairs", "align")),
                  "data.rl_file": ([d.rl_file], ("prism_rlvr", "baseline_rlvr")),
                  "data.test_files": (d.test_files, POLICY_STAGES)}
        for key, (paths, stages) in wanted.items():
            if any(self.will_run(s) for s in stages):
                for p in paths:
                    if not _path(p).exists():
                        raise PrismError(f"{key}: {p} does not exist")

    def will_run(self, stage: str) -> bool:
        return (selected(self.cfg, stage) and stage not in self.cfg.shared_stages
                and not getattr(self.spec(stage), "skip", False) and self.marker(stage) is None)

    def run(self) -> dict:
        self.check_inputs()
        self.work.mkdir(parents=True, exist_ok=True)
        self.log(f"[pipeline] work dir {self.work}")
        for stage in STAGES:
            self.step(stage)
        results = write_results(self)
        self.log(f"[pipeline] results: {self.work / 'results.md'}")
        return results

    def step(self, stage: str) -> None:
        say = lambda text: self.log(f"[pipeline] {stage:<13} {text}")   # noqa: E731
        done = self.marker(stage)
        if stage in self.cfg.shared_stages:
            if done is None:
                raise PrismError(f"stage {stage} is shared from {self.cfg.shared_from}, where it "
                                 "has not finished (run that pipeline first)")
            self.status[stage] = {"status": "shared", "seconds": done.get("seconds")}
            return say(f"shared: done in {self.dir(stage)}")
        if done is not None:
            self.status[stage] = {"status": "done earlier", "seconds": done.get("seconds")}
            changed = (f"; NOTE: its command has changed since (delete {self.dir(stage)}/"
                       "done.json to rerun it; it resumes from its checkpoint)"
                       if _strip_port(done.get("command")) != _strip_port(self.command(stage))
                       else "")
            return say(f"skipped: done earlier ({_fmt(done.get('seconds', 0))}){changed}")
        spec = self.spec(stage)
        why = ("not selected" if not selected(self.cfg, stage)
               else "megatron_dir given" if stage == "convert" and self.cfg.megatron_dir
               else "skip: true" if getattr(spec, "skip", False) else None)
        missing = [n for n in NEEDS[stage] if not self.available(n)]
        if why is None and missing:
            why = f"needs {', '.join(missing)}"
        if why:
            self.status[stage] = {"status": f"skipped ({why})"}
            return say(f"skipped ({why})")
        self.dir(stage).mkdir(parents=True, exist_ok=True)
        log_path = self.dir(stage) / "stage.log"
        latest = Path(self.ckpt(stage)) / "latest"
        resume = f", resuming from {latest.read_text().strip()}" if latest.is_file() else ""
        say(f"running{resume} (log: {log_path})")
        command, start = self.command(stage), time.time()
        run_logged(command, log_path, stage, show=self.cfg.show_output)
        seconds = time.time() - start
        marker = {"stage": stage, "seconds": round(seconds, 1), "command": command,
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **stage_rows(self.dir(stage))}
        (self.dir(stage) / "done.json").write_text(json.dumps(marker, indent=1) + "\n")
        self.status[stage] = {"status": "ran", "seconds": round(seconds, 1)}
        say(f"done in {_fmt(seconds)}{_headline(marker.get('last', {}))}")


def stage_rows(run_dir: Path) -> dict:
    """The first and last rows of a training stage's metrics.jsonl (held-out evals live there)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {"first": rows[0], "last": rows[-1], "steps": rows[-1]["step"]} if rows else {}


def run_logged(command: list[str], log_path: Path, stage: str, show: bool) -> None:
    """Runs ``command``, its stdout+stderr appended to ``log_path`` (and the console when
    ``show``); a failure is a PrismError naming the stage, the log and its last lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVTE_")
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
               TRANSFORMERS_OFFLINE=env.get("TRANSFORMERS_OFFLINE", "1"))
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, stdin=subprocess.DEVNULL)
        previous = _exit_on_sigterm()
        try:
            while chunk := os.read(proc.stdout.fileno(), 65536):
                log.write(chunk)
                log.flush()
                if show:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            code = proc.wait()
        except BaseException:          # Ctrl-C / kill of the pipeline: do not leave it running
            proc.kill()
            proc.wait()
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    if code != 0:
        text = log_path.read_text(errors="replace").splitlines()
        tail = [line.rsplit("\r", 1)[-1] for line in text[-15:]]
        raise PrismError(f"stage {stage} failed (exit code {code}); log: {log_path}\n"
                         + "\n".join(f"    {line}" for line in tail if line.strip()))


# ------------------------------------------------------------------------------ results

ROWS = (("base", "base model (before SFT)", "both", "sft", "first"),
        ("sft", "SFT", "both", "sft", "last"),
        ("baseline_rlvr", "SFT -> RLVR", "baseline", "baseline_rlvr", "last"),
        ("align", "SFT -> PRISM (alignment only)", "PRISM", "align", "last"),
        ("prism_rlvr", "SFT -> PRISM -> RLVR", "PRISM", "prism_rlvr", "last"))


def heldout_names(cfg: PipelineConfig) -> list[str]:
    return [Path(p).stem for p in cfg.data.test_files]


def collect_results(pipe: Pipeline) -> dict:
    """Held-out accuracy / format rate of every policy the pipeline produced (None: not run)."""
    names = heldout_names(pipe.cfg)
    rows = []
    for key, label, pipeline, stage, which in ROWS:
        marker = pipe.marker(stage) or {}
        metrics = marker.get(which) or {}
        row = {"key": key, "label": label, "pipeline": pipeline, "stage": stage,
               "step": metrics.get("step")}
        for name in names:
            for m in ("accuracy", "format_rate", "response_tokens"):
                row[f"{name}/{m}"] = metrics.get(f"eval/{name}/{m}")
        rows.append(row)
    warm = pipe.dir("warmup") / "warmup_report.json"
    return {"work_dir": str(pipe.work), "seed": pipe.cfg.seed, "heldout": names, "rows": rows,
            "accuracy": {r["key"]: r[f"{names[0]}/accuracy"] for r in rows},
            "discriminator_heldout": json.loads(warm.read_text()).get("heldout")
            if warm.is_file() else None,
            "stages": pipe.status}


def results_markdown(results: dict) -> str:
    names = results["heldout"]
    head = "| policy | pipeline | step | " + " | ".join(
        f"{n} accuracy | {n} format" for n in names) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(names))]
    for r in results["rows"]:
        cells = [f"{r[f'{n}/{m}']:.3f}" if r[f"{n}/{m}"] is not None else "—"
                 for n in names for m in ("accuracy", "format_rate")]
        step = "—" if r["step"] is None else str(r["step"])
        lines.append(f"| {r['label']} | {r['pipeline']} | {step} | " + " | ".join(cells) + " |")
    disc = results.get("discriminator_heldout")
    if disc:
        lines.append(f"\ndiscriminator after warm-up: held-out pairwise accuracy caption "
                     f"{disc.get('acc_caption', float('nan')):.3f}, reasoning "
                     f"{disc.get('acc_reasoning', float('nan')):.3f} "
                     f"({disc.get('pairs', 0):.0f} pairs with a format-valid student)")
    return "\n".join(lines) + "\n"


def write_results(pipe: Pipeline) -> dict:
    results = collect_results(pipe)
    (pipe.work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (pipe.work / "results.md").write_text(results_markdown(results))
    runs = {label: [pipe.dir(stage)] for stage, label in
            (("baseline_rlvr", "SFT -> RLVR"), ("prism_rlvr", "SFT -> PRISM -> RLVR"))}
    plot_rlvr_comparison(runs, pipe.work / "rlvr_comparison.png")
    return results


def plot_rlvr_comparison(runs: dict[str, list[Path]], out: Path,
                         keys=("reward", "accuracy", "format_rate")) -> Path | None:
    """One panel per training metric: every run thin, the mean over a pipeline's runs bold."""
    from prism_megatron.metrics import read_history

    histories = {label: [h for h in (read_history(d) for d in dirs) if len(h) > 1]
                 for label, dirs in runs.items()}
    if not any(histories.values()):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for colour, (label, hs) in zip(("tab:blue", "tab:red"), histories.items()):
            curves = [{r["step"]: r[key] for r in h if key in r} for h in hs]
            for c in curves:
                ax.plot(list(c), list(c.values()), color=colour, alpha=0.25, lw=0.8)
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if steps:
                ax.plot(steps, [sum(c[s] for c in curves) / len(curves) for s in steps],
                        color=colour, lw=2, label=f"{label} (n={len(curves)})")
        ax.set_title(f"RLVR train {key}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------ helpers

def _path(p: str) -> Path:
    """Relative paths are relative to the working directory; stage YAMLs also to the repo."""
    path = Path(p)
    if not path.is_absolute() and not path.exists() and (REPO / path).exists():
        path = REPO / path
    return path.resolve()


def _exit_on_sigterm():
    """SIGTERM to the pipeline becomes SystemExit, so the running stage is killed with it (the
    default action would orphan it). Returns the previous handler (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)


def _tool(step: str, **kwargs) -> list[str]:
    return [sys.executable, "-m", "prism_megatron.pipeline", "--step", step, json.dumps(kwargs)]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _strip_port(command):
    """Commands compare equal whatever free port torchrun got."""
    if not command:
        return command
    return [a for i, a in enumerate(command) if not (i and command[i - 1] == "--master_port")]


def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _headline(row: dict) -> str:
    keys = [k for k in row if k.startswith("eval/") and k.endswith(("accuracy", "format_rate"))]
    keys += [k for k in ("heldout/acc_caption", "heldout/acc_reasoning") if k in row]
    return ("; " + ", ".join(f"{k} {row[k]:.3f}" for k in keys)) if keys else ""


# ------------------------------------------------------------------------------ tool steps
# Run as `python -m prism_megatron.pipeline --step NAME JSON` (see Pipeline.command).

def _convert_step(hf_dir: str, out: str) -> None:
    from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron

    convert_hf_to_megatron(hf_dir, out, fmt="torch_dist", force=True, progress=False)
    print(f"converted {hf_dir} -> {out} (torch_dist, loadable at any TP/PP)")


def _upcycle_step(hf_dir, out, num_experts, top_k, noise_std, seed) -> None:
    from prism_megatron.models.discriminator.upcycle import upcycle

    upcycle(hf_dir, out, num_experts=num_experts, top_k=top_k, noise_std=noise_std, seed=seed,
            force=True, progress=False)


def _pairs_step(policy, hf_dir, align_file, out, seed, samples, heldout_rows, max_rows,
                max_new_tokens, rollout_config, overrides) -> None:
    """Export the SFT checkpoint to HF, sample it on the align prompts (students) and pair the
    samples with the teacher demos: pairs_train.jsonl and, from the last ``heldout_rows`` rows
    (not trained on), pairs_heldout.jsonl."""
    from prism_megatron.config import PrismConfig, load_config
    from prism_megatron.convert.megatron_to_hf import convert_megatron_to_hf
    from prism_megatron.data.encode import load_processor
    from prism_megatron.data.sft import read_rows
    from prism_megatron.models.discriminator.pairs import policy_pair_rows
    from prism_megatron.rollout import make_engine, sampling_params

    out = Path(out)
    policy_hf = out / "policy_hf"
    convert_megatron_to_hf(policy, policy_hf, hf_config_dir=hf_dir, force=True, progress=False)
    print(f"exported {policy} -> {policy_hf}")
    rows = [dict(r) for r in read_rows(align_file)]
    rows = rows[:max_rows] if max_rows else rows
    if len(rows) <= heldout_rows:
        raise PrismError(f"{align_file} has {len(rows)} rows: not enough for "
                         f"pairs.heldout_rows={heldout_rows} plus training pairs")
    rollout = (load_config(rollout_config, overrides) if rollout_config else PrismConfig()).rollout
    if not rollout_config:
        rollout.engine = "local"
    processor = load_processor(policy_hf)
    engine = make_engine(rollout, policy_hf)
    base = Path(align_file).parent
    try:
        for name, part, n in (("train", rows[:-heldout_rows], samples),
                              ("heldout", rows[-heldout_rows:], 1)):
            params = sampling_params(rollout, seed=seed + (name == "heldout"),
                                     max_new_tokens=max_new_tokens)
            pair_rows = policy_pair_rows(part, base, engine, processor, params, n)
            path = out / f"pairs_{name}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in pair_rows)
            print(f"{name}: {len(pair_rows)} pairs ({len(part)} prompts x {n}) -> {path}")
    finally:
        engine.shutdown()


STEPS = {"convert": _convert_step, "pairs": _pairs_step, "upcycle": _upcycle_step}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "--step" or argv[1] not in STEPS:
        print(f"usage: python -m prism_megatron.pipeline --step {{{','.join(STEPS)}}} JSON "
              "(internal; run `prism pipeline CONFIG` instead)", file=sys.stderr)
        return 2
    try:
        STEPS[argv[1]](**json.loads(argv[2]))
    except (PrismError, FileNotFoundError) as exc:
        print(f"pipeline step {argv[1]}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def cli(args, overrides) -> None:
    if not args.config:
        raise ConfigError("prism pipeline needs a config file, e.g. examples/tiny/pipeline.yaml")
    cfg = load_pipeline_config(args.config, overrides)
    results = Pipeline(cfg).run()
    print("\n" + results_markdown(results), end="")


if __name__ == "__main__":
    sys.exit(main())
