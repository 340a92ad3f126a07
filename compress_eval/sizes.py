"""Sizes as people write them (24GB, 24GiB, 512MB): memory to plan for, the largest checkpoint shard."""

from __future__ import annotations

import re

from compress_eval.errors import UserError

MEMORY_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(text: str) -> int:
    """Bytes of a memory size: 24GB, 24GiB, 512MB, 1.5TB, or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or (unit and unit not in MEMORY_UNITS) or float(match.group(1)) <= 0:
        raise UserError(f"memory size {text!r} is not a size: use e.g. 24GB, 24GiB or 512MB")
    return int(float(match.group(1)) * MEMORY_UNITS.get(unit, 1))
