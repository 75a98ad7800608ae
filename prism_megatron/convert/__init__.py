"""HF <-> Megatron checkpoint conversion (CLIs: tools/convert_*.py, tools/verify_conversion.py).

Layout of the package:
    rules.py        typed rules (replicated, column, row, qkv, gated_mlp, vocab): HF <-> Megatron
                    tensors and TP split/merge, each implemented once
    table.py        mapping tables: placeholder expansion, name lookup (aliases, stacked dist
                    keys), the model_type -> family registry
    layout.py       pipeline stages (uneven splits), local/global layer names, vocab padding
    hf_io.py        streaming safetensors reader and writer
    legacy.py       megatron per-rank files (mp_rank_TT[_PPP]/model_optim_rng.pt)
    torch_dist.py   megatron-core dist_checkpointing (written through megatron's own model)
    hf_to_megatron.py / megatron_to_hf.py   the two conversions
    load.py         load a converted checkpoint into a built model
    verify.py       logits parity against transformers
A model family contributes one table: prism_megatron/models/<family>/mapping.py.
"""

from prism_megatron.convert.errors import ConversionError

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
