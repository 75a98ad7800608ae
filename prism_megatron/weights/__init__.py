"""How a model's weights are named, split over TP/PP and stored: the vocabulary shared by the
models and the converters. No model code here, so ``prism_megatron.models`` may import it and
``prism_megatron.convert`` (the conversions themselves) sits above both.

    errors.py       ConversionError (the one user-fixable error of checkpoints and conversion)
    rules.py        typed rules (replicated, column, row, qkv, gated_mlp, vocab): HF <-> Megatron
                    tensors and TP split/merge, each implemented once
    table.py        mapping tables: placeholder expansion, name lookup (aliases, stacked dist
                    keys), coverage against transformers' model
    layout.py       pipeline stages (uneven splits), local/global layer names, vocab padding
    ckpt_layout.py  checkpoint directory conventions (tracker, iter_*/release, hf_config/)
    legacy.py       megatron per-rank files (mp_rank_TT[_PPP]/model_optim_rng.pt)
    load.py         load a converted checkpoint (legacy or torch_dist) into a built model
"""
