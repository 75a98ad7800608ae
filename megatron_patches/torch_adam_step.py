"""The distributed optimizer with torch's own Adam (no apex, no Transformer Engine)."""

from __future__ import annotations

from megatron_patches.source_rewrite import rewrite_function


def copy_only_checkpointed_adam_state() -> None:
    """torch's Adam keeps a per-parameter ``step`` next to its moments. When the distributed
    optimizer restores a reshardable checkpoint it copies every key of the live state from the
    checkpoint's per-parameter tensors, which hold only ``param``/``exp_avg``/``exp_avg_sq``
    (``step`` travels in the common state), so loading fails with KeyError 'step'. Copy the keys
    the checkpoint has. Needed on megatron-core 0.16.1 without apex/TE (CPU); can go when the
    loader skips ``step``.

    The same loader then hands every parameter one shared ``step`` tensor, which torch's Adam
    increments in place once per parameter, so bias correction runs ahead after a resume;
    each parameter gets its own copy."""
    from megatron.core.optimizer import distrib_optimizer

    rewrite_function(distrib_optimizer.DistributedOptimizer,
                     "_set_main_param_and_optimizer_states",
                     [("for key in dst_tensors:\n", "for key in tensors.keys() & dst_tensors.keys():\n")])
    rewrite_function(distrib_optimizer.DistributedOptimizer, "load_state_dict",
                     [('s["step"] = step\n', 's["step"] = step.clone()\n')])
