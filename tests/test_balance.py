"""The connection table through which a supervisor's workers share HAProxy's connections."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from spoa.balance import ConnectionTable, WorkerShare


@pytest.fixture
def table() -> Iterator[ConnectionTable]:
    created = ConnectionTable.create(3)
    yield created
    created.close()
    os.close(created.fileno())


def test_a_worker_defers_to_a_live_sibling_holding_fewer(table: ConnectionTable) -> None:
    table.publish(0, 2, now=100.0)
    table.publish(1, 1, now=100.0)
    assert not table.may_accept(0, now=100.2)
    assert table.may_accept(1, now=100.2)
    table.publish(1, 2, now=100.3)
    assert table.may_accept(0, now=100.4)  # a tie: both may take the next one
    assert table.may_accept(1, now=100.4)


def test_empty_and_silent_slots_hold_nobody_back(table: ConnectionTable) -> None:
    table.publish(0, 5, now=100.0)
    assert table.may_accept(0, now=100.0)  # slots 1 and 2 never published (starting)
    table.publish(1, 0, now=100.0)
    assert not table.may_accept(0, now=100.0)
    # A hung worker stops publishing; after STALE_AFTER its siblings stop deferring.
    table.publish(0, 5, now=100.0 + ConnectionTable.STALE_AFTER)
    assert table.may_accept(0, now=100.0 + ConnectionTable.STALE_AFTER)
    table.publish(1, 0, now=200.0)
    table.clear(1)  # the supervisor reaped it
    assert table.may_accept(0, now=200.0)


def test_workers_see_one_table_through_the_inherited_descriptor(table: ConnectionTable) -> None:
    """What a worker process maps from the descriptor its supervisor passed it."""
    seen_by_worker = ConnectionTable(table.fileno())
    assert seen_by_worker.slots == 3
    clock = iter([50.0, 50.0, 50.0]).__next__
    share = WorkerShare(seen_by_worker, 2, clock=clock)
    share.publish(4)
    assert table.held(2) == 4
    table.publish(0, 1, now=50.0)
    assert not share.may_accept()
    share.leave()
    assert table.may_accept(0, now=50.0)
    assert table.held(2) == 0
    seen_by_worker.close()


def test_a_slot_outside_the_table_is_refused(table: ConnectionTable) -> None:
    with pytest.raises(ValueError, match="slot 3"):
        WorkerShare(table, 3)
