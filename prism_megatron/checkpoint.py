"""Resumable, atomic training checkpoints on megatron-core ``dist_checkpointing``.

Layout of ``save_dir``:
    step_0000100/      a dist_checkpointing checkpoint (model, optimizer, scheduler, trainer state)
    latest             text file naming the newest complete step directory
A step is written to ``step_XXXXXXX.tmp`` and renamed once every rank has finished, so a run
killed mid-save leaves the previous checkpoint as ``latest``. Model and optimizer tensors are
sharded (reshardable to another TP/PP); per-rank RNG states are kept per (pp, tp, dp) rank.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

LATEST = "latest"
SAVE_STRATEGY = ("torch_dist", 1)   # the bare string fails an assertion in megatron-core 0.16
# The distributed optimizer's state in a layout-independent form (reshardable over TP/PP/DP).
# Its default gather moves shards to CUDA for NCCL; on CPU the gloo ("mem_efficient") path is used.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                      "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}


def step_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"step_{step:07d}"


def find_latest(save_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    marker = Path(save_dir) / LATEST
    if not marker.is_file():
        return None
    path = Path(save_dir) / marker.read_text().strip()
    return path if path.is_dir() else None


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
    """Write checkpoint ``step`` atomically and keep only the newest ``keep_last``."""
    from megatron.core import dist_checkpointing

    final = step_dir(save_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    trainer_state = dict(trainer_state or {}, step=step, layout=list(_layout()))
    state = _sharded_state(model_chunks, optimizer, scheduler, trainer_state, loading=False)
    dist_checkpointing.save(state, str(tmp), sharded_strategy=SAVE_STRATEGY)
    _barrier()
    if _rank0():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        marker = Path(save_dir) / LATEST
        marker.with_suffix(".tmp").write_text(final.name + "\n")
        os.replace(marker.with_suffix(".tmp"), marker)
        old = sorted(p for p in Path(save_dir).glob("step_???????") if p.is_dir())
        for path in old[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(path, ignore_errors=True)
    _barrier()
    return final


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
        raise FileNotFoundError(f"checkpoint {path} does not exist")
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
