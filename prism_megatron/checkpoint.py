"""Resumable, atomic training checkpoints on megatron-core ``dist_checkpointing``.

Layout of ``save_dir``:
    step_0000100/      a dist_checkpointing checkpoint (model, optimizer, scheduler, trainer state)
    latest             text file naming the step directory written last (informational)
A step is written to ``step_XXXXXXX.tmp`` and renamed once every rank has finished, so a run
killed mid-save leaves the previous checkpoint intact. Model and optimizer tensors are sharded
(reshardable to another TP/PP); per-rank RNG states are kept per (pp, tp, dp) rank.

Nothing here trusts ``latest``: resuming picks the newest step directory (by its step number)
that passes ``check_complete`` (dist_checkpointing's ``.metadata``, ``metadata.json`` and
``common.pt`` readable, every tensor file as long as the metadata says), and pruning never
removes the newest complete checkpoint nor the one just written.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from prism_megatron.errors import PrismError

log = logging.getLogger("prism.checkpoint")

LATEST = "latest"
SAVE_STRATEGY = ("torch_dist", 1)   # the bare string fails an assertion in megatron-core 0.16
# The distributed optimizer's state in a layout-independent form (reshardable over TP/PP/DP).
# Its default gather moves shards to CUDA for NCCL; on CPU the gloo ("mem_efficient") path is used.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                      "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}
STEP_NAME = re.compile(r"^step_(\d+)$")
# errno values that mean "the disk / the directory", not a bug: reported in one line.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}


class CheckpointError(PrismError):
    """A checkpoint that cannot be written or loaded; the message names the directory."""


def step_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"step_{step:07d}"


def step_of(path: str | Path) -> int | None:
    """The step number of a ``step_N`` directory name (``.tmp`` and other names: None)."""
    match = STEP_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def step_dirs(save_dir: str | Path) -> list[Path]:
    """Every ``step_N`` directory (complete or not), newest step number first."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and p.is_dir()]
    return sorted(found, key=step_of, reverse=True)


