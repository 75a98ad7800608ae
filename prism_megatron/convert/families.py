"""The model-family registry: HF ``model_type`` -> the module defining that family's ``FAMILY``.

A family's mapping table lives beside its model (``prism_megatron/models/<family>/mapping.py``)
and is written in the vocabulary of ``prism_megatron.weights``; the conversions look it up here.
Modules are named, not imported, so that resolving a family costs nothing until it is used.
"""

from __future__ import annotations

import importlib

from prism_megatron.weights.errors import ConversionError
from prism_megatron.weights.table import Family

# model_type -> module defining FAMILY. Other model families plug in here.
FAMILY_MODULES = {
    "qwen3_vl": "prism_megatron.models.qwen3_vl.mapping",
}


def get_family(model_type: str | None) -> Family:
    if model_type not in FAMILY_MODULES:
        raise ConversionError(
            f"unsupported model_type {model_type!r}: this converter knows "
            f"{', '.join(sorted(FAMILY_MODULES))} (add a mapping table to "
            f"prism_megatron/convert/families.py:FAMILY_MODULES to support another family)")
    return importlib.import_module(FAMILY_MODULES[model_type]).FAMILY
