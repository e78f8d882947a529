"""Dependencies point inward: the two cores never import the edge, asyncio or each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SPOA = Path(__file__).resolve().parents[1] / "spoa"


def imported_modules(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((SPOA / package).glob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        found[path.name] = names
    return found


@pytest.mark.parametrize(
    ("package", "allowed_outside_stdlib", "forbidden"),
    [
        ("protocol", (), ("asyncio", "socket", "time", "logging", "spoa")),
        (
            "verifier",
            ("cryptography", "jwcrypto", "spoa.verifier"),
            ("asyncio", "socket", "time", "logging", "spoa.protocol", "urllib", "http"),
        ),
    ],
)
def test_cores_import_only_what_they_may(
    package: str, allowed_outside_stdlib: tuple[str, ...], forbidden: tuple[str, ...]
) -> None:
    for module, names in imported_modules(package).items():
        for name in names:
            root = name.split(".")[0]
            if any(name == a or name.startswith(a + ".") for a in allowed_outside_stdlib):
                continue
            assert root not in forbidden, f"{package}/{module} imports {name}"
            assert name not in forbidden, f"{package}/{module} imports {name}"
            assert root != "spoa", f"{package}/{module} imports {name} from the edge"
