"""HF <-> Megatron checkpoint conversion (CLIs: tools/convert_*.py, tools/verify_conversion.py,
tools/upcycle_discriminator.py).

Sits above ``prism_megatron.models`` (it builds models as torch_dist templates and for
verification); the vocabulary it works in — rules, tables, TP/PP layout, the checkpoint directory
conventions, loading a checkpoint into a built model — is ``prism_megatron.weights``, below models.

    families.py     the model_type -> family registry (each family's table beside its model)
    hf_io.py        streaming safetensors reader and writer
    torch_dist.py   megatron-core dist_checkpointing (written through megatron's own model)
    hf_to_megatron.py / megatron_to_hf.py   the two conversions
    fsutil.py       atomic output directories
    verify.py       logits parity against transformers
    upcycle.py      dense Qwen3-VL -> MoE discriminator checkpoint (spec §3.1)
    discriminator_export.py   the discriminator as HF-style safetensors (Qwen3-VL-MoE + v_head)
A model family contributes one table: prism_megatron/models/<family>/mapping.py.
"""

from prism_megatron.weights.errors import ConversionError

__all__ = ["ConversionError", "convert_hf_to_megatron", "convert_megatron_to_hf"]


def __getattr__(name):
    # Lazy, so that `tools/*.py --help` and error paths do not pay for importing torch.
    if name == "convert_hf_to_megatron":
        from prism_megatron.convert.hf_to_megatron import convert_hf_to_megatron
        return convert_hf_to_megatron
    if name == "convert_megatron_to_hf":
        from prism_megatron.convert.megatron_to_hf import convert_megatron_to_hf
        return convert_megatron_to_hf
    raise AttributeError(name)
