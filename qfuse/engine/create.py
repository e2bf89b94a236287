"""Creating a new qcow2 image (`qfuse create`), laid out as `qemu-img create` does.

Layout, in host clusters: the header (0), the refcount table (1), the
refcount blocks, the L1 table; then, with preallocation, the L2 tables and
the data clusters:

* ``metadata``: each L2 table followed by the data clusters it maps, the
  file extended over them but left sparse; the end of the last, partial
  cluster is written with zeros, as QEMU's copy-on-write does.
* ``falloc`` / ``full``: every L2 table, then all data clusters in one run,
  which `posix_fallocate` reserves or zeros fill.

When one refcount block covers the whole file (2 GiB of file with 64 KiB
clusters and 16-bit refcounts) this is byte for byte what QEMU writes;
beyond that QEMU scatters further refcount blocks, qfuse keeps them at the
front.  With falloc/full, QEMU moves its refcount table and puts the first
L2 table in its place; qfuse keeps the order above (the data lands at the
same offset when there is one L2 table).

With extended L2 entries a preallocated cluster has no subcluster marked
allocated (so it reads through to the backing file), as QEMU leaves it.

The file is taken over the way QEMU does it: an existing file is truncated
and rewritten in place (never while another process holds it: QEMU's image
locks are taken first), and a failure part-way removes it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from array import array

from qfuse.engine.builder import ImageBuilder, pwrite_all
from qfuse.engine.chain import open_image
from qfuse.engine.locking import ImageLock
from qfuse.engine.qcow2 import resolve_relative
from qfuse.errors import FormatError, ImageError, UsageError
from qfuse.format import layout
from qfuse.format.entries import OFLAG_COPIED, SUBCLUSTERS_PER_CLUSTER

log = logging.getLogger(__name__)

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
BACKING_FORMATS = ("qcow2", "raw")
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ZERO_CHUNK = 4 * 1024 * 1024


def backing_size(image_path: str, backing_file: str, backing_format: str) -> int:
    """Open the backing file as qemu-img does before creating: its virtual size.

    The name is resolved against the new image's directory, as it will be
    when the image is opened.  qcow2 backing files are opened with their
    whole chain, so a broken chain is refused now rather than at mount.
    """
    if backing_format not in BACKING_FORMATS:
        raise UsageError(image_path, f"backing format {backing_format!r} is not supported "
                         f"(use {' or '.join(BACKING_FORMATS)})")
    if backing_file.startswith("json:") or _PROTOCOL.match(backing_file):
        raise UsageError(image_path, f"backing file {backing_file!r}: json: and protocol "
                         "names are not supported")
    path = resolve_relative(image_path, backing_file)
    if os.path.abspath(path) == os.path.abspath(image_path) or _same_file(path, image_path):
        raise UsageError(image_path, "the backing file is the image itself")
    try:
        if backing_format == "qcow2":
            image = open_image(path, read_only=True)
            try:
                return image.virtual_size
            finally:
                image.close()
        return _raw_size(path)
    except ImageError as exc:
        raise ImageError(image_path, f"backing file {exc}") from None


def _raw_size(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(path, exc.strerror or str(exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise ImageError(path, "not a regular file or block device")
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    return -(-size // 512) * 512  # QEMU counts whole sectors


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def create_image(path: str, spec: layout.ImageSpec, preallocation: str = "off") -> None:
    """Write a new image at `path` (replacing a file that is there)."""
    if preallocation not in PREALLOCATION_MODES:
        raise UsageError(path, f"preallocation {preallocation!r} is unknown")
    try:
        layout.check_spec(spec)
    except FormatError as exc:
        raise ImageError(path, str(exc)) from None
    existed = os.path.lexists(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise ImageError(path, exc.strerror or str(exc)) from None
    written = False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageError(path, "not a regular file")
        with ImageLock.acquire(fd, path, write=True):
            written = True
            os.ftruncate(fd, 0)
            write_new_image(fd, spec, preallocation)
            os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        if written or not existed:
            _remove(path)
        if isinstance(exc, OSError):
            raise ImageError(path, exc.strerror or str(exc)) from None
        raise
    os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        log.warning("%s: cannot remove the half-written image: %s", path, exc.strerror)


def write_new_image(fd: int, spec: layout.ImageSpec, preallocation: str) -> None:
    """Lay out and write the image into the empty file `fd`."""
    cs = spec.cluster_size
    l1_clusters = -(-8 * spec.l1_size // cs)
    data_clusters = spec.guest_clusters if preallocation != "off" else 0
    l2_clusters = spec.l1_size if preallocation != "off" else 0
    builder = ImageBuilder(fd, spec, expected_clusters=1 + l1_clusters + l2_clusters
                           + data_clusters)
    if preallocation == "off" or not data_clusters:
        builder.finish()
        return
    if preallocation == "metadata":
        file_end = _preallocate_interleaved(builder, spec)
    else:
        data_at = _preallocate_contiguous(builder, spec)
        length = data_clusters * cs
        if preallocation == "falloc":
            _fallocate(fd, data_at, length)
        else:
            _write_zeros(fd, data_at, length)
        file_end = data_at + length
    builder.finish(file_end)


def _new_l2(spec: layout.ImageSpec) -> array:
    return array("Q", bytes(spec.cluster_size))


def _map_run(spec: layout.ImageSpec, table: array, first: int, count: int,
             host_offset: int) -> None:
    """Point `count` entries from index `first` at clusters from `host_offset`.

    Extended entries get an empty bitmap: allocated, but every subcluster
    still reads from the backing file (or as zeros), as QEMU leaves them.
    """
    step = 2 if spec.extended_l2 else 1
    cs = spec.cluster_size
    for i in range(count):
        table[(first + i) * step] = (host_offset + i * cs) | OFLAG_COPIED


def _preallocate_interleaved(builder: ImageBuilder, spec: layout.ImageSpec) -> int:
    """Each L2 table, then its data clusters; returns where the file ends."""
    cs = spec.cluster_size
    remaining = spec.guest_clusters
    last_cluster_at = 0
    for l1_index in range(spec.l1_size):
        count = min(spec.l2_entries, remaining)
        l2_at = builder.allocate_clusters(1)
        data_at = builder.allocate_clusters(count)
        table = _new_l2(spec)
        _map_run(spec, table, 0, count, data_at)
        builder.write_l2(l1_index, l2_at, table)
        remaining -= count
        last_cluster_at = data_at + (count - 1) * cs
    # The last cluster: QEMU's copy-on-write fills the rest of it (of its
    # last subcluster with extended L2) with zeros, and the file ends there.
    tail = spec.virtual_size - (spec.guest_clusters - 1) * cs
    granule = cs // SUBCLUSTERS_PER_CLUSTER if spec.extended_l2 else cs
    tail_end = -(-tail // granule) * granule
    if tail < tail_end:
        pwrite_all(builder.fd, last_cluster_at + tail, bytes(tail_end - tail))
    return last_cluster_at + tail_end


def _preallocate_contiguous(builder: ImageBuilder, spec: layout.ImageSpec) -> int:
    """Every L2 table, then all data clusters in one run; returns its start."""
    l2_offsets = [builder.allocate_clusters(1) for _ in range(spec.l1_size)]
    data_at = builder.allocate_clusters(spec.guest_clusters)
    remaining = spec.guest_clusters
    host = data_at
    for l1_index, l2_at in enumerate(l2_offsets):
        count = min(spec.l2_entries, remaining)
        table = _new_l2(spec)
        _map_run(spec, table, 0, count, host)
        builder.write_l2(l1_index, l2_at, table)
        remaining -= count
        host += count * spec.cluster_size
    return data_at


def _fallocate(fd: int, offset: int, length: int) -> None:
    if not length:
        return
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        _write_zeros(fd, offset, length)  # what glibc's emulation would do


def _write_zeros(fd: int, offset: int, length: int) -> None:
    zeros = bytes(min(length, _ZERO_CHUNK))
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        pwrite_all(fd, offset, memoryview(zeros)[:n])
        offset += n
