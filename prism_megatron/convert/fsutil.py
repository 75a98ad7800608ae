"""Atomic output directories: build everything in ``OUT.tmp-*``, rename into place at the end.

A crash or Ctrl-C leaves either the previous ``OUT`` or nothing — never a half-written
checkpoint that a trainer might pick up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from prism_megatron.weights.errors import ConversionError


def check_output(out: str | Path, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConversionError(f"output directory {out} exists and is not empty "
                              f"(pass --force to replace it)")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False):
    """Yields a fresh temporary directory next to ``out``; on success it becomes ``out``
    (replacing an existing one only with ``force``); on any failure it is removed."""
    out = check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the result is a normal directory
    try:
        yield tmp
        if out.exists():
            # Move the old directory aside first so the swap is two renames, not a long rmtree
            # during which neither version is complete.
            old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
