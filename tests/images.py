"""Image builders for the tests: qemu-img / qemu-io wrappers and qcow2 header surgery.

Every image a test uses is made by `qemu-img` (and written by `qemu-io`), so
the bytes on disk are QEMU's; damage is then applied with `struct.pack_into`
on the exact field the test is about.  Nothing here imports qfuse: these
helpers are the independent oracle.

qcow2 header layout (docs/interop/qcow2.txt, all big-endian)::

    0 magic  4 version  8 backing_file_offset  16 backing_file_size
    20 cluster_bits  24 size  32 crypt_method  36 l1_size  40 l1_table_offset
    48 refcount_table_offset  56 refcount_table_clusters  60 nb_snapshots
    64 snapshots_offset | v3: 72 incompatible_features  80 compatible_features
    88 autoclear_features  96 refcount_order  100 header_length
    104 compression_type

Header extensions start at header_length (72 for v2): u32 type, u32 length,
data padded to a multiple of 8; type 0 ends the list.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import select
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

KiB = 1024
MiB = 1024 * 1024

# name -> (byte offset in the header, struct format)
HEADER_FIELDS: dict[str, tuple[int, str]] = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}

QCOW2_MAGIC = 0x514649FB

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAME_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_FULL_DISK_ENCRYPTION = 0x0537BE77
EXT_EXTERNAL_DATA_FILE = 0x44415441

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1

# L1/L2 entry bits
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0


# --------------------------------------------------------------------------
# Running the qemu tools
# --------------------------------------------------------------------------


def run(
    cmd: list[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str] | None = None,
    check: bool = True,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output as text; on failure say what it printed."""
    argv = [os.fspath(a) for a in cmd]
    res = subprocess.run(
        argv,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "LC_ALL": "C"},
        stdin=subprocess.DEVNULL,
    )
    if check and res.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {res.returncode}\n"
            f"stdout: {res.stdout.strip()}\nstderr: {res.stderr.strip()}"
        )
    return res


def qemu_img(*args: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None) -> str:
    """`qemu-img ARGS...`; returns stdout, raises with its stderr on failure."""
    return run(["qemu-img", *args], cwd=cwd).stdout


def qemu_io(
    image: str | os.PathLike[str],
    *cmds: str,
    fmt: str = "qcow2",
    cwd: str | os.PathLike[str] | None = None,
) -> str:
    """`qemu-io -f FMT -c CMD ... IMAGE`; qemu-io exits non-zero when a command fails."""
    argv: list[str | os.PathLike[str]] = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    argv.append(image)
    out = run(argv, cwd=cwd).stdout
    # Belt and braces: older qemu-io printed failures and still exited 0.
    for line in out.splitlines():
        low = line.lower()
        if "failed" in low or "error" in low:
            raise AssertionError(f"qemu-io {cmds!r} on {image}: {line}")
    return out


def create(
    image: Path,
    size: int | str | None,
    *,
    options: str | None = None,
    backing: str | os.PathLike[str] | None = None,
    backing_fmt: str | None = None,
    fmt: str = "qcow2",
    cwd: str | os.PathLike[str] | None = None,
) -> Path:
    """`qemu-img create -f FMT [-o OPTIONS] [-b BACKING -F BACKING_FMT] IMAGE [SIZE]`.

    With ``cwd`` set, ``image`` and ``backing`` may be relative names: the
    backing name is then recorded exactly as given (a relative name, which
    qfuse must resolve against the image's directory, not its own cwd).
    """
    argv: list[str | os.PathLike[str]] = ["create", "-q", "-f", fmt]
    if options:
        argv += ["-o", options]
    if backing is not None:
        argv += ["-b", backing]
        if backing_fmt is not None:
            argv += ["-F", backing_fmt]
    argv.append(image)
    if size is not None:
        argv.append(str(size))
    qemu_img(*argv, cwd=cwd)
    return Path(cwd, image) if cwd is not None else Path(image)


