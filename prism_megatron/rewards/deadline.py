"""Run a function under a hard wall-clock deadline, from any thread (used for math-verify).

math-verify's own ``parsing_timeout`` / ``timeout_seconds`` use ``signal.alarm`` and raise
``ValueError`` outside the main thread, and a timeout inside them is swallowed into a plain
"not equal". We therefore disable them (pass ``None``) and enforce one deadline ourselves:

* main thread of the main interpreter: an ``ITIMER_REAL`` alarm whose handler raises a
  ``BaseException`` subclass (math-verify's ``except Exception`` cannot swallow it). An outer timer
  (e.g. pytest-timeout's) is saved and re-armed afterwards. No process, no IPC.
* any other thread: a persistent sandbox process (a fresh interpreter) that is killed and
  restarted on a timeout, so even a computation stuck in C code cannot hang the caller.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

__all__ = ["DeadlineExceeded", "SandboxError", "call_with_deadline", "shutdown_sandbox"]

_STARTUP_TIMEOUT_S = 120.0


class DeadlineExceeded(Exception):
    """The call did not finish before its deadline."""


class SandboxError(Exception):
    """The sandbox process died or the function raised; the message says which."""


class _Alarm(BaseException):
    """Raised by the SIGALRM handler; BaseException so library ``except Exception`` lets it pass."""


def _raise_alarm(signum: int, frame: Any) -> None:
    raise _Alarm


def _signal_usable(timeout: float) -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False
    outer_remaining = signal.getitimer(signal.ITIMER_REAL)[0]
    # Nest only under an outer timer that would fire after ours (we re-arm it afterwards).
    return outer_remaining == 0.0 or outer_remaining > timeout


def _call_with_alarm(fn: Callable[..., Any], args: tuple, timeout: float) -> Any:
    outer_remaining, _ = signal.getitimer(signal.ITIMER_REAL)
    outer_handler = signal.signal(signal.SIGALRM, _raise_alarm)
    started = time.monotonic()
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            return fn(*args)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Alarm:
        raise DeadlineExceeded(f"exceeded {timeout:.3g}s") from None
    finally:
        signal.signal(signal.SIGALRM, outer_handler)
        if outer_remaining > 0:
            left = outer_remaining - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-6))


def _serve_forever(fd: int, preload: tuple[str, ...]) -> None:
    """Sandbox main loop: import ``preload``, report ready, then run (fn, args) jobs forever."""
    import importlib

    connection = Connection(fd)
    for entry in preload:  # "package.module" imports it; "package.module:function" also calls it
        module_name, _, function_name = entry.partition(":")
        module = importlib.import_module(module_name)
        if function_name:
            getattr(module, function_name)()
    connection.send(("ready", None))
    while True:
        try:
            fn, args = connection.recv()
        except (EOFError, OSError):
            return
        try:
            connection.send(("ok", fn(*args)))
        except Exception as error:  # reported to the caller, the sandbox keeps serving
            connection.send(("error", f"{type(error).__name__}: {error}"))


class _Sandbox:
    """A fresh interpreter (``python -c``, not multiprocessing's spawn, so the caller's
    ``__main__`` is never re-imported) serving jobs over a socket pair."""

    def __init__(self, preload: tuple[str, ...]) -> None:
        parent_end, child_end = socket.socketpair()
        code = (
            "import sys; from prism_megatron.rewards.deadline import _serve_forever; "
            f"_serve_forever({child_end.fileno()}, tuple(sys.argv[1:]))"
        )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, *preload],
            pass_fds=(child_end.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=env,
        )
        child_end.close()
        self.connection = Connection(parent_end.detach())
        # Startup (interpreter + imports) is not charged to any call's deadline.
        if not self.connection.poll(_STARTUP_TIMEOUT_S):
            self.kill()
            raise SandboxError("sandbox process did not start")
        try:
            self.connection.recv()
        except (EOFError, OSError) as error:
            self.kill()
            raise SandboxError(f"sandbox process failed to start: {error!r}") from error

    def call(self, fn: Callable[..., Any], args: tuple, timeout: float) -> Any:
        self.connection.send((fn, args))
        if not self.connection.poll(timeout):
            raise DeadlineExceeded(f"exceeded {timeout:.3g}s")
        status, value = self.connection.recv()
        if status != "ok":
            raise SandboxError(value)
        return value

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.connection.close()


_sandbox: _Sandbox | None = None
_sandbox_lock = threading.Lock()


def shutdown_sandbox() -> None:
    """Stops the sandbox process if one is running (it is restarted on demand)."""
    global _sandbox
    with _sandbox_lock:
        if _sandbox is not None:
            _sandbox.kill()
            _sandbox = None


atexit.register(shutdown_sandbox)


def _call_in_sandbox(
    fn: Callable[..., Any], args: tuple, timeout: float, preload: tuple[str, ...]
) -> Any:
    global _sandbox
    with _sandbox_lock:  # one job at a time; callers in other threads queue here
        if _sandbox is not None and _sandbox.process.poll() is not None:
            _sandbox.kill()  # died between calls (e.g. killed by the OOM killer): replace it
            _sandbox = None
        if _sandbox is None:
            _sandbox = _Sandbox(preload)
        try:
            return _sandbox.call(fn, args, timeout)
        except (DeadlineExceeded, EOFError, OSError) as error:
            _sandbox.kill()  # a stuck or dead worker is replaced on the next call
            _sandbox = None
            if isinstance(error, DeadlineExceeded):
                raise
            raise SandboxError(f"sandbox process died: {error!r}") from error


def call_with_deadline(
    fn: Callable[..., Any],
    args: tuple = (),
    *,
    timeout: float,
    isolation: str = "auto",
    preload: tuple[str, ...] = (),
) -> Any:
    """Returns ``fn(*args)`` or raises :class:`DeadlineExceeded` after ``timeout`` seconds.

    ``isolation``: ``"auto"`` (signal alarm in the main thread, sandbox process elsewhere),
    ``"signal"`` or ``"process"``. In the process mode ``fn`` must be a picklable module-level
    function, ``preload`` names modules to import (``"pkg.mod"``) or zero-argument functions to
    call (``"pkg.mod:fn"``) once when the sandbox starts, and errors
    raised by ``fn`` come back as :class:`SandboxError`.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    if isolation not in ("auto", "signal", "process"):
        raise ValueError(f"isolation must be auto|signal|process, got {isolation!r}")
    use_signal = isolation == "signal" or (isolation == "auto" and _signal_usable(timeout))
    if use_signal:
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("signal isolation only works in the main thread")
        return _call_with_alarm(fn, args, timeout)
    return _call_in_sandbox(fn, args, timeout, preload)
