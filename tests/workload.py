"""Deterministic write workloads for the write-path tests, and their oracles.

A workload is a list of `Write` and `Fsync` operations drawn from a seeded
generator (`iter_ops`): sizes from 512 B to 1 MiB, unaligned offsets,
overwrites of earlier ranges, all-zero writes, writes straddling cluster
edges and (for extended-L2 images) subcluster-sized writes.  The data of a
write is derived from its own seed, so any process can regenerate the
same operations: the crash tests' writer (this file run as a script) logs
only operation numbers, and the test rebuilds what the image must hold.

The oracle is QEMU's: the same workload applied with `os.pwrite` to a raw
copy of the starting image made by `qemu-img convert -O raw`, then
`qemu-img compare` and `qemu-img check`.  Nothing here imports qfuse.

Run as a script, this is the crash tests' writer::

    python workload.py VIEW LOG SEED START END

It opens VIEW read-write and applies ``iter_ops(SEED, START, END, ...)``
until a write fails (the daemon was killed), appending to LOG, unbuffered,
``W n`` after write number n returned and ``F n`` after the fsync that
follows write n returned, and ``E errno`` when it stops on an error.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
SECTOR = 512


@dataclass(frozen=True)
class Write:
    offset: int  # guest offset
    length: int
    seed: int
    zero: bool = False

    def data(self) -> bytes:
        if self.zero:
            return bytes(self.length)
        return random.Random(self.seed).randbytes(self.length)

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class Fsync:
    pass


Op = Write | Fsync


def _size(rng: random.Random, max_len: int) -> int:
    """512 B to max_len, log-uniform: mostly up to 64 KiB, a fifth up to
    max_len; half of them not a multiple of 512."""
    top = max_len if rng.random() < 0.2 else min(max_len, 64 * KiB)
    exp = rng.uniform(9, top.bit_length() - 1)
    n = max(SECTOR, min(top, int(2**exp)))
    if rng.random() < 0.5 and n > SECTOR:
        n = max(SECTOR, n - rng.randrange(1, SECTOR))
    return n


def iter_ops(
    seed: int,
    start: int,
    end: int,
    *,
    cluster_size: int = 64 * KiB,
    subcluster_size: int | None = None,
    max_len: int = MiB,
    fsync_every: int = 12,
) -> Iterator[Op]:
    """An endless seeded stream of writes within guest [start, end), with an
    `Fsync` after roughly every ``fsync_every`` writes."""
    rng = random.Random(seed)
    max_len = min(max_len, end - start)
    done: list[Write] = []
    n = 0
    while True:
        kind = rng.random()
        zero = False
        if kind < 0.35:  # anywhere, unaligned; mostly small, some up to max_len
            length = _size(rng, max_len)
            offset = rng.randrange(start, end - length + 1)
        elif kind < 0.50:  # across a cluster edge
            length = _size(rng, min(max_len, 4 * cluster_size))
            first = (start + cluster_size - 1) // cluster_size
            last = (end - 1) // cluster_size
            edge = rng.randrange(first, last + 1) * cluster_size if last >= first else start
            offset = edge - rng.randrange(1, length) if length > 1 else edge - 1
            offset = min(max(offset, start), end - length)
        elif kind < 0.65 and done:  # overwrite (part of, or around) an earlier write
            prev = rng.choice(done)
            length = _size(rng, max_len)
            offset = prev.offset + rng.randrange(-length // 2, prev.length + 1)
            offset = min(max(offset, start), end - length)
        elif kind < 0.75:  # zeros, sector-aligned or not
            length = _size(rng, max_len)
            offset = rng.randrange(start, end - length + 1)
            zero = True
        elif kind < 0.85 and subcluster_size:  # one or a few whole subclusters
            length = subcluster_size * rng.choice((1, 1, 2, 3))
            slots = (end - start - length) // subcluster_size
            offset = start + rng.randrange(slots + 1) * subcluster_size
        else:  # sector-aligned, sector-sized
            length = SECTOR * rng.randrange(1, min(max_len, 128 * KiB) // SECTOR + 1)
            offset = start + SECTOR * rng.randrange((end - start - length) // SECTOR + 1)
        w = Write(offset, length, seed * 1_000_003 + n, zero)
        n += 1
        done.append(w)
        yield w
        if rng.randrange(fsync_every) == 0:
            yield Fsync()


def make_workload(seed: int, start: int, end: int, volume: int, **kwargs: int | None) -> list[Op]:
    """The first writes of ``iter_ops`` totalling at least ``volume`` bytes, and a
    final `Fsync`.  Always includes at least one write of every length class."""
    ops: list[Op] = []
    total = 0
    # The extremes first: a maximal unaligned write, a lone sector, zeros over
    # a cluster edge, a write that ends exactly at the end of the region.
    rng = random.Random(seed)
    cluster = int(kwargs.get("cluster_size") or 64 * KiB)
    big = min(int(kwargs.get("max_len") or MiB), end - start - SECTOR)
    edge = start + max(cluster, ((end - start) // 2) // cluster * cluster)
    for w in (
        Write(start + rng.randrange(1, SECTOR), big, seed * 7919 + 1),
        Write(start + SECTOR * rng.randrange((end - start) // SECTOR), SECTOR, seed * 7919 + 2),
        Write(min(edge, end - 3 * SECTOR) - SECTOR - 17, 2 * SECTOR + 34, 0, zero=True),
        Write(end - 3001, 3001, seed * 7919 + 3),  # up to the end of the region
    ):
        ops.append(w)
        total += w.length
    for op in iter_ops(seed, start, end, **kwargs):  # type: ignore[arg-type]
        ops.append(op)
        if isinstance(op, Write):
            total += op.length
            if total >= volume:
                break
    ops.append(Fsync())
    return ops


def writes(ops: list[Op]) -> list[Write]:
    return [op for op in ops if isinstance(op, Write)]


def apply(fd: int, ops: list[Op], *, fsync: bool = True) -> None:
    """Apply the operations to an open descriptor; every write must be whole."""
    for op in ops:
        if isinstance(op, Write):
            n = os.pwrite(fd, op.data(), op.offset)
            assert n == op.length, f"pwrite({op.length} at {op.offset}) returned {n}"
        elif fsync:
            os.fsync(fd)


def apply_to_path(path: str | os.PathLike[str], ops: list[Op], *, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDWR | flags)
    try:
        apply(fd, ops)
    finally:
        os.close(fd)


def apply_to_bytes(buf: bytearray, ops: list[Op]) -> None:
    for op in ops:
        if isinstance(op, Write):
            buf[op.offset : op.end] = op.data()


# --------------------------------------------------------------------------
# Oracles
# --------------------------------------------------------------------------


def _run(argv: list[str | os.PathLike[str]], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [os.fspath(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "LC_ALL": "C"},
    )


def make_reference(image: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """``qemu-img convert -O raw IMAGE DEST`` (follows the backing chain)."""
    res = _run(["qemu-img", "convert", "-U", "-O", "raw", image, dest])
    assert res.returncode == 0, res.stderr
    return Path(dest)


@dataclass
class CheckResult:
    returncode: int
    report: dict
    output: str

    @property
    def corruptions(self) -> int:
        return int(self.report.get("corruptions", 0))

    @property
    def leaks(self) -> int:
        return int(self.report.get("leaks", 0))


def qemu_check(image: str | os.PathLike[str]) -> CheckResult:
    """`qemu-img check --output json` (not -U: a leftover lock is a failure too)."""
    res = _run(["qemu-img", "check", "--output", "json", image])
    try:
        report = json.loads(res.stdout)
    except ValueError:
        report = {}
    return CheckResult(res.returncode, report, (res.stdout + res.stderr).strip())


def assert_check_clean(image: str | os.PathLike[str]) -> None:
    """`qemu-img check` exits 0: no corruption, no leak, no check error."""
    res = qemu_check(image)
    assert res.returncode == 0 and res.leaks == 0 and res.corruptions == 0, (
        f"qemu-img check {image} exited {res.returncode}: {res.output}"
    )


def assert_check_no_corruption(image: str | os.PathLike[str]) -> CheckResult:
    """`qemu-img check` exits 0 or 3: leaked clusters are allowed, nothing else."""
    res = qemu_check(image)
    assert res.returncode in (0, 3) and res.corruptions == 0, (
        f"qemu-img check {image} exited {res.returncode}: {res.output}"
    )
    return res


def assert_identical(reference: str | os.PathLike[str], image: str | os.PathLike[str]) -> None:
    """`qemu-img compare -f raw REFERENCE IMAGE` says "Images are identical"."""
    res = _run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", reference, image])
    assert res.returncode == 0, (
        f"qemu-img compare {reference} {image} exited {res.returncode}: "
        f"{(res.stdout + res.stderr).strip()}"
    )
    assert "Images are identical" in res.stdout, res.stdout


def snapshot_raw(image: str | os.PathLike[str], name: str, dest: str | os.PathLike[str]) -> bytes:
    res = _run(["qemu-img", "convert", "-U", "-l", f"snapshot.name={name}", "-O", "raw",
                image, dest])  # fmt: skip
    assert res.returncode == 0, res.stderr
    try:
        return Path(dest).read_bytes()
    finally:
        os.unlink(dest)


# --------------------------------------------------------------------------
# Crash checking: what must have survived
# --------------------------------------------------------------------------


@dataclass
class WriterLog:
    acked: int  # writes 0..acked-1 returned
    synced: int  # writes 0..synced-1 were followed by a returned fsync
    error: str | None


def read_log(path: str | os.PathLike[str]) -> WriterLog:
    acked = synced = 0
    error = None
    for line in Path(path).read_text().splitlines():
        kind, _, arg = line.partition(" ")
        if kind == "W":
            acked = int(arg) + 1
        elif kind == "F":
            synced = int(arg) + 1
        elif kind == "E":
            error = arg
    return WriterLog(acked, synced, error)


def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def assert_durable(
    actual: bytes, original: bytes, all_writes: list[Write], durable: int, attempted: int
) -> None:
    """Writes [0, durable) must read back, and every byte no write in
    [0, attempted) touched must still hold its original value; bytes of the
    writes in [durable, attempted) may hold either."""
    expected = bytearray(original)
    apply_to_bytes(expected, all_writes[:durable])  # type: ignore[arg-type]
    unsure = merge([(w.offset, w.end) for w in all_writes[durable:attempted]])
    assert len(actual) == len(expected), f"{len(actual)} bytes, expected {len(expected)}"
    pos = 0
    for s, e in [*unsure, (len(expected), len(expected))]:
        if actual[pos:s] != expected[pos:s]:
            a, x = memoryview(actual)[pos:s], memoryview(expected)[pos:s]
            first = next(i for i in range(len(a)) if a[i] != x[i]) + pos
            culprits = [i for i, w in enumerate(all_writes[:durable])
                        if w.offset <= first < w.end]  # fmt: skip
            raise AssertionError(
                f"byte {first} (0x{first:x}) is {actual[first]:#04x}, expected "
                f"{expected[first]:#04x}; durable writes covering it: {culprits[-3:]} "
                f"(of {durable} durable, {attempted} attempted)"
            )
        pos = max(pos, e)


# --------------------------------------------------------------------------
# The crash tests' writer process
# --------------------------------------------------------------------------


def writer_main(argv: list[str]) -> int:
    view, log_path, seed, start, end = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    max_len = int(argv[5]) if len(argv) > 5 else 256 * KiB
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    fd = os.open(view, os.O_RDWR)
    last = -1
    try:
        for op in iter_ops(seed, start, end, max_len=max_len, fsync_every=6):
            if isinstance(op, Write):
                n = os.pwrite(fd, op.data(), op.offset)
                if n != op.length:
                    os.write(log, f"E short write {n} of {op.length}\n".encode())
                    return 1
                last += 1
                os.write(log, f"W {last}\n".encode())
            else:
                os.fsync(fd)
                os.write(log, f"F {last}\n".encode())
    except OSError as exc:
        os.write(log, f"E {exc.errno}\n".encode())
        return 0
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
        os.close(log)
    return 0


def crash_writes(seed: int, start: int, end: int, count: int,
                 max_len: int = 256 * KiB) -> list[Write]:  # fmt: skip
    """The first ``count`` writes the crash writer makes for these arguments."""
    out: list[Write] = []
    if count <= 0:
        return out
    for op in iter_ops(seed, start, end, max_len=max_len, fsync_every=6):
        if isinstance(op, Write):
            out.append(op)
            if len(out) == count:
                break
    return out


if __name__ == "__main__":
    sys.exit(writer_main(sys.argv[1:]))
