"""An LRU cache of one-cluster metadata tables: L2 tables and refcount blocks.

Concurrency: the cache is only touched from the trio event loop.  A lookup
that hits runs without an `await`, so it is atomic.  A miss awaits the host
read; a second request for the same table meanwhile waits for that read
instead of issuing its own (`_Load`).

Two kinds of table are never evicted: a *pinned* one (a writer is changing
it across awaits, so a second copy must never be loaded beside it) and a
*dirty* one (its changes have not reached the file; the owner writes dirty
tables back in dependency order and then calls `mark_clean`).  While every
table is pinned or dirty the cache may hold more than `capacity`; the owner
keeps that short by writing back when `needs_writeback()` says so.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class _Load(Generic[T]):
    """One in-flight table read that several requests may wait for."""

    __slots__ = ("done", "table", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.table: T | None = None
        self.error: BaseException | None = None


class TableCache(Generic[T]):
    """Tables keyed by host offset, about `capacity` of them.

    `load(host_offset)` reads and decodes one table; it may raise, and the
    error reaches every request waiting on that table.
    """

    def __init__(self, capacity: int, load: Callable[[int], Awaitable[T]]) -> None:
        self.capacity = max(1, capacity)
        self._load = load
        self._tables: OrderedDict[int, T] = OrderedDict()
        self._loading: dict[int, _Load[T]] = {}
        self._pins: dict[int, int] = {}
        self._dirty: set[int] = set()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    async def get(self, host_offset: int) -> T:
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

    def peek(self, host_offset: int) -> T | None:
        """The table if it is cached (a hit), else None; never loads."""
        table = self._tables.get(host_offset)
        if table is not None:
            self.hits += 1
            self._tables.move_to_end(host_offset)
        return table

    def pinned(self, host_offset: int) -> _Pinned[T]:
        """``async with cache.pinned(offset) as table:`` the table at
        `host_offset`, kept in the cache until the block ends."""
        return _Pinned(self, host_offset)

    def _unpin(self, host_offset: int) -> None:
        left = self._pins[host_offset] - 1
        if left:
            self._pins[host_offset] = left
        else:
            del self._pins[host_offset]
            self._evict_over_capacity()

    def add_new(self, host_offset: int, table: T) -> None:
        """Put a table that exists only in memory so far (dirty)."""
        self._tables[host_offset] = table
        self._dirty.add(host_offset)
        self._evict_over_capacity()

    def mark_dirty(self, host_offset: int, table: T | None = None) -> None:
        """`table` (the caller's copy) goes back in if it was evicted meanwhile."""
        if host_offset not in self._tables:
            assert table is not None, "a dirty table must be in the cache"
            self._tables[host_offset] = table
        self._dirty.add(host_offset)

    def mark_clean(self, host_offset: int) -> None:
        self._dirty.discard(host_offset)

    def dirty_tables(self) -> list[tuple[int, T]]:
        """Dirty tables in host-offset order (sequential write-back)."""
        return [(offset, self._tables[offset]) for offset in sorted(self._dirty)]

    async def write_dirty(self, encode: Callable[[T], bytes],
                          write: Callable[[int, bytes], Awaitable[None]]) -> int:
        """Write every dirty table (in host-offset order); how many there were.

        Each is marked clean before its write: a change made while the write
        is under way marks it dirty again, and it is written next time.
        """
        dirty = self.dirty_tables()
        for offset, table in dirty:
            self.mark_clean(offset)
            try:
                await write(offset, encode(table))
            except BaseException:
                self.mark_dirty(offset, table)
                raise
        return len(dirty)

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    def needs_writeback(self) -> bool:
        """Dirty tables keep the cache over capacity: write them back."""
        return len(self._tables) > self.capacity and bool(self._dirty)

    def forget(self, host_offset: int) -> None:
        """Drop a table whose cluster was freed (it must not be written back)."""
        self._tables.pop(host_offset, None)
        self._dirty.discard(host_offset)

    def _insert(self, host_offset: int, table: T) -> None:
        self._tables[host_offset] = table
        self._evict_over_capacity()

    def _evict_over_capacity(self) -> None:
        excess = len(self._tables) - self.capacity
        if excess <= 0:
            return
        # Never the most recent table: its user is about to use it.
        for offset in list(self._tables)[:-1]:
            if excess <= 0:
                break
            if offset in self._dirty or offset in self._pins:
                continue
            del self._tables[offset]
            self.evictions += 1
            excess -= 1

    def statistics(self) -> dict[str, int]:
        return {
            "capacity": self.capacity,
            "cached": len(self._tables),
            "dirty": len(self._dirty),
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }


class _Pinned(Generic[T]):
    """`TableCache.pinned`: a plain class, not an async generator (cheaper
    on the per-request path)."""

    __slots__ = ("_cache", "_offset")

    def __init__(self, cache: TableCache[T], host_offset: int) -> None:
        self._cache = cache
        self._offset = host_offset

    async def __aenter__(self) -> T:
        cache, offset = self._cache, self._offset
        table = await cache.get(offset)
        # Between the load and here nothing awaited, so `table` is the cached
        # object; pinning it now keeps it the only copy.
        cache._pins[offset] = cache._pins.get(offset, 0) + 1
        return table

    async def __aexit__(self, *exc: object) -> None:
        self._cache._unpin(self._offset)
