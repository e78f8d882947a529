"""The C claim compaction (`spoa/verifier/_claims.c`) against the Python reference.

Each verified token's claims go through it before they are cached: the two must give
equal claims made of the same objects, and leave the table of shared values the same.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spoa.verifier import cache
from tests.support.speedups import speedups_with_switch

STR_MAX = 256

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
# Names and strings from a small alphabet, so that payloads repeat what the table holds.
texts = st.text(alphabet="ab\u00e9\U0001f600", max_size=4) | st.sampled_from(
    ["https://issuer.test/", "x" * STR_MAX, "y" * (STR_MAX + 1), "\u00e9" * (STR_MAX + 1)]
)
json_values = st.recursive(
    json_scalars | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
payloads = st.dictionaries(texts, json_values, max_size=8)


def _origins(result: dict[str, Any], payload: dict[str, Any], table: dict[Any, Any]) -> list[str]:
    """Where each name and value of `result` comes from: the table or the payload."""

    def origin(item: Any, own: Any) -> str:
        if type(item) is str and table.get(item) is item:
            return "table" if item is not own else "table, the payload's own"
        return "payload" if item is own else "elsewhere"

    return [
        f"{origin(name, own_name)} / {origin(value, own_value)}"
        for (name, value), (own_name, own_value) in zip(
            result.items(), payload.items(), strict=True
        )
    ]


def _both(payload: dict[str, Any], table: dict[Any, Any], table_max: int) -> None:
    """Run the C and the Python versions from equal tables; compare everything."""
    assert cache._compact_c is not None
    c_table, python_table = dict(table), dict(table)
    c_result = cache._compact_c(c_table, table_max, STR_MAX, payload)
    saved = cache._SHARED, cache._SHARED_MAX
    try:
        cache._SHARED, cache._SHARED_MAX = python_table, table_max
        python_result = cache.compact_claims_python(payload)
    finally:
        cache._SHARED, cache._SHARED_MAX = saved
    assert c_result == python_result == payload
    assert list(c_result) == list(python_result)  # member order too
    assert list(c_table.items()) == list(python_table.items())
    assert _origins(c_result, payload, c_table) == _origins(python_result, payload, python_table)


def test_the_c_version_is_built_and_in_use() -> None:
    # scripts/setup builds it; a silent fall-back would cost each cache miss about 1 us.
    assert cache.SPEEDUPS, "spoa/verifier/_claims.c was not built"


@pytest.mark.parametrize(("value", "c_in_use"), [("1", False), ("0", True), ("", True)])
def test_the_python_version_can_be_forced(value: str, c_in_use: bool) -> None:
    assert speedups_with_switch("spoa.verifier.cache", value) is c_in_use


@settings(max_examples=300, deadline=None)
@given(payload=payloads, seed=st.lists(texts, max_size=6), room=st.integers(-2, 20))
def test_same_result_and_table_as_the_reference(
    payload: dict[str, Any], seed: list[str], room: int
) -> None:
    """Tables that hold some of the payload's strings already, with room for all of it,
    exactly for it, or not quite (then the table is emptied first)."""
    table: dict[Any, Any] = {text: text for text in seed}
    table[frozenset({"read"})] = frozenset({"read"})  # shared() keeps sets there too
    _both(payload, table, len(table) + 2 * len(payload) + room)


def test_room_is_checked_once_for_the_whole_payload() -> None:
    payload = json.loads('{"iss": "i", "sub": "s"}')
    exactly = cache._compact_c
    assert exactly is not None
    table: dict[Any, Any] = {}
    exactly(table, 4, STR_MAX, payload)
    assert set(table) == {"iss", "i", "sub", "s"}
    table = {}
    exactly(table, 3, STR_MAX, payload)  # more than the table can ever hold: looked up only
    assert table == {}
    old = {"x": "x", "y": "y"}
    exactly(old, 5, STR_MAX, payload)  # no room for four more: emptied, then kept
    assert set(old) == {"iss", "i", "sub", "s"}


def test_a_kept_string_is_used_and_long_or_subclassed_ones_are_not_shared() -> None:
    assert cache._compact_c is not None

    class Text(str):
        pass

    kept = "".join(["https://", "issuer.test/"])
    table: dict[Any, Any] = {kept: kept}
    payload = {
        "iss": "https://issuer.test/",
        "long": "z" * (STR_MAX + 1),
        "sub": Text("alice"),
        "n": 1,
    }
    result = cache._compact_c(table, 100, STR_MAX, payload)
    assert result["iss"] is kept
    assert result["long"] is payload["long"]
    assert result["sub"] is payload["sub"]
    assert "z" * (STR_MAX + 1) not in table
    assert "alice" not in table
    _both(payload, {kept: kept}, 100)


@pytest.mark.parametrize(
    "arguments",
    [
        ({}, 10, STR_MAX),
        ({}, 10, STR_MAX, [("a", 1)]),
        ([], 10, STR_MAX, {}),
        ({}, "10", STR_MAX, {}),
        ({}, 10, None, {}),
    ],
)
def test_wrong_arguments_raise_type_errors(arguments: tuple[Any, ...]) -> None:
    assert cache._compact_c is not None
    with pytest.raises(TypeError):
        cache._compact_c(*arguments)
