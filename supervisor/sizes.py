"""Sizes in bytes as people write them in configuration ("8GiB", "512MB") and read them in tables."""

from __future__ import annotations

import re
from typing import Any

AUTO = -1  # a budget of -1 is measured at start
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "M": 1000**2, "MB": 1000**2, "G": 1000**3, "GB": 1000**3,
          "T": 1000**4, "TB": 1000**4, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_size(value: Any) -> int:
    """Bytes from an int or a string with a unit ("8GiB", "512MB", "1.5 GiB"); "auto" is AUTO.
    Raises ValueError with what is accepted."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value < AUTO:
            raise ValueError(f"{value} is not a size: it is negative")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "auto":
            return AUTO
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", text)
        if match and match.group(2).upper() in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    raise ValueError(f"{value!r} is not a size: use bytes (an integer) or a number with a unit, "
                     "like \"8GiB\" or \"512MB\"")


def format_size(n: int) -> str:
    """Bytes for people: 1.5 GiB, 300 MiB."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}" if abs(n) < 10 * size else f"{n / size:.0f} {unit}"
    return f"{n} B"
