"""Trailing measurement units recognised by the rule scorer (spec §5.2, numeric path).

Only units in this list are stripped; a bare ``m`` is deliberately absent (spec §5.3 row 21).
"""

from __future__ import annotations

import re

__all__ = ["UNITS", "split_unit"]

UNITS: tuple[str, ...] = (
    "°", "°C", "°F", "%",
    "meter", "meters", "cm", "mm", "km", "inch", "inches", "ft", "feet",
    "kg", "mg", "lb", "lbs", "pound", "pounds",
    "second", "seconds", "sec", "minute", "minutes", "min", "hour", "hours", "hr",
    "day", "days", "year", "years",
    "plate", "plates", "piece", "pieces", "item", "items", "people", "person", "persons",
    "student", "students", "time", "times",
    "dm", "ml", "mL", "liter", "liters", "litre", "litres",
    "cm²", "cm³", "m²", "m³",
    "元", "米", "厘米", "千克", "克", "度", "个", "条", "张", "块", "人", "次",
)

# Longest alternatives first so "cm²" wins over "m²" and "厘米" over "米". The unit must follow a
# digit (optionally after spaces) and end the string; matching is case-insensitive.
_UNIT_ALTERNATION = "|".join(
    re.escape(unit) for unit in sorted({u.lower() for u in UNITS}, key=len, reverse=True)
)
_TRAILING_UNIT = re.compile(rf"^(.*\d)\s*({_UNIT_ALTERNATION})$", re.IGNORECASE | re.DOTALL)


def split_unit(text: str) -> tuple[str, str | None]:
    """Splits ONE trailing unit off ``text``: ``"12 cm" -> ("12", "cm")``, else ``(text, None)``."""
    match = _TRAILING_UNIT.match(text.strip())
    if match is None:
        return text.strip(), None
    return match.group(1).strip(), match.group(2)
