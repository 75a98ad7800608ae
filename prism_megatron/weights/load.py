"""Load a converted checkpoint (legacy or torch_dist) into an already built Megatron model.

Call on every rank after ``init_distributed`` and model construction. torch_dist reshards to
the current TP/PP; a legacy checkpoint must have been written at exactly the current TP/PP.
(Training checkpoints have their own loader, ``prism_megatron.checkpoint.load_checkpoint``,
which also reads a converted torch_dist ``iter_*`` directory.)
"""

from __future__ import annotations

from pathlib import Path

from prism_megatron.weights import ckpt_layout as lay
from prism_megatron.weights.errors import ConversionError
from prism_megatron.weights.legacy import FILE_NAME, load_rank_file


def load_megatron_checkpoint(model, megatron_dir: str | Path, strict: bool = True) -> str:
    """Fill ``model`` (one pipeline stage's module) from ``megatron_dir``; returns the format."""
    from megatron.core import parallel_state as ps

    ckpt = lay.resolve_checkpoint_dir(megatron_dir)
    fmt = lay.detect_format(ckpt)
    if fmt == "torch_dist":
        from megatron.core import dist_checkpointing

        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt))
        model.load_state_dict(state["model"], strict=strict)
        return fmt
    ranks = lay.legacy_rank_dirs(ckpt)
    tp, pp = max(t for t, _ in ranks) + 1, max(p for _, p in ranks) + 1
    my_tp, my_pp = (ps.get_tensor_model_parallel_world_size(),
                    ps.get_pipeline_model_parallel_world_size())
    if (tp, pp) != (my_tp, my_pp):
        raise ConversionError(f"legacy checkpoint {ckpt} was written for tp={tp} pp={pp} but "
                              f"this run has tp={my_tp} pp={my_pp}; convert again with those "
                              f"sizes or use --format torch_dist (reshardable)")
    rank = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
    model.load_state_dict(load_rank_file(ranks[rank] / FILE_NAME), strict=strict)
    return fmt
