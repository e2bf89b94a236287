#!/usr/bin/env python3
"""Benchmark qfuse's raw view against qemu-storage-daemon and a pyfuse3 floor.

    .venv/bin/python bench/bench.py [--runtime S] [--size 1G] [--cpu N | --no-pin] ...
    (or: make bench BENCH_ARGS='...')

For each fio job, the same data is read through three FUSE views, one after
another in the same run:

* qfuse: ``qfuse mount IMAGE VIEW --read-only``;
* qsd: qemu-storage-daemon's FUSE export of the same image (skipped when
  qemu-storage-daemon is not installed);
* floor: ``bench/passthrough.py``, a pyfuse3 + trio view of the raw data with
  one ``os.pread`` per request: what any Python FUSE daemon pays before doing
  qcow2 work.

fio and the daemon under test are pinned to the same CPU with taskset (see
docs/benchmarks.md for why). Every view is mounted fresh for each job and
torn down afterwards, also on errors and Ctrl-C. Results: a Markdown table on
stdout and in OUT/results.md, the numbers in OUT/results.json, fio's own JSON
in OUT/fio/. This is a measurement, not a test: nothing is asserted.

``--tools`` runs none of that: it times ``qfuse convert`` beside ``qemu-img
convert`` on the same data (raw to qcow2 and back, with and without -c),
the median of ``--repeat`` runs, into OUT/tools.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLUSTER_64K = 64 * 1024
SYSTEMS = ("qfuse", "qsd", "floor")
EMPTY_FACTOR = 16  # an "empty" image is this many times --size (room for allocating writes)
CACHE_MODES = ("writeback", "writethrough", "none", "directsync", "unsafe")
# QEMU's -drive cache=MODE spelled for qemu-storage-daemon: the block nodes'
# cache.direct / cache.no-flush, and the FUSE export's writethrough flag (the
# part of the mode that -drive puts on the guest device's write cache).
QSD_CACHE = {
    "writeback": ("cache.direct=off,cache.no-flush=off", "writethrough=off"),
    "writethrough": ("cache.direct=off,cache.no-flush=off", "writethrough=on"),
    "none": ("cache.direct=on,cache.no-flush=off", "writethrough=off"),
    "directsync": ("cache.direct=on,cache.no-flush=off", "writethrough=on"),
    "unsafe": ("cache.direct=off,cache.no-flush=on", "writethrough=off"),
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A step failed; the message says which and why."""


class MountError(BenchError):
    """A view could not be mounted: the system is not run again in this bench."""


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


# ---- mounts ------------------------------------------------------------------


def _unescape_mountinfo(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(_unescape_mountinfo(line.split()[4]) == target for line in f)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def force_unmount(view: Path) -> None:
    """Last resort: fusermount3 -u with retries (it flakes with EBUSY), then lazy."""
    for _ in range(10):
        if not is_mounted(view):
            return
        subprocess.run(["fusermount3", "-u", str(view)], capture_output=True)
        time.sleep(0.2)
    if is_mounted(view):
        log(f"{view}: still busy, lazy unmount")
        subprocess.run(["fusermount3", "-uz", str(view)], capture_output=True)


def bdi_read_ahead(view: Path) -> Path:
    dev = os.stat(view).st_dev
    return Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")


@dataclasses.dataclass
class Mounter:
    """How one system mounts a view and takes it down again."""

    name: str
    pin: list[str]
    logdir: Path
    qfuse: str = ""
    qsd: str = ""
    cache: str = "writeback"

    @contextlib.contextmanager
    def mounted(self, image: Path, raw: Path, view: Path, writable: bool) -> Iterator[None]:
        view.touch()
        logfile = self.logdir / f"{self.name}-{view.stem}.log"
        proc: subprocess.Popen[bytes] | None = None
        try:
            if self.name == "qfuse":
                cmd = [*self.pin, self.qfuse, "mount", str(image), str(view), "--cache", self.cache]
                if not writable:
                    cmd.append("--read-only")
                with open(logfile, "wb") as out:
                    rc = subprocess.run(
                        cmd,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        timeout=120,
                    ).returncode
                if rc != 0 or not is_mounted(view):
                    raise MountError(
                        f"qfuse mount: exit {rc}, mounted={is_mounted(view)}: {tail(logfile)}"
                    )
            else:
                if self.name == "qsd":
                    node_cache, export_cache = QSD_CACHE[self.cache]
                    cmd = [
                        *self.pin,
                        self.qsd,
                        "--blockdev",
                        f"driver=file,node-name=file,filename={image},{node_cache}",
                        "--blockdev",
                        f"driver=qcow2,node-name=fmt,file=file,{node_cache}",
                        "--export",
                        "type=fuse,id=exp,node-name=fmt,"
                        f"mountpoint={view},writable={'on' if writable else 'off'},"
                        f"{export_cache}",
                    ]
                else:
                    cmd = [
                        *self.pin,
                        sys.executable,
                        str(HERE / "passthrough.py"),
                        str(raw),
                        str(view),
                    ]
                    if writable:
                        cmd.append("--writable")
                with open(logfile, "wb") as out:
                    proc = subprocess.Popen(
                        cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                    )
                if not wait_until(lambda: is_mounted(view) or proc.poll() is not None, 30):
                    raise MountError(f"{self.name}: not mounted after 30 s")
                if not is_mounted(view):
                    raise MountError(f"{self.name} exited with {proc.returncode}: {tail(logfile)}")
            yield
        finally:
            self._unmount(view, proc)

    def _unmount(self, view: Path, proc: subprocess.Popen[bytes] | None) -> None:
        if self.name == "qfuse" and is_mounted(view):
            try:
                subprocess.run([self.qfuse, "umount", str(view)], capture_output=True, timeout=120)
            except subprocess.TimeoutExpired:
                log(f"qfuse umount {view}: timed out")
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {proc.pid}) ignored SIGTERM for 60 s: killing it")
                proc.kill()
                proc.wait()
        if not wait_until(lambda: not is_mounted(view), 10):
            force_unmount(view)


def tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:]) or "(no output)"


# ---- images ------------------------------------------------------------------


def make_data(path: Path, size: int) -> None:
    """Each 64 KiB cluster: 32 KiB random bytes, then 32 KiB of text.

    No cluster is all zeros (so every one is allocated), and zlib compresses a
    cluster about 2:1 (so the compressed image really decompresses).
    """
    text = b"qfuse benchmark data: the quick brown fox jumps over the lazy dog. "
    half = CLUSTER_64K // 2
    filler = (text * (half // len(text) + 1))[:half]
    chunk = 4 << 20
    with open(path, "wb") as f:
        for _ in range(size // chunk):
            rnd = memoryview(os.urandom(chunk // 2))
            buf = bytearray(chunk)
            for i in range(chunk // CLUSTER_64K):
                buf[i * CLUSTER_64K : i * CLUSTER_64K + half] = rnd[i * half : (i + 1) * half]
                buf[i * CLUSTER_64K + half : (i + 1) * CLUSTER_64K] = filler
            f.write(buf)


def build_images(imgdir: Path, size: int) -> dict[str, Path]:
    """The raw data and its qcow2 copies, rebuilt only when missing or resized."""
    imgdir.mkdir(parents=True, exist_ok=True)
    images = {
        "raw": imgdir / "data.raw",
        "c64k": imgdir / "c64k.qcow2",
        "c4k": imgdir / "c4k.qcow2",
        "zlib": imgdir / "zlib.qcow2",
    }
    manifest = imgdir / "manifest.json"
    want = {"size": size, "layout": "32K random + 32K text per 64K", "version": 1}
    if manifest.exists() and all(p.exists() for p in images.values()):
        if json.loads(manifest.read_text()) == want:
            log(f"images: reusing {imgdir}")
            return images
    manifest.unlink(missing_ok=True)
    t0 = time.monotonic()
    log(f"images: writing {size >> 20} MiB of data to {images['raw']}")
    make_data(images["raw"], size)
    convert = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"]
    log("images: qcow2, 64 KiB clusters")
    run([*convert, "-o", "cluster_size=65536", images["raw"], images["c64k"]])
    log("images: qcow2, 4 KiB clusters (L2 cache pressure)")
    run([*convert, "-o", "cluster_size=4096", images["raw"], images["c4k"]])
    log("images: qcow2, zlib-compressed (qemu-img convert -c)")
    run(
        [
            *convert,
            "-c",
            "-o",
            "cluster_size=65536,compression_type=zlib",
            images["raw"],
            images["zlib"],
        ]
    )
    manifest.write_text(json.dumps(want))
    log(f"images: built in {time.monotonic() - t0:.0f} s")
    return images


def run(cmd: list[object]) -> str:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if res.returncode != 0:
        raise BenchError(f"{' '.join(map(str, cmd))}: {res.stderr.strip() or res.returncode}")
    return res.stdout


def warm(path: Path) -> None:
    """Read a file once so that every daemon finds it in the host page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass


# ---- jobs --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    title: str
    image: str  # key into the images dict, or "empty" for a new empty image (16x --size)
    fio: tuple[str, ...]
    unit: str  # "MB/s" or "IOPS"
    write: bool = False


def jobs_for(runtime: int, size: int) -> list[Job]:
    seq = ("--rw=read", "--bs=1M", f"--size={size}", "--invalidate=1", f"--runtime={2 * runtime}")
    rand = (
        "--rw=randread",
        "--bs=4k",
        "--direct=1",
        f"--runtime={runtime}",
        "--time_based",
        "--ramp_time=1",
        "--group_reporting",
    )
    return [
        Job("seq-read", "seq read 1 MiB (buffered), 64 KiB clusters", "c64k", seq, "MB/s"),
        Job(
            "rand-read-1",
            "rand read 4 KiB, O_DIRECT, 1 job",
            "c64k",
            (*rand, "--numjobs=1"),
            "IOPS",
        ),
        Job(
            "rand-read-4",
            "rand read 4 KiB, O_DIRECT, 4 jobs",
            "c64k",
            (*rand, "--numjobs=4"),
            "IOPS",
        ),
        Job(
            "rand-read-4k-cluster",
            "rand read 4 KiB, O_DIRECT, 4 KiB clusters",
            "c4k",
            (*rand, "--numjobs=1"),
            "IOPS",
        ),
        Job("seq-read-zlib", "seq read 1 MiB (buffered), zlib-compressed", "zlib", seq, "MB/s"),
    ]


def write_jobs_for(runtime: int, size: int) -> list[Job]:
    """Write jobs (--writes). Each system gets its own fresh copy of the image."""
    rand = ("--rw=randwrite", "--bs=4k", "--direct=1", "--group_reporting")
    return [
        Job(
            "rand-write-overwrite",
            "rand write 4 KiB overwrite, O_DIRECT",
            "c64k",
            (*rand, f"--runtime={runtime}", "--time_based", "--ramp_time=1"),
            "IOPS",
            True,
        ),
        # 4 KiB writes at 64 KiB-aligned random offsets of an empty image 16x the size,
        # as many as the size has clusters: ~97% of them land in a new cluster.
        Job(
            "rand-write-alloc",
            "rand write 4 KiB allocating, O_DIRECT",
            "empty",
            (
                *rand,
                "--blockalign=64k",
                f"--number_ios={size // CLUSTER_64K}",
                f"--runtime={runtime}",
            ),
            "IOPS",
            True,
        ),
        Job(
            "seq-write-empty",
            "seq write 1 MiB into an empty image",
            "empty",
            (
                "--rw=write",
                "--bs=1M",
                f"--size={size}",
                "--end_fsync=1",
                f"--runtime={2 * runtime}",
            ),
            "MB/s",
            True,
        ),
    ]


@dataclasses.dataclass
class Result:
    value: float | None = None
    lat_us: float | None = None
    error: str = ""


def median(runs: list[Result]) -> Result:
    """The run with the median value; a failure only when every run failed."""
    good = sorted((r for r in runs if not r.error), key=lambda r: r.value or 0.0)
    return good[(len(good) - 1) // 2] if good else runs[-1]


def run_fio(job: Job, view: Path, pin: list[str], json_out: Path) -> Result:
    cmd = [
        *pin,
        "fio",
        f"--name={job.name}",
        f"--filename={view}",
        "--ioengine=psync",
        "--output-format=json",
        f"--output={json_out}",
        *job.fio,
    ]
    if not job.write:
        cmd.append("--readonly")
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        return Result(
            error=f"fio exit {res.returncode}: "
            f"{(res.stderr or res.stdout).strip().splitlines()[-1:]}"
        )
    text = json_out.read_text()
    data = json.loads(text[text.find("{") :])  # fio may print warnings before the JSON
    stats = data["jobs"][0]["write" if job.write else "read"]
    if stats.get("io_bytes", 0) == 0:
        return Result(error="no I/O done")
    value = stats["bw_bytes"] / 1e6 if job.unit == "MB/s" else stats["iops"]
    return Result(value=value, lat_us=stats["lat_ns"]["mean"] / 1000)


# ---- report ------------------------------------------------------------------


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    return f"{value:.0f}" if unit == "MB/s" else f"{value / 1000:.1f}k"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "—"


def report_mode(
    mode: str,
    first: bool,
    jobs: list[Job],
    systems: list[str],
    results: dict[tuple[str, str, str], Result],
) -> list[str]:
    """The tables of one cache mode (the floor, which has none, only beside the first)."""
    lines = ["", f"## cache={mode}", ""]
    lines += [
        "| job | unit | " + " | ".join(SYSTEMS) + " | qfuse/qsd | qfuse/floor |",
        "|---|---|" + "---:|" * (len(SYSTEMS) + 2),
    ]

    def cell(job: Job, s: str) -> str:
        r = results.get((mode, job.name, s))
        if s not in systems:
            return "skipped"
        if s == "floor" and not first:
            return "—"
        if r is None or r.error:
            return "failed"
        return fmt(r.value, job.unit)

    def val(job: Job, s: str) -> float | None:
        r = results.get((mode, job.name, s))
        return r.value if r else None

    for job in jobs:
        lines.append(
            f"| {job.title} | {job.unit} | "
            + " | ".join(cell(job, s) for s in SYSTEMS)
            + f" | {ratio(val(job, 'qfuse'), val(job, 'qsd'))}"
            + f" | {ratio(val(job, 'qfuse'), val(job, 'floor'))} |"
        )
    lat_jobs = [j for j in jobs if j.unit == "IOPS"]
    if lat_jobs:
        lines += [
            "",
            "Mean latency per request (µs, fio `lat` mean; lower is better):",
            "",
            "| job | " + " | ".join(SYSTEMS) + " |",
            "|---|" + "---:|" * len(SYSTEMS),
        ]
        for job in lat_jobs:
            cells = []
            for s in SYSTEMS:
                r = results.get((mode, job.name, s))
                cells.append(f"{r.lat_us:.0f}" if r and r.lat_us is not None else "—")
            lines.append(f"| {job.title} | " + " | ".join(cells) + " |")
    return lines


def report(
    meta: dict[str, str],
    jobs: list[Job],
    systems: list[str],
    modes: list[str],
    results: dict[tuple[str, str, str], Result],
    notes: list[str],
) -> str:
    lines = ["# qfuse benchmark", ""]
    lines += [f"* {k}: {v}" for k, v in meta.items()]
    for mode in modes:
        lines += report_mode(mode, mode == modes[0], jobs, systems, results)
    errors = [
        f"{job} / {s} / cache={m}: {r.error}" for (m, job, s), r in results.items() if r.error
    ]
    if notes or errors:
        lines += ["", "Notes:", ""] + [f"* {n}" for n in notes + errors]
    return "\n".join(lines) + "\n"


def version_of(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


# ---- main --------------------------------------------------------------------


# ---- --tools: qfuse convert against qemu-img convert ---------------------------

# (name, source image key, qemu-img convert arguments; qfuse takes the same)
TOOL_JOBS: list[tuple[str, str, list[str]]] = [
    ("raw → qcow2", "raw", ["-O", "qcow2"]),
    ("raw → qcow2 -c (zlib)", "raw", ["-c", "-O", "qcow2"]),
    ("raw → qcow2 -c (zstd)", "raw", ["-c", "-O", "qcow2", "-o", "compression_type=zstd"]),
    ("qcow2 → raw", "c64k", ["-O", "raw"]),
    ("qcow2 (zlib-compressed) → raw", "zlib", ["-O", "raw"]),
    ("qcow2 → qcow2 -c (zlib)", "c64k", ["-c", "-O", "qcow2"]),
]


def _timed(cmd: list[str]) -> float:
    os.sync()  # earlier runs' dirty pages are not this run's cost
    t0 = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    if result.returncode != 0:
        raise BenchError(f"{' '.join(cmd)}: {result.stderr.strip()}")
    return elapsed


def run_tools(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    if size % (4 << 20):
        raise SystemExit("--size must be a multiple of 4 MiB")
    qfuse = os.environ.get("QFUSE") or str(Path(sys.executable).parent / "qfuse")
    images = build_images(args.out / "images", size)
    work = Path(tempfile.mkdtemp(prefix="tools-", dir=args.out))
    tools = {
        # qemu-img convert writes with cache=unsafe (no final sync); qfuse
        # syncs before it renames DEST into place, as -t writeback does.
        "qemu-img": lambda src, dst, a: ["qemu-img", "convert", *a, src, dst],
        "qemu-img -t writeback": lambda src, dst, a: [
            "qemu-img", "convert", "-t", "writeback", *a, src, dst],
        "qfuse": lambda src, dst, a: [qfuse, "convert", *a, src, dst],
    }  # fmt: skip
    rows = []
    try:
        for name, key, conv_args in TOOL_JOBS:
            times: dict[str, float] = {}
            for tool, make in tools.items():
                runs = []
                for _ in range(args.repeat):
                    dest = work / "out"
                    runs.append(_timed(make(str(images[key]), str(dest), conv_args)))
                    dest.unlink()
                times[tool] = sorted(runs)[len(runs) // 2]
                log(f"{name}: {tool} {times[tool]:.2f} s")
            rows.append((name, times))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    head = f"| {size >> 20} MiB | " + " | ".join(tools) + " | qfuse / qemu-img -t writeback |"
    lines = [head, "|---" * (len(tools) + 2) + "|"]
    for name, times in rows:
        cells = " | ".join(f"{times[t]:.2f} s" for t in tools)
        lines.append(
            f"| {name} | {cells} | {times['qfuse'] / times['qemu-img -t writeback']:.1f}x |"
        )
    text = "\n".join(lines) + (
        f"\n\nMedian of {args.repeat} run(s); data: 32K random + 32K text per 64K cluster; "
        f"{os.cpu_count()} CPUs ({cpu_model()}).\n"
    )
    (args.out / "tools.md").write_text(text)
    print(text)
    return 0


# ---- --check: qfuse check against qemu-img check -----------------------------------

CHECK_IMAGES = [
    ("c64k", "64 KiB clusters"),
    ("c4k", "4 KiB clusters"),
    ("zlib", "64 KiB clusters, zlib-compressed"),
]


def run_check_timing(args: argparse.Namespace) -> int:
    """Median wall time of `qfuse check` and `qemu-img check` on the same images."""
    size = parse_size(args.size)
    if size % (4 << 20):
        raise SystemExit("--size must be a multiple of 4 MiB")
    qfuse = os.environ.get("QFUSE") or str(Path(sys.executable).parent / "qfuse")
    images = build_images(args.out / "images", size)
    lines = [
        f"| check, {size >> 20} MiB image | qemu-img | qfuse | qfuse / qemu-img |",
        "|---|---|---|---|",
    ]
    for key, name in CHECK_IMAGES:
        times = {}
        for tool, cmd in (
            ("qemu-img", ["qemu-img", "check", str(images[key])]),
            ("qfuse", [qfuse, "check", str(images[key])]),
        ):
            runs = sorted(_timed(cmd) for _ in range(args.repeat))
            times[tool] = runs[len(runs) // 2]
            log(f"check {name}: {tool} {times[tool]:.3f} s")
        lines.append(
            f"| {name} | {times['qemu-img']:.3f} s | {times['qfuse']:.3f} s | "
            f"{times['qfuse'] / times['qemu-img']:.1f}x |"
        )
    text = "\n".join(lines) + (
        f"\n\nMedian of {args.repeat} run(s), wall time of the whole command (qfuse's "
        f"includes starting Python); {os.cpu_count()} CPUs ({cpu_model()}).\n"
    )
    (args.out / "check.md").write_text(text)
    print(text)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description="qfuse benchmark (see docs/benchmarks.md)")
    parser.add_argument("--runtime", type=int, default=10, help="seconds per random job")
    parser.add_argument("--size", default="1G", help="virtual size of the images (default 1G)")
    parser.add_argument(
        "--cpu",
        type=int,
        default=(os.cpu_count() or 1) - 1,
        help="CPU that fio and the daemon share (default: the last one)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma-separated subset of qfuse,qsd,floor"
    )
    parser.add_argument(
        "--jobs",
        default="",
        help="comma-separated job names, read or write (default: the read jobs, and with "
        "--writes the write jobs too): seq-read, rand-read-1, rand-read-4, "
        "rand-read-4k-cluster, seq-read-zlib, rand-write-overwrite, rand-write-alloc, "
        "seq-write-empty",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per job and system; the median is shown"
    )
    parser.add_argument(
        "--writes", action="store_true", help="also run the write jobs (about 2.5 minutes more)"
    )
    parser.add_argument(
        "--readahead-kb",
        type=int,
        default=None,
        help="set the views' read_ahead_kb (default: leave the kernel's)",
    )
    parser.add_argument(
        "--cache",
        default="writeback",
        help="comma-separated cache modes to run every job in, for qfuse (--cache) and qsd "
        "(QEMU's meaning, via cache.direct/cache.no-flush/writethrough), or 'all' "
        "(default: writeback)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "out", help="output directory")
    parser.add_argument(
        "--tools", action="store_true",
        help="time qfuse convert against qemu-img convert instead (no fio, no mounts)",
    )  # fmt: skip
    parser.add_argument(
        "--check", action="store_true",
        help="time qfuse check against qemu-img check instead (no fio, no mounts)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.tools:
        return run_tools(args)
    if args.check:
        return run_check_timing(args)

    # SIGTERM unwinds like Ctrl-C, so every mount's `finally` runs.
    signal.signal(signal.SIGTERM, _interrupt)

    size = parse_size(args.size)
    if size % (4 << 20):
        parser.error("--size must be a multiple of 4 MiB")
    for tool in ("fio", "qemu-img", "fusermount3"):
        if not shutil.which(tool):
            parser.error(f"{tool} not found (make bench installs it)")

    modes = list(CACHE_MODES) if args.cache == "all" else [m for m in args.cache.split(",") if m]
    if not modes or set(modes) - set(CACHE_MODES):
        parser.error(f"--cache: modes are {', '.join(CACHE_MODES)} or 'all'")
    notes: list[str] = []
    systems = [s for s in args.systems.split(",") if s]
    qfuse = os.environ.get("QFUSE") or str(Path(sys.executable).parent / "qfuse")
    qsd = shutil.which("qemu-storage-daemon") or ""
    if "qsd" in systems and not qsd:
        systems.remove("qsd")
        notes.append(
            "qsd skipped: qemu-storage-daemon not installed (Debian package qemu-system-common)"
        )
    if "qfuse" in systems and not os.access(qfuse, os.X_OK):
        systems.remove("qfuse")
        notes.append(f"qfuse skipped: {qfuse} not found")

    pin = [] if args.no_pin else ["taskset", "-c", str(args.cpu)]
    read_jobs, write_jobs = jobs_for(args.runtime, size), write_jobs_for(args.runtime, size)
    jobs = read_jobs + (write_jobs if args.writes else [])
    if args.jobs:
        wanted = set(args.jobs.split(","))
        unknown = wanted - {j.name for j in read_jobs + write_jobs}
        if unknown:
            parser.error(f"unknown job: {', '.join(sorted(unknown))}")
        jobs = [j for j in read_jobs + write_jobs if j.name in wanted]

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fio").mkdir(exist_ok=True)
    images = build_images(args.out / "images", size)
    work = Path(tempfile.mkdtemp(prefix="work-", dir=args.out))
    meta = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "host": f"{platform.node()}, kernel {platform.release()}, {os.cpu_count()} CPUs "
        f"({cpu_model()})",
        "pinning": (
            "none (--no-pin)"
            if not pin
            else f"fio and the daemon under test both on CPU {args.cpu} (taskset)"
        ),
        "images": f"{size >> 20} MiB virtual, in the host page cache; "
        "64 KiB clusters unless the job says otherwise",
        "fio": f"{version_of(['fio', '--version'])}, ioengine=psync (one I/O in flight per job), "
        f"{args.runtime} s per random job",
        "qemu-storage-daemon": version_of([qsd, "--version"]) if qsd else "not installed",
        "qfuse": version_of(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
    }
    runs: dict[tuple[str, str, str], list[Result]] = collections.defaultdict(list)
    broken: dict[str, str] = {}
    readahead: dict[str, str] = {}
    t_start = time.monotonic()
    try:
        for mode in modes:
            # The floor has no cache modes: it runs once, beside the first mode.
            mode_systems = systems if mode == modes[0] else [s for s in systems if s != "floor"]
            for job in jobs:
                for rep in range(args.repeat):
                    log(
                        f"job {job.name}: {job.title}, cache={mode}"
                        + (f", run {rep + 1}" if args.repeat > 1 else "")
                    )
                    for system in mode_systems:
                        if system in broken:
                            r = Result(error=f"not run ({broken[system]})")
                        else:
                            bench = Run(
                                job, system, pin, work, images, size, args.readahead_kb, mode
                            )
                            r = bench.run(qfuse=qfuse, qsd=qsd, fio_json=args.out / "fio")
                            if bench.mount_failed:
                                broken[system] = f"{system} failed to mount earlier"
                            if bench.readahead:
                                readahead[system] = bench.readahead
                            notes.extend(bench.notes)
                        runs[(mode, job.name, system)].append(r)
                        shown = r.error or f"{fmt(r.value, job.unit)} {job.unit}"
                        log(f"  {system:6} {shown}")
    except KeyboardInterrupt:
        notes.append("interrupted: the table is incomplete")
        log("interrupted")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = {key: median(rs) for key, rs in runs.items()}
    if args.repeat > 1:
        meta["runs"] = f"{args.repeat} per job and system, interleaved; the median is shown"
    meta["read_ahead_kb of the views"] = ", ".join(f"{k} {v}" for k, v in readahead.items())
    meta["duration"] = f"{time.monotonic() - t_start:.0f} s"
    text = report(meta, jobs, systems, modes, results, notes)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "results": {
                    f"{m}/{j}/{s}": dataclasses.asdict(r) for (m, j, s), r in results.items()
                },
            },
            indent=2,
        )
    )
    print(text)
    log(f"written: {args.out / 'results.md'}")
    return 0


@dataclasses.dataclass
class Run:
    """One fio job against one system's view, mounted for this run only."""

    job: Job
    system: str
    pin: list[str]
    work: Path
    images: dict[str, Path]
    size: int
    readahead_kb: int | None
    cache: str = "writeback"
    mount_failed: bool = False
    readahead: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)

    def run(self, qfuse: str, qsd: str, fio_json: Path) -> Result:
        job, system = self.job, self.system
        image, raw = self._prepare()
        view = self.work / f"{system}-{job.name}.raw"
        mounter = Mounter(system, self.pin, self.work, qfuse=qfuse, qsd=qsd, cache=self.cache)
        try:
            warm(raw if system == "floor" else image)
            with mounter.mounted(image, raw, view, writable=job.write):
                ra = bdi_read_ahead(view)
                if self.readahead_kb is not None and ra.exists():
                    ra.write_text(str(self.readahead_kb))
                self.readahead = ra.read_text().strip() if ra.exists() else "?"
                result = run_fio(
                    job, view, self.pin, fio_json / f"{job.name}-{system}-{self.cache}.json"
                )
            if job.write and system != "floor":
                check = subprocess.run(
                    ["qemu-img", "check", str(image)], capture_output=True, text=True
                )
                if check.returncode != 0:
                    self.notes.append(
                        f"{job.name} / {system} / cache={self.cache}: qemu-img check exit "
                        f"{check.returncode} after the job"
                    )
            return result
        except MountError as e:
            self.mount_failed = True
            return Result(error=str(e))
        except BenchError as e:
            return Result(error=str(e))
        finally:
            for path in (image, raw, view):
                if path.parent == self.work:
                    path.unlink(missing_ok=True)

    def _prepare(self) -> tuple[Path, Path]:
        """(image, raw) for this run; write jobs get their own fresh copies."""
        job, images = self.job, self.images
        if not job.write:
            return images[job.image], images["raw"]
        image = self.work / f"{self.system}-{job.name}.qcow2"
        raw = self.work / f"{self.system}-{job.name}.data"
        if self.system == "floor":
            if job.image == "empty":
                with open(raw, "wb") as f:
                    f.truncate(EMPTY_FACTOR * self.size)
            else:
                run(["cp", "--reflink=auto", "--sparse=always", images["raw"], raw])
        elif job.image == "empty":
            run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "cluster_size=65536",
                    image,
                    str(EMPTY_FACTOR * self.size),
                ]
            )
        else:
            run(["cp", "--reflink=auto", images[job.image], image])
        return image, raw


if __name__ == "__main__":
    sys.exit(main())
