"""An LRU cache of one-cluster metadata tables (L2 tables; later refcount blocks).

Concurrency: the cache is only touched from the trio event loop.  A lookup
that hits runs without an `await`, so it is atomic.  A miss awaits the host
read; a second request for the same table meanwhile waits for that read
instead of issuing its own (`_Load`).  A table handed out stays valid for
its holder even if it is evicted afterwards: eviction drops the cache's
reference, never the holder's.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

import trio


class _Load:
    """One in-flight table read that several requests may wait for."""

    __slots__ = ("done", "table", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.table: array | None = None
        self.error: BaseException | None = None


class TableCache:
    """Tables keyed by host offset, at most `capacity` of them.

    `load(host_offset)` reads and decodes one table; it may raise, and the
    error reaches every request waiting on that table.
    """

    def __init__(self, capacity: int,
                 load: Callable[[int], Coroutine[Any, Any, array]]) -> None:
        self.capacity = max(1, capacity)
        self._load = load
        self._tables: OrderedDict[int, array] = OrderedDict()
        self._loading: dict[int, _Load] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    async def get(self, host_offset: int) -> array:
        table = self._tables.get(host_offset)
        if table is not None:
            self.hits += 1
            self._tables.move_to_end(host_offset)
            return table
        pending = self._loading.get(host_offset)
        if pending is not None:
            self.hits += 1
            await pending.done.wait()
            if pending.error is not None:
                raise pending.error
            assert pending.table is not None
            return pending.table
        self.misses += 1
        pending = _Load()
        self._loading[host_offset] = pending
        try:
            table = await self._load(host_offset)
        except BaseException as exc:
            pending.error = exc
            raise
        else:
            pending.table = table
            self._insert(host_offset, table)
            return table
        finally:
            del self._loading[host_offset]
            pending.done.set()

    def _insert(self, host_offset: int, table: array) -> None:
        self._tables[host_offset] = table
        while len(self._tables) > self.capacity:
            self._tables.popitem(last=False)
            self.evictions += 1

    def statistics(self) -> dict[str, int]:
        return {
            "capacity": self.capacity,
            "cached": len(self._tables),
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }
