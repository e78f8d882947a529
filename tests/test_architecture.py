"""Dependencies point inward: the two cores never import the edge, asyncio or each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SPOA = Path(__file__).resolve().parents[1] / "spoa"


def imports_of(source: str, package: str) -> set[str]:
    """Every module a module of spoa/`package` imports, relative imports made absolute."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module:
                    names.add(node.module)
                continue
            # `.` is the module's own package (spoa.<package>), each further dot its parent.
            base = ["spoa", package][: 2 - (node.level - 1)]
            if node.module:
                names.add(".".join([*base, node.module]))
            else:  # `from .. import glue`: each name is a module of that package
                names.update(".".join([*base, alias.name]) for alias in node.names)
    return names


def imported_modules(package: str) -> dict[str, set[str]]:
    return {
        path.name: imports_of(path.read_text(), package)
        for path in sorted((SPOA / package).glob("*.py"))
    }


def test_relative_imports_are_seen() -> None:
    """Regression (test review): only absolute `from` imports were read, so a core module
    could import the edge with `from ..server import ...` unseen."""
    source = "from ..server import SpoaServer\nfrom .. import glue\nfrom .frames import x\n"
    assert imports_of(source, "protocol") == {"spoa.server", "spoa.glue", "spoa.protocol.frames"}


@pytest.mark.parametrize(
    ("package", "allowed_outside_stdlib", "forbidden"),
    [
        ("protocol", ("spoa.protocol",), ("asyncio", "socket", "time", "logging", "spoa")),
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
