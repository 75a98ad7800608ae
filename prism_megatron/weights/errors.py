"""The one exception type the converters raise for problems the user can fix.

The CLIs print ``error: <message>`` and exit with status 2 for these; anything else is a bug and
is reported as such (with ``--debug`` showing the traceback).
"""

from __future__ import annotations

from prism_megatron.errors import PrismError


class ConversionError(PrismError, ValueError):
    """A checkpoint, config or option that cannot be converted; the message says why and how."""


def name_list(names, limit: int = 20) -> str:
    """``a, b, c (+12 more)`` — error messages list names without flooding the terminal."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
