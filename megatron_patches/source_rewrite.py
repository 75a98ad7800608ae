"""Rewrite one function of a pinned megatron-core release by exact text replacement.

Used only where a CUDA-only assumption sits in the middle of a function body (a tensor type
string compared against ``'torch.cuda.FloatTensor'``). The replacement must match exactly, so
an upgraded megatron-core fails loudly here instead of being silently half-patched.
"""

from __future__ import annotations

import inspect
import sys
import textwrap


def rewrite_function(owner, name: str, replacements: list[tuple[str, str]],
                     imported_by: tuple = ()) -> None:
    """Recompile ``owner.name`` (a module-level function or a classmethod/staticmethod) with
    each ``old`` text replaced by ``new``; ``imported_by`` lists modules that bound the old
    function by name (``from x import f``) and must see the new one. Idempotent."""
    raw = inspect.getattr_static(owner, name)
    wrapper = type(raw) if isinstance(raw, (classmethod, staticmethod)) else None
    func = raw.__func__ if wrapper else raw
    if getattr(func, "__prism_rewritten__", False):
        return
    source = textwrap.dedent(inspect.getsource(func))
    if source.lstrip().startswith("@"):  # drop the decorator line(s); re-applied below
        source = source[source.index("def "):]
    for old, new in replacements:
        if old not in source:
            raise RuntimeError(
                f"megatron_patches: {func.__module__}.{func.__qualname__} no longer contains "
                f"{old!r}; this patch was written for megatron-core 0.16.1 and needs review.")
        source = source.replace(old, new)
    # Compiled inside a factory whose argument is named ``__class__``, so a zero-argument
    # ``super()`` in a rewritten method still finds its class.
    factory = ("def __prism_factory(__class__):\n" + textwrap.indent(source, "    ")
               + f"\n    return {func.__name__}\n")
    namespace: dict = {}
    module_globals = sys.modules[func.__module__].__dict__
    exec(compile(factory, f"<patched {func.__module__}.{func.__qualname__}>", "exec"),
         module_globals, namespace)
    new_func = namespace["__prism_factory"](owner if isinstance(owner, type) else None)
    new_func.__prism_rewritten__ = True
    new_func.__qualname__ = func.__qualname__
    setattr(owner, name, wrapper(new_func) if wrapper else new_func)
    for module in imported_by:
        setattr(module, name, new_func)
