#!/usr/bin/env python3
"""The benchmark's floor: the cheapest pyfuse3 + trio view of a raw file.

    passthrough.py RAW_FILE MOUNTPOINT [--writable]

MOUNTPOINT is a regular file (created empty if missing); while mounted, that
path shows RAW_FILE's bytes, like qfuse's view of a qcow2 image. Each FUSE
read is one ``os.pread`` on RAW_FILE (each write one ``os.pwrite``), files are
opened with ``direct_io`` so the kernel passes request sizes straight through,
and nothing else happens per request. Whatever a Python FUSE daemon costs
before doing any qcow2 work, this pays too: it is the floor qfuse is compared
with. Runs in the foreground; SIGTERM or SIGINT, or ``fusermount3 -u
MOUNTPOINT``, unmounts and exits.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio


class Passthrough(pyfuse3.Operations):
    """A single regular file (the root inode) backed by one raw file descriptor."""

    def __init__(self, raw_path: str, writable: bool) -> None:
        super().__init__()
        self.writable = writable
        self.fd = os.open(raw_path, os.O_RDWR if writable else os.O_RDONLY)

    def _attrs(self) -> pyfuse3.EntryAttributes:
        st = os.fstat(self.fd)
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = pyfuse3.ROOT_INODE
        attrs.st_mode = stat.S_IFREG | (0o644 if self.writable else 0o444)
        attrs.st_nlink = 1
        attrs.st_uid = os.getuid()
        attrs.st_gid = os.getgid()
        attrs.st_size = st.st_size
        attrs.st_blocks = st.st_blocks
        attrs.st_blksize = 4096
        attrs.st_atime_ns = st.st_atime_ns
        attrs.st_mtime_ns = st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        attrs.attr_timeout = 1.0
        attrs.entry_timeout = 1.0
        return attrs

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs()

    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not self.writable and (flags & os.O_ACCMODE) != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=self.fd, direct_io=True)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        return os.pwrite(fh, buf, off)

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(f"/proc/self/fd/{self.fd}")
        out = pyfuse3.StatvfsData()
        for name in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(out, name, getattr(st, name))
        return out


async def _serve() -> None:
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw_file")
    parser.add_argument("mountpoint")
    parser.add_argument("--writable", action="store_true", help="accept writes (default: EROFS)")
    args = parser.parse_args()

    if not os.path.exists(args.mountpoint):
        open(args.mountpoint, "x").close()
    if not os.path.isfile(args.mountpoint):
        print(f"passthrough: {args.mountpoint}: not a regular file", file=sys.stderr)
        return 1

    ops = Passthrough(args.raw_file, args.writable)
    options = set(pyfuse3.default_options)
    options.add("fsname=qfuse-floor")
    options.add("subtype=qfuse-floor")
    if not args.writable:
        options.add("ro")
    pyfuse3.init(ops, args.mountpoint, options)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
        os.close(ops.fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
