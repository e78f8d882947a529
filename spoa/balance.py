"""Spreading HAProxy's agent connections evenly over a supervisor's workers.

The workers share one listening socket. Left to the kernel, whichever worker wakes first
takes a whole burst of connections (8/0 and 7/1 splits were measured), and keeps them:
HAProxy's SPOE connections live for minutes. So each worker publishes how many connections
it holds in a small table shared through the supervisor, and accepts a new one only while
no live sibling holds fewer. A worker that stops publishing (dead, hung, or still
starting) is left out of the comparison, so it never holds the others back.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable

# Per slot: connections held, and the CLOCK_MONOTONIC time (the same in every process) it
# was last published. Doubles hold both exactly; one aligned 8-byte store each.
_FIELDS = 2
_SLOT_BYTES = 8 * _FIELDS


class ConnectionTable:
    """The supervisor's table of connections held per worker slot, in shared memory."""

    # A slot not published for this long belongs to a worker that is not turning its
    # event loop (workers publish every 50 ms); its siblings stop deferring to it. Well
    # inside HAProxy's `timeout hello` (2 s in the shipped spoe-jwt.conf).
    STALE_AFTER = 0.5

    def __init__(self, fd: int) -> None:
        """Map the table behind `fd`; its size gives the number of slots."""
        size = os.fstat(fd).st_size
        if size <= 0 or size % _SLOT_BYTES:
            raise ValueError(f"not a connection table: {size} bytes")
        self.slots = size // _SLOT_BYTES
        self._fd = fd
        self._map = mmap.mmap(fd, size)
        self._values = memoryview(self._map).cast("d")

    @classmethod
    def create(cls, slots: int) -> ConnectionTable:
        """A new table with every slot empty, on a file descriptor to pass to workers."""
        if slots <= 0:
            raise ValueError("a connection table needs at least one slot")
        fd = os.memfd_create("jwtgate-connections")  # workers get it through pass_fds
        os.ftruncate(fd, slots * _SLOT_BYTES)
        table = cls(fd)
        for slot in range(slots):
            table.clear(slot)
        return table

    def fileno(self) -> int:
        return self._fd

    def clear(self, slot: int) -> None:
        """The worker in `slot` is gone or not serving yet: leave it out."""
        self._values[slot * _FIELDS + 1] = 0.0
        self._values[slot * _FIELDS] = 0.0

    def publish(self, slot: int, held: int, now: float) -> None:
        self._values[slot * _FIELDS] = float(held)
        self._values[slot * _FIELDS + 1] = now

    def held(self, slot: int) -> int:
        return int(self._values[slot * _FIELDS])

    def may_accept(self, slot: int, now: float) -> bool:
        """True unless a live sibling holds fewer connections than `slot` does."""
        values = self._values
        mine = values[slot * _FIELDS]
        for other in range(self.slots):
            if other == slot:
                continue
            published = values[other * _FIELDS + 1]
            live = published and now - published < self.STALE_AFTER
            if live and values[other * _FIELDS] < mine:
                return False
        return True

    def close(self) -> None:
        self._values.release()
        self._map.close()


class WorkerShare:
    """One worker's view of the table: what the SPOP server's acceptor asks and tells."""

    def __init__(
        self,
        table: ConnectionTable,
        slot: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= slot < table.slots:
            raise ValueError(f"worker slot {slot} is outside the table of {table.slots}")
        self.table = table
        self.slot = slot
        self._clock = clock

    def may_accept(self) -> bool:
        return self.table.may_accept(self.slot, self._clock())

    def publish(self, held: int) -> None:
        self.table.publish(self.slot, held, self._clock())

    def leave(self) -> None:
        self.table.clear(self.slot)
