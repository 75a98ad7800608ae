"""The runner: each stage a subprocess (the command a user would type), a done.json marker when
it succeeded, its output teed to ``<work>/<stage>/stage.log``.

A preempted stage (exit code 75, or ``preempted.json`` in its run directory when torchrun turned
the code into 1) is not marked done: the pipeline stops with the same code 75, and a rerun
resumes that stage from the checkpoint it wrote. SIGTERM / SIGUSR1 to the pipeline are passed on
to the running stage, which saves and exits 75.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from prism_megatron.distributed import free_port
from prism_megatron.errors import PrismError
from prism_megatron.pipeline.config import (
    BENCHMARK_STAGES, NEEDS, POLICY_STAGES, STAGES, PipelineConfig, selected)
from prism_megatron.pipeline.results import write_results

REPO = Path(__file__).resolve().parents[2]
# = prism_megatron.runtime.PREEMPTED_EXIT_CODE / PREEMPTED_FILE (not imported: this process never
# imports torch).
PREEMPTED_EXIT_CODE = 75
PREEMPTED_FILE = "preempted.json"


class Pipeline:
    def __init__(self, cfg: PipelineConfig, log=print):
        self.cfg, self.log = cfg, log
        self.work = Path(cfg.work_dir).resolve()
        self.status: dict[str, dict] = {}

    def dir(self, stage: str) -> Path:
        if stage in self.cfg.shared:
            return Path(self.cfg.shared[stage]).resolve() / stage
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
                        str(free_port()), "-m", "prism_megatron.cli"]
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
        return (selected(self.cfg, stage) and stage not in self.cfg.shared
                and not getattr(self.spec(stage), "skip", False) and self.marker(stage) is None)

    def run(self) -> dict:
        self.run_stages()
        results = write_results(self)
        self.log(f"[pipeline] results: {self.work / 'results.md'}")
        return results

    def run_stages(self) -> None:
        """Every stage in order (run, skipped or shared), without writing the results."""
        self.check_inputs()
        self.work.mkdir(parents=True, exist_ok=True)
        self.log(f"[pipeline] work dir {self.work}")
        for stage in STAGES:
            self.step(stage)
            if self.cfg.benchmarks and stage in BENCHMARK_STAGES and self.available(stage):
                self.benchmark(stage)

    def benchmark_commands(self, stage: str) -> list[list[str]]:
        """Export the stage's policy to HF, then `prism eval` the benchmarks config on it."""
        out = self.dir(stage) / "benchmarks"
        hf = str(_path(self.cfg.hf_dir))
        return [_tool("export", policy=self.ckpt(stage), hf_dir=hf, out=str(out / "hf")),
                [sys.executable, "-m", "prism_megatron.cli", "eval",
                 str(_path(self.cfg.benchmarks)), f"model.hf_dir={out / 'hf'}",
                 f"logging.run_dir={out}", *self.cfg.benchmark_overrides]]

    def benchmark(self, stage: str) -> None:
        """The benchmarks of one RL stage's policy (once: ``benchmarks/done.json``)."""
        out = self.dir(stage) / "benchmarks"
        if (out / "done.json").is_file():
            return
        out.mkdir(parents=True, exist_ok=True)
        self.log(f"[pipeline] {stage:<13} benchmarks (log: {out / 'stage.log'})")
        start = time.time()
        for command in self.benchmark_commands(stage):
            run_logged(command, out / "stage.log", f"{stage} benchmarks",
                       show=self.cfg.show_output, threads=self.cfg.threads)
        (out / "done.json").write_text(json.dumps(
            {"stage": stage, "seconds": round(time.time() - start, 1)}) + "\n")

    def step(self, stage: str) -> None:
        say = lambda text: self.log(f"[pipeline] {stage:<13} {text}")   # noqa: E731
        done = self.marker(stage)
        if stage in self.cfg.shared:
            if done is None:
                raise PrismError(f"stage {stage} is shared from {self.cfg.shared[stage]}, where "
                                 "it has not finished (run that pipeline first)")
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
        (self.dir(stage) / PREEMPTED_FILE).unlink(missing_ok=True)
        try:
            run_logged(command, log_path, stage, show=self.cfg.show_output,
                       threads=self.cfg.threads)
        except PrismError:
            preempted = self.dir(stage) / PREEMPTED_FILE
            if not preempted.is_file():
                raise
            at = json.loads(preempted.read_text()).get("step")
            self.status[stage] = {"status": f"preempted at step {at}"}
            say(f"preempted at step {at} (checkpoint saved); rerun the pipeline to resume")
            raise SystemExit(PREEMPTED_EXIT_CODE) from None
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
    by_step = {}
    for line in path.read_text().splitlines():   # appended on resume: the last row of a step wins
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            by_step[row["step"]] = row
    rows = [by_step[k] for k in sorted(by_step)]
    return {"first": rows[0], "last": rows[-1], "steps": rows[-1]["step"]} if rows else {}


RUNNING: set[subprocess.Popen] = set()     # stage processes running now (any thread)


def stop_running() -> None:
    """Kill every stage process still running: for a caller that runs pipelines in threads and
    is interrupted (a killed stage resumes from its checkpoint next time)."""
    for proc in list(RUNNING):
        proc.kill()


def run_logged(command: list[str], log_path: Path, stage: str, show: bool, threads: int = 0) -> None:
    """Runs ``command``, its stdout+stderr appended to ``log_path`` (and the console when
    ``show``); a failure is a PrismError naming the stage, the log and its last lines. The child
    is registered in ``RUNNING`` while it runs (``stop_running`` kills what another thread
    started)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVTE_")
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
               TRANSFORMERS_OFFLINE=env.get("TRANSFORMERS_OFFLINE", "1"))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PRISM_STAGE_LOG"] = str(log_path)   # the stage then writes no second handler into it
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, stdin=subprocess.DEVNULL)
        RUNNING.add(proc)
        previous = _forward_signals(proc)
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
            RUNNING.discard(proc)
            for sig, handler in (previous or {}).items():
                signal.signal(sig, handler)
    if code != 0:
        text = log_path.read_text(errors="replace").splitlines()
        tail = [line.rsplit("\r", 1)[-1] for line in text[-15:]]
        raise PrismError(f"stage {stage} failed (exit code {code}); log: {log_path}\n"
                         + "\n".join(f"    {line}" for line in tail if line.strip()))


# ------------------------------------------------------------------------------ helpers

def _path(p: str) -> Path:
    """Relative paths are relative to the working directory; stage YAMLs also to the repo."""
    path = Path(p)
    if not path.is_absolute() and not path.exists() and (REPO / path).exists():
        path = REPO / path
    return path.resolve()


def _forward_signals(proc: subprocess.Popen):
    """SIGTERM / SIGUSR1 to the pipeline are passed on to the stage process, which saves a
    checkpoint and exits 75 (a stage that does not stop is killed with it on a second SIGTERM).
    Returns the previous handlers (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    got: list[int] = []

    def forward(signum, frame):
        if signum == signal.SIGTERM and signal.SIGTERM in got:
            raise SystemExit(128 + signum)      # the second one: stop now (the stage is killed)
        got.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    return {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}


def _tool(step: str, **kwargs) -> list[str]:
    return [sys.executable, "-m", "prism_megatron.pipeline", "--step", step, json.dumps(kwargs)]


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
