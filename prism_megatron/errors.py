"""The base of every error a user can fix, and the one error boundary every command runs in.

``run_cli`` is used by ``prism`` (every sub-command) and by every ``tools/*.py`` script:

* a :class:`PrismError` (bad config, input, checkpoint or environment) or a user-facing OS error
  (a missing file, a permission, a full disk) -> ``<name>: error: <one line>`` on stderr, exit 2;
* ``--debug`` (or ``PRISM_DEBUG=1``, which torchrun workers and pipeline stages inherit) also
  prints the traceback;
* ``KeyboardInterrupt`` -> one short line, exit 130;
* anything else is a bug: its traceback is kept, followed by one line saying so (exit 1).

Under torchrun every rank hits the same configuration or path error; only rank 0 prints it. The
other ranks stay silent unless their message differs from rank 0's (compared through the
torch.distributed store once the process group exists) or rank 0 reported nothing.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback


class PrismError(Exception):
    """An error whose message tells the user what to change."""


# OS errors a user fixes (a path, a permission, the disk); other OSErrors are treated as bugs.
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                  PermissionError)
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOENT, errno.EACCES}
_DEBUG_VALUES = ("1", "true", "yes", "on")


def debug_enabled(argv=None) -> bool:
    """``--debug`` on the command line or ``PRISM_DEBUG=1`` in the environment."""
    return "--debug" in (argv or ()) or (
        os.environ.get("PRISM_DEBUG", "").strip().lower() in _DEBUG_VALUES)


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, (PrismError, *USER_OS_ERRORS)):
        return True
    return isinstance(exc, OSError) and exc.errno in _USER_ERRNOS


def one_line(exc: BaseException) -> str:
    """The message on one line (a multi-line message is joined; an empty one names the type)."""
    parts = [p.strip() for p in str(exc).splitlines() if p.strip()]
    return " | ".join(parts) if parts else type(exc).__name__


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _should_print(message: str) -> bool:
    """Rank 0 always prints. Another rank prints only when its message is not rank 0's: with a
    process group, messages are compared through the store (rank 0 may not have failed, or may
    have failed differently); without one (config/path checks run before distributed init, on
    the same inputs) the error is rank 0's too."""
    rank = _rank()
    try:
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
    except Exception:  # noqa: BLE001 - torch absent or broken: nothing to compare with
        initialized = False
    if not initialized:
        return rank == 0
    try:
        from datetime import timedelta

        store = dist.distributed_c10d._get_default_store()
        store.set(f"prism_error/{rank}", message)
        if rank == 0:
            return True
        store.wait(["prism_error/0"], timedelta(seconds=10))
        return store.get("prism_error/0").decode() != message
    except Exception:  # noqa: BLE001 - rank 0 did not report (it may be fine): say it here
        return True


def report(name: str | None, exc: BaseException, *, debug: bool) -> int:
    """Print ``exc`` as a user error or as a bug; returns the exit status."""
    prefix = f"{name}: " if name else ""
    if is_user_error(exc):
        message = one_line(exc)
        if _should_print(message):
            if debug:
                traceback.print_exception(exc, file=sys.stderr)
            tag = f"[rank {_rank()}] " if _rank() else ""
            print(f"{tag}{prefix}error: {message}", file=sys.stderr, flush=True)
        return 2
    traceback.print_exception(exc, file=sys.stderr)
    print(f"{prefix}internal error: {type(exc).__name__}: {one_line(exc)} -- this is a bug in "
          f"prism-megatron, not in your input; please report it with the traceback above",
          file=sys.stderr, flush=True)
    return 1


def run_cli(fn, argv=None, name: str | None = None) -> int:
    """Run ``fn(argv)`` inside the error boundary; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    try:
        code = fn(argv)
        return code if isinstance(code, int) else 0
    except SystemExit as e:  # argparse usage errors and explicit exit codes pass through
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if _rank() == 0:
            print(f"{name + ': ' if name else ''}interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the boundary: every failure becomes an exit status
        return report(name, exc, debug=debug)