def check_complete(path: str | Path) -> str | None:
    """None when ``path`` is a complete checkpoint, else why not (one short phrase)."""
    path = Path(path)
    if not path.is_dir():
        return "does not exist"
    for name in (".metadata", "metadata.json", "common.pt"):
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        json.loads((path / "metadata.json").read_text())
    except (OSError, ValueError) as exc:
        return f"metadata.json is unreadable ({type(exc).__name__})"
    try:
        with open(path / ".metadata", "rb") as f:
            metadata = pickle.load(f)
    except Exception as exc:   # any unpickling failure means the same thing: unusable
        return f".metadata is unreadable ({type(exc).__name__})"
    try:
        torch.load(path / "common.pt", map_location="cpu", weights_only=False)
    except Exception as exc:
        return f"common.pt is unreadable ({type(exc).__name__})"
    # Every tensor file must be at least as long as the metadata says (a truncated write).
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            needed[rel] = max(needed.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(needed.items()):
        file = path / rel
        if not file.is_file():
            return f"tensor file {rel} is missing"
        if file.stat().st_size < size:
            return f"tensor file {rel} is truncated ({file.stat().st_size} of {size} bytes)"
    return None


def find_latest(save_dir: str | Path) -> Path | None:
    """The newest complete checkpoint by step number, or None (``latest`` is not consulted)."""
    for path in step_dirs(save_dir):
        if check_complete(path) is None:
            return path
    return None


def read_latest_marker(save_dir: str | Path) -> str | None:
    """What ``latest`` names (None: no marker); only for messages."""
    marker = Path(save_dir) / LATEST
    try:
        return marker.read_text(errors="replace").strip()[:80] if marker.is_file() else None
    except OSError:
        return None


def remove_stale_tmp(save_dir: str | Path) -> list[Path]:
    """Delete ``step_*.tmp`` directories left by a save that was killed or failed."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    stale = [p for p in root.glob("step_*.tmp") if p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed the partial checkpoint %s (a save that did not finish)", path)
    return stale


def _storage_error(exc: BaseException) -> OSError | None:
    """The OSError behind a failed save (megatron wraps its writers' errors), if it is one of
    disk full / quota / permission / read-only / I/O."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return exc
        for arg in getattr(exc, "args", ()):
            if isinstance(arg, OSError) and arg.errno in STORAGE_ERRNOS:
                return arg
        failures = getattr(exc, "failures", None)   # torch.distributed.checkpoint's exception
        if isinstance(failures, dict):
            for inner in failures.values():
                found = _storage_error(inner if isinstance(inner, BaseException) else None)
                if found is not None:
                    return found
        exc = exc.__cause__ or exc.__context__
    return None


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def describe_storage_failure(save_dir: Path, exc: BaseException, previous: Path | None
                             ) -> CheckpointError | None:
    """A one-line CheckpointError when the save failed for want of space or permission (by the
    error's errno, or free space below the size of the previous checkpoint); None otherwise."""
    cause = _storage_error(exc)
    try:
        usage = shutil.disk_usage(save_dir)
        free = f"{_fmt_bytes(usage.free)} free of {_fmt_bytes(usage.total)}"
    except OSError:
        usage, free = None, "free space unknown"
    needed = _tree_bytes(previous) if previous is not None else 0
    short = usage is not None and needed and usage.free < needed
    if cause is None and not short:
        return None
    if cause is not None:
        what = os.strerror(cause.errno).lower() if cause.errno else str(cause)
    else:
        what = f"no room for another checkpoint (the previous one is {_fmt_bytes(needed)})"
    return CheckpointError(f"cannot write a checkpoint to {save_dir}: {what} ({free}); the "
                           "partial checkpoint was removed; free space or point "
                           "checkpoint.save_dir elsewhere, then rerun (it resumes)")


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _layout() -> tuple[int, int, int]:
    from megatron.core import parallel_state as ps

    return (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
            ps.get_data_parallel_world_size())


def _rng_sharded_object(state):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, _layout(), offset, replica_id=0)


def _ensure_adam_state(optimizer) -> None:
    """Give every parameter an (empty) Adam state before loading into a fresh optimizer.

    megatron's distributed optimizer reads the Adam ``step`` from the inner torch state when
    neither apex nor TE is installed, and a never-stepped torch Adam has none; megatron's own
    ``init_state_fn`` creates the moments but not ``step``. The loaded checkpoint overwrites it all.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        if torch_opt is None:
            continue
        for group in torch_opt.param_groups:
            for param in group["params"]:
                state = torch_opt.state[param]
                if "step" not in state and "exp_avg" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)


def _sharded_state(model_chunks, optimizer, scheduler, trainer_state, *, loading: bool):
    from megatron.core.utils import unwrap_model

    model_sd = {}
    for i, chunk in enumerate(model_chunks):
        prefix = f"model{i}." if len(model_chunks) > 1 else ""
        for key, value in unwrap_model(chunk).sharded_state_dict(prefix=prefix).items():
            model_sd[key] = value
    state = {"model": model_sd, "trainer": trainer_state, "rng": _rng_sharded_object(_rng_state())}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=loading,
                                                          metadata=OPTIMIZER_METADATA)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return state


def save_checkpoint(save_dir: str | Path, step: int, model_chunks, optimizer=None, scheduler=None,
                    trainer_state: dict | None = None, keep_last: int = 3) -> Path:
    """Write checkpoint ``step`` atomically (``.tmp`` then rename), then prune to ``keep_last``.

    A failed save removes its ``.tmp``; disk full / quota / permission errors become one-line
    CheckpointErrors naming the directory and its free space. The save is synchronous: megatron's
    torch_dist writer forks ``thread_count`` writer processes and joins them before returning
    (``_reap_writers`` then collects any that already exited), so nothing writes after it returns.
    """
    from megatron.core import dist_checkpointing

    save_dir = Path(save_dir)
    final = step_dir(save_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    previous = find_latest(save_dir) if _rank0() else None
    started = time.perf_counter()
    try:
        if _rank0():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        trainer_state = dict(trainer_state or {}, step=step, layout=list(_layout()))
        state = _sharded_state(model_chunks, optimizer, scheduler, trainer_state, loading=False)
        dist_checkpointing.save(state, str(tmp), sharded_strategy=SAVE_STRATEGY)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _reap_writers()
        error = describe_storage_failure(save_dir if save_dir.is_dir() else save_dir.parent,
                                         exc, previous)
        if error is not None:
            raise error from None
        raise
    _reap_writers()
    _barrier()
    if _rank0():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        marker = save_dir / LATEST
        marker.with_suffix(".tmp").write_text(final.name + "\n")
        os.replace(marker.with_suffix(".tmp"), marker)
        for path in prune(save_dir, keep_last, just_written=final):
            log.info("pruned checkpoint %s (checkpoint.keep_last=%d)", path.name, keep_last)
        log.info("saved checkpoint step %d to %s in %.1f s", step, final,
                 time.perf_counter() - started)
    _barrier()
    return final


def prune(save_dir: str | Path, keep_last: int, just_written: Path | None = None) -> list[Path]:
    """Delete old step directories: kept are the one just written and the ``keep_last`` newest
    COMPLETE ones by step number; deleted are the others below the oldest kept one (an
    incomplete directory with a higher step is left for inspection: resume skips it).
    ``keep_last <= 0`` keeps everything. Returns what was deleted."""
    if keep_last <= 0:
        return []
    keep = {just_written.resolve()} if just_written is not None else set()
    complete = []
    for path in step_dirs(save_dir):
        if len(complete) == keep_last:
            break
        if path.resolve() in keep or check_complete(path) is None:
            complete.append(path)
    keep |= {p.resolve() for p in complete}
    floor = min(step_of(p) for p in complete) if complete else -1
    removed = []
    for path in step_dirs(save_dir):
        if path.resolve() not in keep and step_of(path) < floor:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _reap_writers() -> None:
    """Collect megatron's forked checkpoint writers that have exited (``active_children`` joins
    finished ones), so none is left as a zombie or outlives the save."""
    import multiprocessing

    multiprocessing.active_children()


def resume_candidates(save_dir: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(complete checkpoints newest step first, [(skipped directory, why)]) of ``save_dir``."""
    complete, skipped = [], []
    for path in step_dirs(save_dir):
        why = check_complete(path)
        if why is None:
            complete.append(path)
        else:
            skipped.append((path, why))
    return complete, skipped


def load_checkpoint(path: str | Path, model_chunks, optimizer=None, scheduler=None,
                    *, restore_rng: bool = True) -> dict:
    """Load into the given (already built) model/optimizer/scheduler; returns trainer state.

    The checkpoint may have been written at another TP/PP: tensors are resharded by megatron.
    RNG states are restored only when the layout matches (they are per rank).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    common = dist_checkpointing.load_common_state_dict(str(path))
    if optimizer is not None:
        _ensure_adam_state(optimizer)
    trainer_state = common.get("trainer", {})
    template = _sharded_state(model_chunks, optimizer, scheduler, {}, loading=True)
    for key in ("trainer", "scheduler"):
        template.pop(key, None)
    same_layout = tuple(trainer_state.get("layout", ())) == _layout()
    if not (restore_rng and same_layout):
        template.pop("rng")
    state = dist_checkpointing.load(template, str(path))
    for i, chunk in enumerate(model_chunks):
        prefix = f"model{i}." if len(model_chunks) > 1 else ""
        own = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
        unwrap_model(chunk).load_state_dict(own)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(common["scheduler"])
    if "rng" in state:
        rng = state["rng"]
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        from megatron.core import tensor_parallel
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    return trainer_state
