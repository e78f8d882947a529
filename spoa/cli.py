"""The `jwtgate` command line."""

from __future__ import annotations

import argparse
import sys

from spoa import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jwtgate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"jwtgate {__version__}")
    parser.parse_args(argv if argv is not None else sys.argv[1:])
    parser.print_help()
    return 0
