"""PRISM's MoE discriminator (spec §3, decisions §9): Qwen3-VL sparse-upcycled into a
Mixture-of-Experts model with a value head, scoring a response's perception and reasoning
segments separately.

    segments.py   token-level segments of a response, the four [prompt ; segment] sequences
    pairs.py      warm-up pair files (and the synthetic-task builder)
    routing.py    SegmentRouter: segment routing mask, masked load-balancing loss, expert loads
    specs.py      MoE text layers derived from Qwen3-VL's layer spec
    model.py      Qwen3VLDiscriminator, building and loading
    value_head.py the scalar head
    batching.py   right-padded batches, M-RoPE positions, score read-out
    scoring.py    Scorer: batched score(prompts, segments) and whole responses
    upcycle.py    dense Qwen3-VL -> discriminator checkpoint (tools/upcycle_discriminator.py)
    export.py     HF-style safetensors (Qwen3-VL-MoE names + v_head)
    stats.py      pairwise accuracy and expert-load reductions
Training: prism_megatron/stages/discriminator_warmup.py (``prism warmup``).
"""
