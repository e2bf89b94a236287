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
        self._held: list[tuple[int, int, trio.Event]] = []

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
        self._entry = (start, end, trio.Event())

    async def __aenter__(self) -> None:
        start, end, _ = self._entry
        held = self._locks._held
        while True:
            for held_start, held_end, released in held:
                if held_start < end and start < held_end:
                    await released.wait()
                    break
            else:
                break
        held.append(self._entry)

    async def __aexit__(self, *exc: object) -> None:
        self._locks._held.remove(self._entry)
        self._entry[2].set()
