"""Model code: Qwen3-VL in megatron-core (``qwen3_vl``) and the MoE discriminator built on it
(``discriminator``)."""


def unwrap_model(model):
    """The bare Megatron module under DDP / Float16Module wrappers (one model chunk; a list of
    chunks is refused: no virtual pipeline)."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError("one model chunk per rank is supported (no virtual pipeline)")
        model = model[0]
    while hasattr(model, "module"):
        model = model.module
    return model
