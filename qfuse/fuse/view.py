"""The FUSE front: pyfuse3 requests in, engine calls out, errnos back.

This layer only translates.  It owns no cache and no qcow2 knowledge: each
read or write is one engine call, and every failure becomes one errno here,
because a pyfuse3 handler that raises anything but FUSEError kills the
daemon and leaves a dead mount behind.

Two shapes, chosen by the mountpoint:

* file form: the mountpoint is a regular file and the root inode *is* the
  raw view of one image (active layer or one snapshot);
* directory form: the root is a directory holding ``NAME.raw`` (the active
  layer) and ``NAME@SNAP.raw`` per internal snapshot (read-only).

The view's owner, permission bits and timestamps are the image file's, with
the write bits removed when the view is read-only, so the view is never
more open than the image; ``default_permissions`` makes the kernel enforce
them.  Every image view is opened with ``direct_io`` (see
docs/concurrency.md, "The FUSE layer", for why).

Each image view carries the extended attribute ``user.qfuse.stats``: its
statistics as one JSON object (`ImageFile.statistics`), which
``qfuse stats`` reads.  The handlers count the requests they serve with
plain integer increments (no lock, no log: code between two awaits is
atomic), and reading the attribute counts nothing, so two reads with no
I/O between them give the same answer.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import stat
from collections.abc import Sequence
from typing import Any, Protocol

import pyfuse3
from pyfuse3 import FUSEError

from qfuse.errors import MetadataCorruption

log = logging.getLogger(__name__)

# How long the kernel may trust our attributes and names.  The size never
# changes; st_blocks and the timestamps follow writes, and a second of lag in
# `du` or `ls -l` is fine.
ATTR_TIMEOUT = 1.0
ENTRY_TIMEOUT = 1.0

# At most this many distinct errors are logged; after that a flood of bad
# clusters would only fill the log.
MAX_REPORTED_ERRORS = 1000

# The extended attribute holding an image view's statistics (JSON).
STATS_XATTR = b"user.qfuse.stats"


class Snapshot(Protocol):
    name: str


class Image(Protocol):
    """What the view needs of a `qfuse.engine` image."""

    path: str
    virtual_size: int
    cluster_size: int
    read_only: bool
    snapshot: Snapshot | None  # the internal snapshot shown, None for the active layer

    def allocated_bytes(self) -> int: ...
    def statistics(self) -> dict[str, Any]: ...
    async def read(self, guest_offset: int, length: int) -> bytes: ...
    async def write(self, guest_offset: int, data: bytes) -> int: ...
    async def flush(self) -> None: ...


@dataclasses.dataclass(eq=False, slots=True)
class RequestCounts:
    """Requests served for one file, by kind, and the bytes they moved."""

    open: int = 0
    read: int = 0
    write: int = 0
    flush: int = 0  # FUSE FLUSH: each close(2) of a descriptor
    fsync: int = 0
    errors: int = 0  # of the above, answered with an errno
    bytes_read: int = 0
    bytes_written: int = 0


@dataclasses.dataclass(eq=False)
class ImageFile:
    """A raw view of one image: guest offset N of the file is guest offset N."""

    inode: int
    name: bytes
    image: Image
    read_only: bool
    size: int
    requests: RequestCounts = dataclasses.field(default_factory=RequestCounts)

    async def read(self, guest_offset: int, length: int) -> bytes:
        size = self.size
        if guest_offset >= size:
            return b""
        if guest_offset + length > size:
            length = size - guest_offset
        return await self.image.read(guest_offset, length)

    async def write(self, guest_offset: int, data: bytes) -> int:
        if self.read_only:
            raise FUSEError(errno.EROFS)
        if not data:
            return 0
        size = self.size
        # Like a block device: a write that starts at or past the end gets
        # ENOSPC, one that runs over it is cut short.
        if guest_offset >= size:
            raise FUSEError(errno.ENOSPC)
        if guest_offset + len(data) > size:
            data = data[: size - guest_offset]
        return await self.image.write(guest_offset, data)

    def allocated(self) -> int:
        return self.image.allocated_bytes()

    def statistics(self) -> dict[str, Any]:
        """What ``user.qfuse.stats`` holds.  The keys are a stable interface
        (docs/hypervisors.md lists them): add new ones, never rename."""
        image = self.image
        engine = image.statistics()
        counts = self.requests
        return {
            "image": image.path,
            "snapshot": image.snapshot.name if image.snapshot is not None else None,
            "virtual_size": self.size,
            "cluster_size": image.cluster_size,
            "allocated_bytes": image.allocated_bytes(),
            "read_only": self.read_only or image.read_only,
            "cache_mode": engine["cache_mode"],
            "requests": {
                "open": counts.open,
                "read": counts.read,
                "write": counts.write,
                "flush": counts.flush,
                "fsync": counts.fsync,
                "errors": counts.errors,
            },
            "bytes_read": counts.bytes_read,
            "bytes_written": counts.bytes_written,
            # Flushes that reached the image: fsync, and close after a write.
            "flushes": engine.get("flushes", 0),
            "l2_cache": engine["l2_cache"],
            # A read-only image has no refcount cache: all zeros then.
            "refcount_cache": engine.get("refcount_cache", _NO_CACHE),
            "pending_frees": engine.get("pending_frees", 0),
        }


_NO_CACHE = {"capacity": 0, "cached": 0, "dirty": 0, "hits": 0, "misses": 0, "evictions": 0}


@dataclasses.dataclass(eq=False)
class TextFile:
    """A small read-only file held in memory (a VMDK descriptor)."""

    inode: int
    name: bytes
    data: bytes
    read_only: bool = True
    requests: RequestCounts = dataclasses.field(default_factory=RequestCounts)

    @property
    def size(self) -> int:
        return len(self.data)

    async def read(self, guest_offset: int, length: int) -> bytes:
        return self.data[guest_offset : guest_offset + length]

    async def write(self, guest_offset: int, data: bytes) -> int:
        raise FUSEError(errno.EROFS)

    def allocated(self) -> int:
        return len(self.data)


Node = ImageFile | TextFile


@dataclasses.dataclass(eq=False)
class _Handle:
    node: Node
    writable: bool
    wrote: bool = False


class View(pyfuse3.Operations):
    """The request handlers.  They raise only FUSEError."""

    # No NFS export: the kernel must not look up "." and "..".
    supports_dot_lookup = False
    # The kernel keeps the root inode's size (0 at mount) under writeback
    # caching, so a file mountpoint would show size 0 (PERF-NOTES).
    enable_writeback_cache = False

    def __init__(self, image_path: str, nodes: Sequence[Node], *, directory: bool) -> None:
        super().__init__()
        if not directory and (len(nodes) != 1 or nodes[0].inode != pyfuse3.ROOT_INODE):
            raise ValueError("the file form has exactly one node, the root")
        self._image_path = image_path
        self._directory = directory
        self._nodes: dict[int, Node] = {node.inode: node for node in nodes}
        self._by_name: dict[bytes, Node] = {node.name: node for node in nodes}
        self._entries: list[Node] = sorted(nodes, key=lambda node: node.name)
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._image_stat = os.stat(image_path)
        self._reported: set[str] = set()

    # -- attributes --------------------------------------------------------

    def _refresh_image_stat(self) -> os.stat_result:
        # The image file's owner, mode and times are the view's; if it was
        # renamed away meanwhile, keep the last ones seen.
        try:
            self._image_stat = os.stat(self._image_path)
        except OSError:
            pass
        return self._image_stat

    def _attributes(self, node: Node | None, image_stat: os.stat_result) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        perms = stat.S_IMODE(image_stat.st_mode) & 0o777
        if node is None:  # the directory form's root
            # A directory is searchable wherever the image is readable; it is
            # never writable (no files can be created in it).
            perms &= 0o555
            perms |= (perms & 0o444) >> 2
            attr.st_ino = pyfuse3.ROOT_INODE
            attr.st_mode = stat.S_IFDIR | perms
            attr.st_nlink = 2
            attr.st_size = 0
            attr.st_blocks = 0
            attr.st_blksize = 4096
        else:
            if node.read_only:
                perms &= ~0o222
            attr.st_ino = node.inode
            attr.st_mode = stat.S_IFREG | perms
            attr.st_nlink = 1
            attr.st_size = node.size
            attr.st_blocks = math.ceil(node.allocated() / 512)
            attr.st_blksize = node.image.cluster_size if isinstance(node, ImageFile) else 4096
        attr.st_uid = image_stat.st_uid
        attr.st_gid = image_stat.st_gid
        attr.st_atime_ns = image_stat.st_atime_ns
        attr.st_mtime_ns = image_stat.st_mtime_ns
        attr.st_ctime_ns = image_stat.st_ctime_ns
        attr.attr_timeout = ATTR_TIMEOUT
        attr.entry_timeout = ENTRY_TIMEOUT
        return attr

    def _node(self, inode: int) -> Node | None:
        """The node of `inode`; None for the directory form's root."""
        if self._directory and inode == pyfuse3.ROOT_INODE:
            return None
        try:
            return self._nodes[inode]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None

    def _file_node(self, inode: int) -> Node:
        node = self._node(inode)
        if node is None:
            raise FUSEError(errno.EISDIR)
        return node

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        try:
            return self._attributes(node, self._refresh_image_stat())
        except Exception as err:
            raise self._fail(err) from None

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if not self._directory:
            raise FUSEError(errno.ENOTDIR)
        if parent_inode != pyfuse3.ROOT_INODE:
            raise FUSEError(errno.ENOTDIR)
        node = self._by_name.get(name)
        if node is None:
            raise FUSEError(errno.ENOENT)
        return await self.getattr(node.inode, ctx)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        current = await self.getattr(inode, ctx)
        if fields.update_size:
            if node is None:
                raise FUSEError(errno.EISDIR)
            if attr.st_size != node.size:
                # The view is as big as the virtual disk; resizing the image
                # is not something a truncate() should do by accident.
                raise FUSEError(errno.EROFS if node.read_only else errno.EPERM)
        # Owner and mode mirror the image file: change those there.  Setting
        # them to what they already are is allowed (cp -p, rsync do it).
        if fields.update_mode and stat.S_IMODE(attr.st_mode) != stat.S_IMODE(current.st_mode):
            raise FUSEError(errno.EPERM)
        if fields.update_uid and attr.st_uid != current.st_uid:
            raise FUSEError(errno.EPERM)
        if fields.update_gid and attr.st_gid != current.st_gid:
            raise FUSEError(errno.EPERM)
        # Timestamps are the image file's: a touch on the view is ignored.
        return current

    # -- files -------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._file_node(inode)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if (writable or flags & os.O_TRUNC) and node.read_only:
            raise FUSEError(errno.EROFS)
        if flags & os.O_TRUNC and node.size != 0:
            raise FUSEError(errno.EPERM)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(node, writable)
        node.requests.open += 1
        # direct_io: each read()/write() reaches us with the caller's size
        # (up to 1 MiB) instead of 128 KiB page-cache chunks, and a write's
        # errors reach the writer.  A memory-held text file may be cached.
        is_image = isinstance(node, ImageFile)
        return pyfuse3.FileInfo(fh=fh, direct_io=is_image, keep_cache=not is_image)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            node = self._handles[fh].node
            node.requests.read += 1
            data = await node.read(off, size)
        except Exception as err:
            raise self._request_failed(fh, err) from None
        node.requests.bytes_read += len(data)
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            handle = self._handles[fh]
            handle.node.requests.write += 1
            written = await handle.node.write(off, buf)
        except Exception as err:
            raise self._request_failed(fh, err) from None
        handle.wrote = True
        handle.node.requests.bytes_written += written
        return written

    async def flush(self, fh: int) -> None:
        # close(2): make what this descriptor wrote durable, so a finished
        # `dd`/`cp` survives a crash of the daemon.  Readers cost nothing.
        handle = self._handles.get(fh)
        if handle is None:
            return
        handle.node.requests.flush += 1
        if not handle.wrote:
            return
        handle.wrote = False
        await self._flush_node(handle.node)

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handles.get(fh)
        if handle is None:
            return
        handle.node.requests.fsync += 1
        if handle.writable:
            handle.wrote = False
            await self._flush_node(handle.node)

    async def _flush_node(self, node: Node) -> None:
        if isinstance(node, ImageFile) and not node.read_only:
            try:
                await node.image.flush()
            except Exception as err:
                node.requests.errors += 1
                raise self._fail(err) from None

    async def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    # -- the directory form ------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if self._node(inode) is not None:
            raise FUSEError(errno.ENOTDIR)
        return 0

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        try:
            await self._readdir(start_id, token)
        except Exception as err:
            raise self._fail(err) from None

    async def _readdir(self, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        image_stat = self._refresh_image_stat()
        # start_id is the index of the next entry to send; each entry's
        # "next id" is its index + 1, which stays valid because the list
        # never changes while mounted.
        for index in range(start_id, len(self._entries)):
            node = self._entries[index]
            if not pyfuse3.readdir_reply(
                token, node.name, self._attributes(node, image_stat), index + 1
            ):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    # -- the rest ----------------------------------------------------------

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        images = [node for node in self._nodes.values() if isinstance(node, ImageFile)]
        try:
            used = sum(node.allocated() for node in images)
        except Exception as err:
            raise self._fail(err) from None
        total = sum(node.size for node in images)
        data = pyfuse3.StatvfsData()
        data.f_bsize = images[0].image.cluster_size if images else 4096
        data.f_frsize = 512
        data.f_blocks = math.ceil(total / 512)
        data.f_bfree = max(0, data.f_blocks - math.ceil(used / 512))
        data.f_bavail = data.f_bfree
        data.f_files = len(self._nodes) + (1 if self._directory else 0)
        data.f_ffree = 0
        data.f_favail = 0
        data.f_namemax = 255
        return data

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if name != STATS_XATTR or not isinstance(node, ImageFile):
            raise FUSEError(pyfuse3.ENOATTR)
        try:
            return json.dumps(node.statistics()).encode()
        except Exception as err:
            raise self._fail(err) from None

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self._node(inode)
        return [STATS_XATTR] if isinstance(node, ImageFile) else []

    # -- errors ------------------------------------------------------------

    def _request_failed(self, fh: int, err: Exception) -> FUSEError:
        """`_fail` for a request on an open file, counted as that file's error."""
        handle = self._handles.get(fh)
        if handle is not None:
            handle.node.requests.errors += 1
        return self._fail(err)

    def _fail(self, err: Exception) -> FUSEError:
        """The errno for `err`; logs each distinct unexpected error once."""
        if isinstance(err, FUSEError):
            return err
        if isinstance(err, MetadataCorruption):
            self._report_once(str(err), None)
            return FUSEError(errno.EIO)
        if isinstance(err, OSError) and err.errno:
            return FUSEError(err.errno)
        # A bug below us: keep serving, but say so once with the traceback.
        self._report_once(f"internal error: {type(err).__name__}: {err}", err)
        return FUSEError(errno.EIO)

    def _report_once(self, message: str, err: Exception | None) -> None:
        if message in self._reported or len(self._reported) >= MAX_REPORTED_ERRORS:
            return
        self._reported.add(message)
        log.error("%s", message, exc_info=err)
        if len(self._reported) == MAX_REPORTED_ERRORS:
            log.error("%s: too many distinct errors, no longer reporting them", self._image_path)


def debug_repr(value: Any) -> str:
    """A short form of a handler argument or result for the debug log."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>" if len(value) > 64 else repr(bytes(value))
    if isinstance(value, pyfuse3.EntryAttributes):
        return f"attr(ino={value.st_ino}, mode={value.st_mode:o}, size={value.st_size})"
    if isinstance(value, pyfuse3.FileInfo):
        return f"fileinfo(fh={value.fh}, direct_io={value.direct_io})"
    if isinstance(value, pyfuse3.RequestContext):
        return f"ctx(pid={value.pid}, uid={value.uid})"
    return repr(value)
