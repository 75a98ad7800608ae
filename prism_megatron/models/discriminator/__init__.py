"""PRISM's MoE discriminator (spec §3, decisions §9): Qwen3-VL sparse-upcycled into a
Mixture-of-Experts model with a value head, scoring a response's perception and reasoning
segments separately.

    routing.py    SegmentRouter: segment routing mask, masked load-balancing loss, expert loads
    specs.py      MoE text layers derived from Qwen3-VL's layer spec
    model.py      Qwen3VLDiscriminator, building and loading
    value_head.py the scalar head
Upcycling (dense Qwen3-VL -> discriminator checkpoint) and the HF-style export are conversions:
prism_megatron/convert/upcycle.py, convert/discriminator_export.py.
What it reads (segments, pairs, their batches) is data: prism_megatron/data/{segments,pairs}.py.
Training and scoring it: prism_megatron/rl/discriminator.py (used by ``prism warmup`` and
``prism align``).
"""
