"""A raw image as a backing file: guest offset = host offset."""

from __future__ import annotations

from qfuse.engine.hostfile import CacheMode, HostFile
from qfuse.engine.locking import ImageLock


class RawImage:
    """Read-only raw file at the bottom of a backing chain."""

    format = "raw"

    def __init__(self, path: str, cache: CacheMode) -> None:
        self.path = path
        self.file = HostFile(path, writable=False, cache=cache)
        try:
            self._lock = ImageLock.acquire(self.file.fd, path, write=False)
        except BaseException:
            self.file.close()
            raise
        self.virtual_size = self.file.size()
        self.backing = None

    async def read(self, guest_offset: int, length: int) -> bytes:
        """Bytes at `guest_offset`; short only at the end of the file."""
        if guest_offset >= self.virtual_size:
            return b""
        return await self.file.pread(guest_offset, min(length, self.virtual_size - guest_offset))

    def close(self) -> None:
        self._lock.release()
        self.file.close()
