"""Hypothesis strategies for SPOP typed data and messages, shared by the protocol tests."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from hypothesis import strategies as st

from spoa.protocol import Message

uint64 = st.integers(min_value=0, max_value=2**64 - 1)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
values = st.one_of(
    st.none(),
    st.booleans(),
    int64,
    uint64,
    st.text(),
    st.text(min_size=240, max_size=3000),  # multi-byte length prefixes, as tokens have
    st.binary(),
    st.builds(IPv4Address, st.integers(min_value=0, max_value=2**32 - 1)),
    st.builds(IPv6Address, st.integers(min_value=0, max_value=2**128 - 1)),
)
names = st.text(max_size=40)
messages = st.builds(Message, names, st.lists(st.tuples(names, values), max_size=8).map(tuple))


def mutate(data: st.DataObject, raw: bytes) -> bytearray:
    """One to four edits drawn by `data`: a byte flipped, cut or inserted, or a truncation."""
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        where = data.draw(st.integers(min_value=0, max_value=len(out)))
        edit = data.draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        byte = data.draw(st.integers(min_value=0, max_value=255))
        if edit == "flip" and where < len(out):
            out[where] = byte
        elif edit == "cut" and where < len(out):
            del out[where]
        elif edit == "insert":
            out.insert(where, byte)
        elif edit == "truncate":
            del out[where:]
    return out
