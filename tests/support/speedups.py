"""What a C part's switch does, seen from a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys


def speedups_with_switch(module: str, value: str) -> bool:
    """`module.SPEEDUPS` in a new interpreter started with JWTGATE_NO_SPEEDUPS=`value`."""
    code = f"import {module} as m; print(m.SPEEDUPS)"
    env = {**os.environ, "JWTGATE_NO_SPEEDUPS": value}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return {"True": True, "False": False}[out.stdout.strip()]
