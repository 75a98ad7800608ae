"""Test assets built offline, for the test suite, the benchmarks and the CPU demo (top layer:
nothing in the trainer imports it).

    tiny.py       random tiny Qwen3-VL checkpoint directories (presets; tools/make_tiny_qwen3vl.py)
    tokenizer.py  Qwen3-VL-compatible tokenizers built without a download
    prompts.py    a fixed set of rollout prompts (text, one image, two images)
"""
