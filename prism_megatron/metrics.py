"""Run metrics: one logger for console progress, tensorboard, wandb, a JSONL history and PNG curves.

Only the main rank writes. Every stage logs through ``MetricsLogger.log(step, metrics)``; the
history file (``metrics.jsonl``) is what plots, result tables and resumed runs read back. It is
only ever appended to: a resumed run (which may have fallen back to an older checkpoint) adds
rows for the steps it redoes, and readers (``read_history``) take the last row of each step.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from prism_megatron.distributed import is_main_rank
from prism_megatron.errors import PrismError

log = logging.getLogger("prism")
progress_log = logging.getLogger("prism.progress")


def setup_logging(level: int = logging.INFO) -> None:
    """Our INFO logs on the main rank (call after torch.distributed is up, so the other ranks
    know they are not main and only log warnings); megatron's and matplotlib's only from WARNING
    up (megatron lists every parameter of every gradient bucket at INFO)."""
    main = is_main_rank()
    logging.basicConfig(level=level if main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("prism").setLevel(level if main else logging.WARNING)
    logging.getLogger("prism_megatron").setLevel(level if main else logging.WARNING)
    for noisy in ("megatron", "matplotlib", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class WandbMissingError(PrismError):
    """``logging.wandb_project`` is set but the wandb package is not installed."""


def _open_wandb(project: str, run_dir: Path, config: dict | None):
    try:
        import wandb
    except ImportError:
        raise WandbMissingError(
            f"logging.wandb_project={project!r} but the wandb package is not installed: "
            "pip install wandb, or leave logging.wandb_project empty") from None
    return wandb.init(project=project, name=run_dir.name, dir=str(run_dir), config=config,
                      resume="allow")


class MetricsLogger:
    """``with MetricsLogger(run_dir, total_steps, start_step) as m: m.log(step, {...})``.

    Every step goes to ``metrics.jsonl``; every ``log_interval`` steps (and the last) also to
    the progress bar, a console/stage.log line, tensorboard and wandb. ``log(..., tokens=,
    samples=)`` adds ``perf/tokens_per_s`` and ``perf/samples_per_s`` over the step's wall time.
    """

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, *,
                 tensorboard: bool = True, desc: str = "train", show: Iterable[str] = ("loss",),
                 log_interval: int = 1, wandb_project: str = "", wandb_config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.main = is_main_rank()
        self.show = tuple(show)
        self.total = total_steps
        self.desc = desc
        self.interval = max(1, int(log_interval))
        self.writer = None
        self.wandb = None
        self.bar = None
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.history_path = self.run_dir / "metrics.jsonl"
        if wandb_project:
            self.wandb = _open_wandb(wandb_project, self.run_dir, wandb_config)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is in requirements.txt; degrade quietly if absent
                self.writer = None
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)
        self._last = time.perf_counter()

    def tick(self) -> None:
        """Start the clock of a step (so ``time/step_s`` and throughput leave out the previous
        step's checkpoint save and evaluation)."""
        self._last = time.perf_counter()

    def log(self, step: int, metrics: dict[str, float], *, tokens: float | None = None,
            samples: float | None = None) -> None:
        if not self.main:
            return
        now = time.perf_counter()
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics.setdefault("time/step_s", now - self._last)
        self._last = now
        seconds = max(metrics["time/step_s"], 1e-9)
        if tokens is not None:
            metrics["perf/tokens_per_s"] = float(tokens) / seconds
        if samples is not None:
            metrics["perf/samples_per_s"] = float(samples) / seconds
        with self.history_path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if step % self.interval and step != self.total:
            return
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        shown = {k: f"{metrics[k]:.4g}" for k in self.show if k in metrics}
        if "perf/tokens_per_s" in metrics:
            shown["tok/s"] = f"{metrics['perf/tokens_per_s']:.4g}"
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(shown)
        perf = "".join(f" {name} {metrics[key]:.1f}" for key, name in (
            ("perf/tokens_per_s", "tokens/s"), ("perf/samples_per_s", "samples/s")) if key in metrics)
        progress_log.info("%s step %d/%d: %s;%s %.2f s/step", self.desc, step, self.total,
                          ", ".join(f"{k} {v}" for k, v in shown.items() if k != "tok/s"),
                          perf, metrics["time/step_s"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_history(run_dir: str | Path) -> list[dict]:
    """The run's rows, one per step (the last written for a step wins: a resumed run redoes the
    steps after its checkpoint), in step order. Partial trailing lines (a kill mid-write) are
    ignored."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)]


def plot_curves(run_dir: str | Path, keys: Iterable[str], out_name: str = "curves.png",
                title: str = "") -> Path | None:
    """One panel per metric key from the run's history; returns the PNG path."""
    history = read_history(run_dir)
    keys = [k for k in keys if any(k in row for row in history)]
    if not history or not keys or not is_main_rank():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        rows = [r for r in history if key in r]
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(run_dir) / out_name
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
