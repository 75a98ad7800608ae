"""prism-megatron: PRISM post-training (SFT -> distribution alignment -> RLVR) on megatron-core."""

__version__ = "0.1.0"   # keep equal to pyproject.toml; `prism --version` prefers the installed metadata

import logging as _logging
import warnings as _warnings

# megatron-core's import-time notices on hosts without Transformer Engine / Apex (~12 lines per
# process) and torch's checkpoint deprecation notes: known, harmless, and they bury the first
# lines of a run. Filtered here, before any module imports megatron.
QUIET_WARNINGS = (
    (r".*Transformer Engine and Apex are not installed.*", UserWarning),
    (r".*Apex is not installed.*", UserWarning),
    (r".*full scope is deprecated.*", UserWarning),
    (r".*Please use DTensor instead and we are deprecating ShardedTensor.*", FutureWarning),
    (r".*NVTE_.*", UserWarning),
    (r".*`load_state_dict` is deprecated and will be removed.*", FutureWarning),
)


def quiet_startup_warnings() -> None:
    for message, category in QUIET_WARNINGS:
        _warnings.filterwarnings("ignore", message=message, category=category)
    # "No CUDA runtime is found" on CPU hosts.
    _logging.getLogger("torch.utils.cpp_extension").setLevel(_logging.ERROR)


quiet_startup_warnings()
