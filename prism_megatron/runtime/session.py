"""A training stage's session: distributed set-up, logging, run files, the step loop with its
evaluations and checkpoints, preemption, teardown.

Every stage (sft, warmup, align, rlvr) is a short module around ``stage_session``::

    with stage_session(cfg, "sft", tp=..., pp=...) as session:
        processor = session.processor()
        ...                                             # data, models, trainer
        checkpoints = Checkpoints(cfg, trainer, state={"sampler": sampler})
        start = checkpoints.resume()
        return session.train_loop(one_step, start=start, total=total, checkpoints=checkpoints,
                                  evaluate=..., desc="sft", show=("loss", "lr"))

On entry: the checkpoint settings are checked (``check_stage_config``), torch.distributed and
megatron's groups come up, then logging (so only the main rank logs at INFO), the resolved config
is written to ``run_dir/config.yaml``, the stage's log to ``run_dir/stage.log`` (main rank), and
SIGTERM / SIGINT / SIGUSR1 handlers are installed. On exit (normal, error or preemption) all of it
is undone in reverse order, ``destroy_distributed`` last.

Preemption: a signal only sets a flag. After each step ``after_step`` all-reduces the flag over
the world (MAX, so every rank stops at the same step and none waits in a collective for a rank
that left), saves a checkpoint unless the step just saved one (the save is synchronous: the
writers have finished when it returns), logs ``preempted at step N, checkpoint saved``, writes
``run_dir/preempted.json`` and leaves with exit code ``PREEMPTED_EXIT_CODE`` (75, EX_TEMPFAIL:
"try again"). A second SIGINT (Ctrl-C twice) interrupts at once. Launchers: a single process
(``prism sft ...``) exits 75 itself; torchrun reports any failed worker as exit code 1, so
launch scripts look for ``run_dir/preempted.json`` (examples/slurm/).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from prism_megatron.config import ConfigError

log = logging.getLogger("prism.runtime")

PREEMPTED_EXIT_CODE = 75          # EX_TEMPFAIL (sysexits.h): stopped on request, rerun to resume
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PREEMPTED_FILE = "preempted.json"
STAGE_LOG = "stage.log"
STAGE_LOG_ENV = "PRISM_STAGE_LOG"  # set by the pipeline runner, which tees the stage's output there


class Preempted(SystemExit):
    """Raised (after the checkpoint is written) to leave a stage on a signal; exit code 75."""

    def __init__(self, step: int):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step


def check_stage_config(cfg) -> None:
    """Checkpoint/step settings every training stage needs, before anything is built."""
    c = cfg.checkpoint      # (numeric ranges are checked when the config is loaded: config.py)
    if c.enabled and not c.save_dir:
        raise ConfigError("checkpoint.save_dir is empty: the trained weights would be lost; set "
                          "checkpoint.save_dir=DIR, or checkpoint.enabled=false to train without "
                          "checkpoints")


@dataclass
class StepResult:
    """What one training step reports: its metrics and how much it trained on (throughput)."""

    metrics: dict[str, float]
    samples: int = 0
    tokens: int = 0
    extra: dict = field(default_factory=dict)   # stage-specific, not logged


class PreemptionWatch:
    """SIGTERM / SIGINT / SIGUSR1 set a flag (main thread only; a process forked from this one,
    such as megatron's checkpoint writers, ignores them and finishes its write)."""

    def __init__(self):
        self.signum: int | None = None
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._pid = os.getpid()
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        # No logging here (the signal may arrive inside a logging call): a raw write.
        again = " (Ctrl-C again: stop at once)" if signum == signal.SIGINT else ""
        os.write(2, f"prism: got {signal.Signals(signum).name}: stopping after this step "
                    f"(a checkpoint is written first){again}\n".encode())

    def requested(self) -> bool:
        """Whether any rank got a signal (collective over the world group)."""
        flag = self.signum is not None
        if dist.is_initialized() and dist.get_world_size() > 1:
            value = torch.tensor([1.0 if flag else 0.0])
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            flag = bool(value.item())
        return flag


class StageSession:
    def __init__(self, cfg, stage: str, info):
        from prism_megatron.distributed import is_main_rank

        self.cfg, self.stage, self.info = cfg, stage, info
        self.main = is_main_rank()
        self.run_dir = Path(cfg.logging.run_dir)
        self.watch = PreemptionWatch()
        self.started = time.perf_counter()

    @property
    def checkpointing(self) -> bool:
        return bool(self.cfg.checkpoint.enabled and self.cfg.checkpoint.save_dir)

    # ---- files -------------------------------------------------------------------------
    def write_run_files(self) -> None:
        from prism_megatron.config import to_yaml

        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / PREEMPTED_FILE).unlink(missing_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))

    def open_stage_log(self) -> logging.Handler | None:
        """A FileHandler on ``run_dir/stage.log`` (main rank), unless the pipeline runner already
        tees this process's output into that very file."""
        if not self.main:
            return None
        path = (self.run_dir / STAGE_LOG).resolve()
        teed = os.environ.get(STAGE_LOG_ENV)
        if teed and Path(teed).resolve() == path:
            return None
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               "%Y-%m-%d %H:%M:%S"))
        handler.setLevel(logging.INFO)
        logging.getLogger().addHandler(handler)
        return handler

    # ---- the step loop -----------------------------------------------------------------
    def metrics_logger(self, total: int, start: int, *, desc: str, show):
        from omegaconf import OmegaConf

        from prism_megatron.metrics import MetricsLogger

        lg = self.cfg.logging
        wandb_config = (OmegaConf.to_container(OmegaConf.structured(self.cfg))
                        if lg.wandb_project else None)
        return MetricsLogger(lg.run_dir, total, start, tensorboard=lg.tensorboard, desc=desc,
                             show=show, log_interval=lg.log_interval,
                             wandb_project=lg.wandb_project, wandb_config=wandb_config)

    def begin(self, start: int, total: int) -> None:
        """Say where the loop starts; a run already at (or past) its last step says so."""
        if not self.main:
            return
        if start >= total:
            log.info("%s: already at step %d of %d, nothing to do", self.stage, start, total)
        elif start:
            log.info("%s: resuming at step %d of %d", self.stage, start + 1, total)
        else:
            log.info("%s: training %d steps", self.stage, total)

    # ---- what every stage builds the same way -----------------------------------------
    def processor(self):
        """The policy checkpoint's processor with the data section's pixel budget."""
        from prism_megatron.data.encode import load_processor

        d = self.cfg.data
        return load_processor(self.cfg.model.hf_dir, d.min_pixels, d.max_pixels)

    def total_steps(self, items: int, per_step: int) -> int:
        """``train_steps``, or ``data.epochs`` passes over ``items`` in steps of ``per_step``."""
        return self.cfg.train_steps or max(1, items // per_step) * self.cfg.data.epochs

    def policy_evaluator(self, processor, policy_model, hf_config, *, engine=None,
                         shared: bool = False) -> Callable[[], dict] | None:
        """Held-out generation + scoring of the policy under training on ``data.eval_files``
        (None without them). The RL stages pass their rollout engine (``shared``: it holds the
        trained weights after each step's sync); otherwise the evaluator starts the engine
        ``rollout`` configures and syncs it before each evaluation, shut down with the session."""
        from prism_megatron.eval.heldout import PolicyEvaluator

        evaluator = PolicyEvaluator(self.cfg, processor, engine, shared=shared)
        self.stack.callback(evaluator.shutdown)
        if not evaluator.files:
            return None
        return lambda: evaluator(policy_model, hf_config)

    def cleanup(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` when the session ends, however it ends (engines, servers)."""
        self.stack.callback(callback)

    # ---- the step loop ------------------------------------------------------------------
    def train_loop(self, step_fn: Callable[[int], StepResult], *, start: int, total: int,
                   checkpoints, desc: str, show: tuple[str, ...],
                   evaluate: Callable[[], dict] | None = None, eval_interval: int = 0,
                   log_before: bool = True) -> dict:
        """Steps ``start + 1 .. total``: each is timed, logged (metrics.jsonl, tensorboard, the
        progress line), evaluated when due (before training when starting at step 0 and
        ``log_before``, every ``eval_interval`` steps, and after the last step) and checkpointed
        when due; a preemption request saves and leaves. Returns the last step's metrics (with
        the final evaluation; {} when there was nothing to do)."""
        self.begin(start, total)
        metrics: dict = {}
        with self.metrics_logger(total, start, desc=desc, show=show) as logger:
            if evaluate is not None and start == 0 and log_before and total > 0:
                before = evaluate()
                logger.log(0, before)
                if self.main:
                    log.info("%s: before training: %s", self.stage, _brief(before))
            for step in range(start + 1, total + 1):
                logger.tick()     # (the clock includes waiting for data and the engine)
                result = step_fn(step)
                metrics = result.metrics
                if evaluate is not None and (step == total or
                                             (eval_interval and step % eval_interval == 0)):
                    evaluated = evaluate()
                    metrics.update(evaluated)
                    if self.main and step == total:
                        log.info("%s: after training: %s", self.stage, _brief(evaluated))
                logger.log(step, metrics, samples=result.samples, tokens=result.tokens)
                self.after_step(step, due=checkpoints.due(step, total),
                                save=lambda: checkpoints.save(step))
        return metrics

    def plot(self, keys: list[str], file: str, title: str) -> None:
        if self.cfg.logging.plots:
            from prism_megatron.metrics import plot_curves

            plot_curves(self.cfg.logging.run_dir, keys, file, title)

    def after_step(self, step: int, *, due: bool, save: Callable[[], object]) -> None:
        """Save when ``due``; on a preemption request (any rank), make sure this step is saved
        and leave (``Preempted``)."""
        saved = save() if due and self.checkpointing else None
        if not self.watch.requested():
            return
        if self.checkpointing and saved is None:
            saved = save()
        if self.main:
            what = f"checkpoint saved ({saved})" if saved is not None else \
                "no checkpoint (checkpoint.enabled=false)"
            log.warning("%s: preempted at step %d, %s; exit code %d (rerun to resume)",
                        self.stage, step, what, PREEMPTED_EXIT_CODE)
            (self.run_dir / PREEMPTED_FILE).write_text(json.dumps(
                {"stage": self.stage, "step": step, "checkpoint": str(saved) if saved else None,
                 "signal": signal.Signals(self.watch.signum).name if self.watch.signum
                 else "another rank's"})
                + "\n")
        raise Preempted(step)


@contextlib.contextmanager
def stage_session(cfg, stage: str, *, tp: int, pp: int, ep: int = 1, layout_key: str = ""):
    """Set up and tear down one training stage (see the module docstring)."""
    from prism_megatron import quiet_startup_warnings
    from prism_megatron.distributed import (
        ParallelConfigError, destroy_distributed, init_distributed)
    from prism_megatron.metrics import setup_logging
    from prism_megatron.plan import check_fits

    check_stage_config(cfg)
    check_fits(cfg, stage)     # on GPU: refuse, with the memory table, a config that cannot fit
    quiet_startup_warnings()
    try:
        info = init_distributed(tp=tp, pp=pp, ep=ep, seed=cfg.seed)
    except ParallelConfigError as exc:
        if layout_key:
            raise ConfigError(f"{layout_key}: {exc}") from None
        raise
    with contextlib.ExitStack() as stack:
        stack.callback(destroy_distributed)
        setup_logging()   # after init: the other ranks know they are not the main one
        session = StageSession(cfg, stage, info)
        session.write_run_files()
        handler = session.open_stage_log()
        if handler is not None:
            stack.callback(_close_handler, handler)
        session.watch.install()
        stack.callback(session.watch.restore)
        if session.main:
            log.info("%s: world %d (tp %d, pp %d, dp %d); run dir %s", stage, info.world_size,
                     info.tp, info.pp, info.dp, session.run_dir)
        session.stack = stack
        yield session
        if session.main:
            log.info("%s: finished in %.1f s", stage, time.perf_counter() - session.started)


def _close_handler(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()


def _brief(metrics: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()
            if not k.startswith("_")}
