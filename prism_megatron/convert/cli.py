"""Shared CLI plumbing of the tools: ``ConversionError`` (any PrismError) -> ``error: ...`` on
stderr and exit status 2, through the one error boundary of ``prism_megatron.errors``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from prism_megatron.errors import debug_enabled
from prism_megatron.errors import run_cli as shared_run_cli


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty output directory (written atomically either way)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def run_cli(main, argv=None) -> int:
    """Run ``main(args_list)`` in the shared error boundary (``prism_megatron.errors.run_cli``):
    a ConversionError is ``error: ...`` and exit 2, a bug keeps its traceback (exit 1)."""
    argv = sys.argv[1:] if argv is None else argv
    if not debug_enabled(argv):
        # Library chatter (missing Apex/TE notes, deprecations) is not for converter users.
        warnings.simplefilter("ignore")
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return shared_run_cli(main, argv)
