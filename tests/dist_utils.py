"""Launch test workers under torchrun (gloo on CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prism_megatron.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def torchrun_command(nproc: int, target: list[str]) -> tuple[list[str], dict]:
    """Command line and environment for ``torchrun --nproc_per_node nproc TARGET...``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *target]
    # megatron writes its attention-backend choice into NVTE_* variables of the process that
    # built a model; a worker must choose its own, not inherit the test process's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVTE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TORCH_CPP_LOG_LEVEL="ERROR",
               PYTHONWARNINGS="ignore")
    return cmd, env


def run_torchrun(script: str | Path, nproc: int, *args, timeout: int = 600) -> str:
    """Run ``script`` on ``nproc`` local ranks; return stdout, raise with the output on failure.
    ``script`` may be ``"-m"`` followed by a module name in ``args``."""
    cmd, env = torchrun_command(nproc, [str(script), *map(str, args)])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun {script} (nproc={nproc}) failed with code "
                           f"{proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                           f"--- stderr\n{proc.stderr[-8000:]}")
    return proc.stdout


def kill_stage_after(command: str, config, history: Path, rows: int, timeout: int = 300) -> None:
    """Start ``prism COMMAND CONFIG`` under torchrun and SIGKILL its process group once
    ``history`` (a metrics.jsonl) has ``rows`` rows: a crash between two checkpoints."""
    cmd, env = torchrun_command(1, ["-m", "prism_megatron.cli", command, str(config)])
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= rows:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