def info(image: Path, *extra: str) -> dict:
    import json

    return json.loads(qemu_img("info", "-U", "--output", "json", *extra, image))


def sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------
# Header surgery
# --------------------------------------------------------------------------


def read_header(image: str | os.PathLike[str]) -> dict[str, int]:
    with open(image, "rb") as f:
        raw = f.read(112)
    out = {}
    for name, (off, fmt) in HEADER_FIELDS.items():
        if off + struct.calcsize(fmt) <= len(raw):
            out[name] = struct.unpack_from(fmt, raw, off)[0]
    return out


def patch_header(image: str | os.PathLike[str], **fields: int) -> None:
    """Overwrite header fields in place (big-endian, struct.pack_into)."""
    with open(image, "r+b") as f:
        buf = bytearray(f.read(112))
        for name, value in fields.items():
            off, fmt = HEADER_FIELDS[name]
            struct.pack_into(fmt, buf, off, value)
        f.seek(0)
        f.write(buf)


def read_u64(image: str | os.PathLike[str], host_offset: int) -> int:
    with open(image, "rb") as f:
        f.seek(host_offset)
        return struct.unpack(">Q", f.read(8))[0]


def write_u64(image: str | os.PathLike[str], host_offset: int, value: int) -> None:
    with open(image, "r+b") as f:
        f.seek(host_offset)
        f.write(struct.pack(">Q", value))


def write_bytes(image: str | os.PathLike[str], host_offset: int, data: bytes) -> None:
    with open(image, "r+b") as f:
        f.seek(host_offset)
        f.write(data)


@dataclass
class Extension:
    offset: int  # host offset of the extension's type field
    type: int
    length: int
    data: bytes


def extensions(image: str | os.PathLike[str]) -> list[Extension]:
    """The header extensions, in order, without the end marker."""
    h = read_header(image)
    start = h["header_length"] if h["version"] >= 3 else 72
    cluster = 1 << h["cluster_bits"]
    with open(image, "rb") as f:
        buf = f.read(cluster)
    out = []
    off = start
    while off + 8 <= len(buf):
        etype, elen = struct.unpack_from(">II", buf, off)
        if etype == EXT_END:
            break
        out.append(Extension(off, etype, elen, bytes(buf[off + 8 : off + 8 + elen])))
        off += 8 + (elen + 7) // 8 * 8
    return out


def find_extension(image: str | os.PathLike[str], etype: int) -> Extension:
    for ext in extensions(image):
        if ext.type == etype:
            return ext
    raise AssertionError(f"{image}: no header extension 0x{etype:08x}")


def rewrite_extensions(image: str | os.PathLike[str], exts: list[tuple[int, bytes]]) -> None:
    """Replace the header-extension area (only for images without a backing name)."""
    h = read_header(image)
    assert h["backing_file_offset"] == 0, "would overwrite the backing file name"
    start = h["header_length"] if h["version"] >= 3 else 72
    area = bytearray()
    for etype, data in exts:
        area += struct.pack(">II", etype, len(data)) + data
        area += b"\0" * (-len(data) % 8)
    area += struct.pack(">II", EXT_END, 0)
    assert start + len(area) <= (1 << h["cluster_bits"])
    write_bytes(image, start, bytes(area))


def add_feature_name(image: str | os.PathLike[str], kind: int, bit: int, name: str) -> None:
    """Append a feature name table entry (kind 0 incompatible, 1 compatible, 2 autoclear)."""
    entry = struct.pack(">BB46s", kind, bit, name.encode())
    exts = [(e.type, e.data) for e in extensions(image)]
    for i, (etype, data) in enumerate(exts):
        if etype == EXT_FEATURE_NAME_TABLE:
            exts[i] = (etype, data + entry)
            break
    else:
        exts.append((EXT_FEATURE_NAME_TABLE, entry))
    rewrite_extensions(image, exts)


