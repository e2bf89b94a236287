"""Serializing requests whose guest ranges overlap, and a lock without a
checkpoint.

Writes lock whole clusters: two writes that touch one cluster run one after
the other (both may change its L2 entry), writes to different clusters run
at once.  The in-flight list is short (one entry per request in progress),
so a linear scan beats any cleverer structure.

trio's `Lock.acquire` always yields to the scheduler, even when the lock is
free: a trip through the run loop that costs more than a cached `pwrite`.
`Held` takes a free lock without yielding; only a contended one waits.
"""

from __future__ import annotations

import trio


class Held:
    """``async with Held(lock):`` — acquire without a checkpoint when free."""

    __slots__ = ("_lock",)

    def __init__(self, lock: trio.Lock) -> None:
        self._lock = lock

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()


class RangeLocks:
    def __init__(self) -> None:
        # [start, end, event]: the event is made only once someone waits.
        self._held: list[list] = []

    def is_free(self, start: int, end: int) -> bool:
        """No request holds any part of [start, end)."""
        for held_start, held_end, _ in self._held:
            if held_start < end and start < held_end:
                return False
        return True

    def locked(self, start: int, end: int) -> _RangeHeld:
        """``async with locks.locked(start, end):`` holds [start, end) exclusively."""
        return _RangeHeld(self, start, end)


class _RangeHeld:
    __slots__ = ("_locks", "_entry")

    def __init__(self, locks: RangeLocks, start: int, end: int) -> None:
        self._locks = locks
        self._entry: list = [start, end, None]

    async def __aenter__(self) -> None:
        start, end, _ = self._entry
        held = self._locks._held
        while True:
            for other in held:
                if other[0] < end and start < other[1]:
                    if other[2] is None:
                        other[2] = trio.Event()
                    await other[2].wait()
                    break
            else:
                break
        held.append(self._entry)

    async def __aexit__(self, *exc: object) -> None:
        held, entry = self._locks._held, self._entry
        for i, other in enumerate(held):
            if other is entry:  # by identity: two empty ranges compare equal
                del held[i]
                break
        released = entry[2]
        if released is not None:
            released.set()
