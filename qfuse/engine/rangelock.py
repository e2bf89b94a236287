"""Serializing requests whose guest ranges overlap.

Writes lock whole clusters: two writes that touch one cluster run one after
the other (both may change its L2 entry), writes to different clusters run
at once.  The in-flight list is short (one entry per request in progress),
so a linear scan beats any cleverer structure.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class RangeLocks:
    def __init__(self) -> None:
        self._held: list[tuple[int, int, trio.Event]] = []

    @asynccontextmanager
    async def locked(self, start: int, end: int) -> AsyncIterator[None]:
        """Hold [start, end) exclusively for the block's duration."""
        while True:
            for held_start, held_end, released in self._held:
                if held_start < end and start < held_end:
                    await released.wait()
                    break
            else:
                break
        entry = (start, end, trio.Event())
        self._held.append(entry)
        try:
            yield
        finally:
            self._held.remove(entry)
            entry[2].set()
