"""Run metrics: one logger for console progress, tensorboard, a JSONL history and PNG curves.

Only the main rank writes. Every stage logs through ``MetricsLogger.log(step, metrics)``; the
history file (``metrics.jsonl``) is what plots, result tables and resumed runs read back.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from prism_megatron.distributed import is_main_rank

log = logging.getLogger("prism")


def setup_logging(level: int = logging.INFO) -> None:
    """Our INFO logs on the main rank; megatron's and matplotlib's only from WARNING up (megatron
    lists every parameter of every gradient bucket at INFO)."""
    logging.basicConfig(level=level if is_main_rank() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("megatron", "matplotlib", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class MetricsLogger:
    """``with MetricsLogger(run_dir, total_steps, start_step) as m: m.log(step, {...})``."""

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, *,
                 tensorboard: bool = True, desc: str = "train", show: Iterable[str] = ("loss",)):
        self.run_dir = Path(run_dir)
        self.main = is_main_rank()
        self.show = tuple(show)
        self.writer = None
        self.bar = None
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.history_path = self.run_dir / "metrics.jsonl"
        self._truncate_history(start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is in requirements.txt; degrade quietly if absent
                self.writer = None
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)
        self._last = time.perf_counter()

    def _truncate_history(self, start_step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint, so the history stays one line
        per step."""
        if not self.history_path.exists():
            return
        kept = [line for line in self.history_path.read_text().splitlines()
                if line and json.loads(line)["step"] <= start_step]
        self.history_path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.main:
            return
        now = time.perf_counter()
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics.setdefault("time/step_s", now - self._last)
        self._last = now
        with self.history_path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in self.show if k in metrics})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_history(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


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