def set_backing_name(image: str | os.PathLike[str], name: bytes) -> None:
    """Record ``name`` as the backing file name, at the existing offset if there is one."""
    h = read_header(image)
    off = h["backing_file_offset"]
    if off == 0:
        exts = extensions(image)
        start = h["header_length"] if h["version"] >= 3 else 72
        end = (exts[-1].offset + 8 + (exts[-1].length + 7) // 8 * 8) if exts else start
        off = end + 8  # past the end marker
    assert off + len(name) <= (1 << h["cluster_bits"])
    write_bytes(image, off, name)
    patch_header(image, backing_file_offset=off, backing_file_size=len(name))


# --------------------------------------------------------------------------
# L1 / L2 tables
# --------------------------------------------------------------------------


def _has_extended_l2(h: dict[str, int]) -> bool:
    return h["version"] >= 3 and bool(h["incompatible_features"] & (1 << 4))


def l2_entry_offset(image: str | os.PathLike[str], guest_offset: int) -> int | None:
    """Host offset of the L2 entry mapping ``guest_offset`` (None if no L2 table)."""
    h = read_header(image)
    cb = h["cluster_bits"]
    entry_size = 16 if _has_extended_l2(h) else 8
    l2_entries = (1 << cb) // entry_size
    cluster_index = guest_offset >> cb
    l1_index, l2_index = divmod(cluster_index, l2_entries)
    if l1_index >= h["l1_size"]:
        return None
    l1e = read_u64(image, h["l1_table_offset"] + 8 * l1_index)
    l2_table = l1e & L1E_OFFSET_MASK
    if l2_table == 0:
        return None
    return l2_table + l2_index * entry_size


def l2_entries(image: str | os.PathLike[str]) -> Iterator[tuple[int, int, int | None]]:
    """Yield (guest_offset, entry, subcluster_bitmap_or_None) for every mapped L2 entry."""
    h = read_header(image)
    cb = h["cluster_bits"]
    ext = _has_extended_l2(h)
    entry_size = 16 if ext else 8
    per_table = (1 << cb) // entry_size
    with open(image, "rb") as f:
        for l1_index in range(h["l1_size"]):
            f.seek(h["l1_table_offset"] + 8 * l1_index)
            l2_table = struct.unpack(">Q", f.read(8))[0] & L1E_OFFSET_MASK
            if not l2_table:
                continue
            f.seek(l2_table)
            table = f.read(1 << cb)
            for i in range(per_table):
                guest = ((l1_index * per_table) + i) << cb
                if guest >= h["size"]:
                    return
                entry = struct.unpack_from(">Q", table, i * entry_size)[0]
                bitmap = struct.unpack_from(">Q", table, i * entry_size + 8)[0] if ext else None
                if entry or bitmap:
                    yield guest, entry, bitmap


def compressed_extent(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, upper bound of the byte count) of a compressed cluster descriptor."""
    x = 62 - (cluster_bits - 8)
    host = entry & ((1 << x) - 1)
    extra_sectors = (entry >> x) & ((1 << (cluster_bits - 8)) - 1)
    return host, 512 - (host & 511) + extra_sectors * 512


@contextlib.contextmanager
def qemu_io_holding(image: Path, *flags: str) -> Iterator[subprocess.Popen[bytes]]:
    """An interactive `qemu-io [FLAGS] IMAGE`, returned once its prompt shows
    (the image is open and locked by then)."""
    proc = subprocess.Popen(
        ["qemu-io", *flags, "-f", "qcow2", os.fspath(image)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdin is not None
        seen = b""
        deadline = time.monotonic() + 10
        while b"qemu-io>" not in seen:
            assert time.monotonic() < deadline, f"no qemu-io prompt: {seen!r}"
            ready, _, _ = select.select([proc.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, f"qemu-io exited: {seen!r}"
                seen += chunk
        yield proc
    finally:
        with contextlib.suppress(BrokenPipeError, ValueError):
            proc.stdin.write(b"quit\n")  # type: ignore[union-attr]
            proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        if proc.stdout:
            proc.stdout.close()
