"""Shared CLI plumbing: ``ConversionError`` -> ``error: ...`` on stderr and exit status 2.

Unexpected exceptions are bugs: they get a one-line report (exit 1) and their traceback only
with ``--debug``, so users never see a stack dump for a bad option or checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings

from prism_megatron.convert.errors import ConversionError


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
    """Run ``main(args_list)`` and turn failures into exit codes and one-line messages."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:
        # Library chatter (missing Apex/TE notes, deprecations) is not for converter users.
        warnings.simplefilter("ignore")
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        main(argv)
        return 0
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse usage errors and explicit exit codes pass through
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print("interrupted (partial output removed)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the whole point is to not dump a stack
        if debug or os.environ.get("PRISM_DEBUG"):
            traceback.print_exc()
        print(f"error: unexpected {type(e).__name__}: {e} (this is a bug; rerun with --debug "
              f"for the traceback)", file=sys.stderr)
        return 1
