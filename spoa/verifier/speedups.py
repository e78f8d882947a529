"""The verifier's optional C parts, and the switch that turns them off."""

from __future__ import annotations

import importlib
import os
from typing import Any


def optional_speedup(module: str, name: str) -> Any | None:
    """`name` from the C extension `module`, or None when it was not built or
    JWTGATE_NO_SPEEDUPS asks for the Python reference (the same switch as the SPOP
    decoder's, read here too: the two cores share no module)."""
    if os.environ.get("JWTGATE_NO_SPEEDUPS", "").strip() not in ("", "0"):
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None
