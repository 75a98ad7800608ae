"""prism-megatron: PRISM post-training (SFT -> distribution alignment -> RLVR) on megatron-core."""

__version__ = "0.1.0"   # keep equal to pyproject.toml; `prism --version` prefers the installed metadata
