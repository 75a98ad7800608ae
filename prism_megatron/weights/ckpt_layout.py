"""Megatron checkpoint directory conventions shared by the legacy and torch_dist formats.

    OUT/latest_checkpointed_iteration.txt   "release" or the iteration number
    OUT/iter_0000000/ (or OUT/release/)     the checkpoint proper
    OUT/hf_config/                          HF config.json (+ generation_config.json), so export
                                            needs no --hf-config-dir
    OUT/prism_convert.json                  how the checkpoint was made (informational)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prism_megatron.weights.errors import ConversionError

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "prism_convert.json"
HF_CONFIG_DIR = "hf_config"
_LEGACY_RANK = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?\Z")


def iteration_dir_name(iteration: int, release: bool) -> str:
    return "release" if release else f"iter_{iteration:07d}"


def write_tracker(root: Path, iteration: int, release: bool) -> None:
    (root / TRACKER).write_text("release" if release else str(iteration))


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The directory holding the checkpoint itself, given the root (with the tracker file) or
    that directory directly."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"Megatron checkpoint directory {path} does not exist")
    if (path / "metadata.json").is_file() or any(path.glob("mp_rank_*")):
        return path
    tracker = path / TRACKER
    latest = path / "latest"  # prism_megatron.checkpoint's training checkpoints
    if not tracker.is_file() and latest.is_file():
        step = path / latest.read_text().strip()
        if not (step / "metadata.json").is_file():
            raise ConversionError(f"{latest} names {step.name}, which is not a checkpoint")
        return step
    if not tracker.is_file():
        raise ConversionError(f"{path} is not a Megatron checkpoint: no {TRACKER}, no "
                              f"mp_rank_* directories and no dist_checkpointing metadata.json")
    text = tracker.read_text().strip()
    if text == "release":
        ckpt = path / "release"
    elif text.isdigit():
        ckpt = path / iteration_dir_name(int(text), False)
    else:
        raise ConversionError(f"{tracker} should hold 'release' or an iteration, got {text!r}")
    if not ckpt.is_dir():
        raise ConversionError(f"{tracker} points at {ckpt.name}, which does not exist")
    return ckpt


def detect_format(ckpt_dir: Path) -> str:
    if (ckpt_dir / "metadata.json").is_file():
        return "torch_dist"
    if any(ckpt_dir.glob("mp_rank_*")):
        return "legacy"
    raise ConversionError(f"cannot tell the checkpoint format of {ckpt_dir}")


def legacy_rank_dirs(ckpt_dir: Path) -> dict[tuple[int, int], Path]:
    """``{(tp_rank, pp_rank): mp_rank_dir}``; checks the TP x PP grid is complete."""
    found = {}
    for d in ckpt_dir.iterdir():
        m = _LEGACY_RANK.match(d.name)
        if d.is_dir() and m:
            found[(int(m.group(1)), int(m.group(2) or 0))] = d
        elif d.is_dir() and d.name.startswith("mp_rank_"):
            raise ConversionError(f"unsupported rank directory {d.name} (expert-parallel "
                                  f"legacy checkpoints are not supported)")
    if not found:
        raise ConversionError(f"no mp_rank_* directories in {ckpt_dir}")
    tp = max(t for t, _ in found) + 1
    pp = max(p for _, p in found) + 1
    missing = [f"mp_rank_{t:02d}_{p:03d}" for t in range(tp) for p in range(pp)
               if (t, p) not in found]
    if missing:
        raise ConversionError(f"incomplete legacy checkpoint in {ckpt_dir}: missing "
                              + ", ".join(missing))
    return found


def legacy_rank_dir_name(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def checkpoint_root(ckpt_dir: Path) -> Path:
    """Where ``hf_config/`` and the manifest live (the parent of iter_*/release/step_*)."""
    if ckpt_dir.name == "release" or ckpt_dir.name.startswith(("iter_", "step_")):
        return ckpt_dir.parent
    return ckpt_dir


def read_manifest(ckpt_dir: Path) -> dict:
    path = checkpoint_root(ckpt_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}
