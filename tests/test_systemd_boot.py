"""The three documented ways to mount the view at boot, under a real systemd.

PID 1 of the test machine is not systemd, so test_systemd.py can only verify
the units and run their command lines by hand.  Here a real systemd manager

* runs the shipped systemd/qfuse@.service, unchanged, and itself applies
  every setting (Type=notify, the capability bounding set,
  DevicePolicy=closed with DeviceAllow=/dev/fuse, SystemCallFilter=,
  RestrictAddressFamilies=, MemoryDenyWriteExecute=, Restart=,
  ExecStopPost=);
* mounts the view through the shipped systemd/var-lib-images-disk.raw.mount,
  unchanged, and through the fstab line of docs/systemd.md (after
  `systemctl daemon-reload` has run systemd-fstab-generator): the manager
  runs mount(8) -> mount.fuse3 -> qfuse to start, and umount(8) ->
  /sbin/umount.fuse.qfuse -> `qfuse umount` to stop, which must return only
  once qfuse has closed the image.

The manager is PID 1 of a `systemd-nspawn --boot` container of this very
machine's OS (the command line is `nspawn_argv()`; docs/systemd.md shows it):

* Its root directory is an overlay: the lower layer is the host's root
  filesystem (a read-only bind mount of / alone, none of the mounts below
  it), the upper layer a tmpfs.  Everything the container's systemd writes,
  in /etc, /var, /run, /tmp or anywhere else, lands in that tmpfs and goes
  with it.  These mounts are made in a mount namespace of their own
  (`unshare --mount`), which also gets its own /run for nspawn's state; the
  host's /tmp, /run, /etc and services are never touched, and when
  systemd-nspawn exits its mounts are gone.
* The upper layer starts with what an administrator installs
  (docs/systemd.md, and `make install-helper`, whose install paths are read
  from the Makefile): /usr/local/bin/qfuse, a symlink to the venv's console
  script; /sbin/umount.fuse.qfuse, a copy of scripts/umount.fuse.qfuse (in
  usr/sbin when /sbin links there, as `install` writes it); a byte copy of
  qfuse@.service in /etc/systemd/system; a byte copy of
  systemd/qfuse-example.conf as /etc/qfuse/disk.conf, whose image and view
  are in /var/lib/images; and
  qfuse-test.target, which the container boots (sysinit.target only: no
  getty, no services of the host's multi-user.target).
* Bound into it: a directory of the test's tmp_path at /var/lib/images (so
  the image is the host's file: `qemu-img check` runs on the host once the
  service or the mount has stopped), /dev/fuse, and read-only this checkout
  and the Python installation the venv uses.
* `--system-call-filter=bpf` lets the container's systemd load the BPF
  device program that implements DevicePolicy= on cgroup v2 (without it the
  manager finds "BPF device control not supported" and silently skips
  DevicePolicy=); the container gets a cgroup v2 hierarchy of its own
  (SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1) in a cgroup made for it, since no
  manager on the host makes one.  `--private-network`: only a loopback.
* The tests drive the container's manager as an administrator would:
  `systemctl`, `journalctl`, `cmp`, `dd` run inside the container's
  namespaces (nsenter), and the .mount unit, /etc/fstab and a unit that
  uses the view are written into its /etc (through /proc/PID/root) before a
  `systemctl daemon-reload`.  Those helpers run with the host's privileges,
  not under the service's restrictions, which only the daemon itself has.

Teardown, also after a failure: SIGTERM to systemd-nspawn halts the
container (its systemd first stops the service or unmounts the view, through
the umount helper), then we wait for nspawn to exit and for the container's
cgroup to be empty, and remove the cgroup.  A
container that will not halt has its PID 1 killed (nspawn reaps it).  If
pytest itself dies, nspawn gets SIGTERM (parent-death signal).

Everything is per test (tmp_path, cgroup and machine name), so the tests run
in parallel with the rest of the suite.  Booting takes about a second;
Restart=on-failure waits RestartSec=5s; no test takes more than about 7 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from images import random_bytes
from mountutil import (
    PATTERN,
    TIMEOUT,
    NotifySocket,
    convert_raw,
    pattern_image,
    qemu_img_check,
    wait_until,
)

pytestmark = pytest.mark.mount

REPO = Path(__file__).resolve().parent.parent
SERVICE = REPO / "systemd" / "qfuse@.service"
EXAMPLE_CONF = REPO / "systemd" / "qfuse-example.conf"
MOUNT_UNIT_FILE = REPO / "systemd" / "var-lib-images-disk.raw.mount"
SYSTEMD_DOC = REPO / "docs" / "systemd.md"
UMOUNT_SCRIPT = REPO / "scripts" / "umount.fuse.qfuse"


def _makefile_default(name: str) -> str:
    """`NAME ?= VALUE` of the Makefile: where `make install-helper` installs."""
    text = (REPO / "Makefile").read_text()
    match = re.search(rf"^{name} \?= *(\S+)$", text, re.MULTILINE)
    assert match, f"the Makefile sets no default {name}"
    return match.group(1)


# What `make install-helper` installs: the console script linked into
# HELPER_BINDIR (the path the service's ExecStart= runs, and the one mount.fuse3
# finds), and the umount helper.
INSTALLED_QFUSE = _makefile_default("HELPER_BINDIR") + "/qfuse"
UMOUNT_HELPER = _makefile_default("UMOUNT_HELPER")


def _example_conf() -> dict[str, str]:
    conf = {}
    for line in EXAMPLE_CONF.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            conf[key.strip()] = value.strip()
    return conf


CONF = _example_conf()
UNIT = "qfuse@disk.service"  # reads /etc/qfuse/disk.conf, a copy of the example
IMAGE = CONF["IMAGE"]  # /var/lib/images/disk.qcow2, inside the container
VIEW = CONF["MOUNTPOINT"]  # /var/lib/images/disk.raw
IMAGES = os.path.dirname(IMAGE)
EXPECTED = f"{IMAGES}/expected.raw"  # qemu-img convert -O raw of the image, made on the host
CHUNK = f"{IMAGES}/chunk"  # data the test writes through the view
# The example .mount unit, for the same image and view; fstab-generator names
# the unit of an fstab line for that view the same way.
MOUNT_UNIT = MOUNT_UNIT_FILE.name

BOOT_TARGET = "qfuse-test.target"
BOOT_TARGET_UNIT = """\
[Unit]
Description=qfuse tests: the basic system (sysinit.target), no services
Requires=sysinit.target
After=sysinit.target
AllowIsolate=yes
"""
BOOT_TIMEOUT = 30.0
HALT_TIMEOUT = 30.0
# The environment of the commands run inside the container: nothing of ours
# (no NOTIFY_SOCKET, no pytest variables, no pager).
INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}

# Capability numbers (linux/capability.h) of the names the unit may use.
CAPABILITIES = {"CAP_DAC_OVERRIDE": 1, "CAP_SYS_ADMIN": 21}

# Run by `unshare --mount` (a private mount namespace): join the container's
# cgroups, build the overlay root, hide the host's /run from nspawn, then
# become systemd-nspawn.   sh -euc SCRIPT sh WORK CGROUP_PROCS... -- NSPAWN_ARGV
OVERLAY_SCRIPT = r"""
work=$1; shift
while [ "$1" != -- ]; do echo $$ >"$1"; shift; done; shift
mkdir "$work/lower" "$work/layers" "$work/root"
mount --bind / "$work/lower"
mount -o remount,bind,ro "$work/lower"
mount -t tmpfs -o mode=0755 qfuse-test "$work/layers"
mkdir "$work/layers/upper" "$work/layers/work"
cp -a "$work/stage/." "$work/layers/upper/"
mount -t overlay -o "lowerdir=$work/lower,upperdir=$work/layers/upper,workdir=$work/layers/work" \
    qfuse-test "$work/root"
mount -t tmpfs -o mode=0755 qfuse-test /run
exec "$@"
"""


# -- can a container boot here? ------------------------------------------------------


def _cgroup_hierarchies() -> tuple[Path | None, Path | None]:
    """Mount points of the cgroup v2 hierarchy and of the v1 name=systemd one
    (both exist on a "hybrid" host), each only if mounted at its root."""
    unified = named = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, options = fields[sep + 1], fields[sep + 3].split(",")
            if fields[3] != "/":
                continue
            if fstype == "cgroup2" and unified is None:
                unified = Path(fields[4])
            elif fstype == "cgroup" and "name=systemd" in options and named is None:
                named = Path(fields[4])
    return unified, named


def _why_no_container() -> str | None:
    """Why a container cannot boot on this machine, or None."""
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, cgroups)"
    tools = [("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux"),
             ("unshare", "util-linux"), ("setpriv", "util-linux")]  # fmt: skip
    for tool, package in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package {package}; make test installs it)"
    if not os.path.exists("/lib/systemd/systemd"):
        return "systemd is not installed: nothing to boot (Debian package systemd)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    for path in ("/usr", "/etc"):
        if os.path.ismount(path):
            return f"{path} is a separate mount: the container is an overlay of / alone"
    if _cgroup_hierarchies()[0] is None:
        return (
            "no cgroup v2 hierarchy is mounted: the container's systemd needs one "
            "to enforce DevicePolicy= (BPF device programs)"
        )
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a mount namespace: {probe.stderr.strip()}"
    return None


# -- the container -------------------------------------------------------------------


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} unreadable)"
    return "\n".join(text[-lines:])


class Container:
    """A booted container; commands run in its namespaces as root."""

    def __init__(self, proc: subprocess.Popen[bytes], leader: int, console: Path) -> None:
        self.proc = proc
        self.leader = leader  # the container's systemd, as a host PID
        self.console = console

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["nsenter", f"--target={self.leader}", "--all", "--", *argv],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, env=INSIDE_ENV,
            timeout=TIMEOUT, check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"in the container, `{shlex.join(argv)}` exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}\n{self.journal_tail()}"
            )
        return result

    def write(self, path: str, text: str) -> None:
        """Write a file in the container, as its administrator would (into the
        overlay's upper layer, through the container's root directory)."""
        Path(f"/proc/{self.leader}/root{path}").write_text(text)

    def systemctl(self, *args: str) -> None:
        self.run("systemctl", *args)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, f"--property={','.join(properties)}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if line)

    def status(self, unit: str) -> str:
        """`systemctl status` and the unit's journal, for failure messages."""
        status = self.run("systemctl", "status", "--no-pager", "--lines=0", unit, check=False)
        journal = self.run("journalctl", "-b", "--no-pager", "-u", unit, check=False)
        return f"{status.stdout}\n{journal.stdout}"

    def journal_tail(self, lines: int = 40) -> str:
        """The end of this boot's journal, for failure messages."""
        tail = self.run("journalctl", "-b", "--no-pager", f"--lines={lines}", check=False)
        return tail.stdout

    def journal(self, *matches: str) -> list[dict[str, str]]:
        """The records of this boot's journal with every FIELD=value of `matches`."""
        out = self.run("journalctl", "-b", "--no-pager", "--output=json", *matches).stdout
        return [json.loads(line) for line in out.splitlines() if line]

    def qfuse_journal(self, unit: str) -> list[tuple[str, str]]:
        """(PRIORITY, MESSAGE) of what qfuse itself logged as the unit."""
        records = self.journal(f"_SYSTEMD_UNIT={unit}", "SYSLOG_IDENTIFIER=qfuse")
        return [(r["PRIORITY"], r["MESSAGE"]) for r in records]

    def fstype(self, path: str) -> str | None:
        """The type of what is mounted on `path` in the container's mount
        namespace (the last mount there), or None."""
        found = None
        with open(f"/proc/{self.leader}/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4] == path:
                    found = fields[fields.index("-") + 1]
        return found

    def mounted(self, path: str) -> bool:
        """Something is mounted on `path` in the container's mount namespace."""
        return self.fstype(path) is not None

    def unit_processes(self, unit: str) -> list[int]:
        """The PIDs (in the container) of the processes in the unit's cgroup."""
        cgroup = self.show(unit, "ControlGroup")["ControlGroup"]
        assert cgroup, f"{unit} has no cgroup"
        procs = self.run("cat", f"/sys/fs/cgroup{cgroup}/cgroup.procs").stdout
        return [int(pid) for pid in procs.split()]

    def exited(self, pid: int) -> bool:
        """The container's process `pid` is gone, or a zombie not reaped yet."""
        stat = self.run("cat", f"/proc/{pid}/stat", check=False)
        return stat.returncode != 0 or stat.stdout.rpartition(")")[2].split()[0] in "ZX"

    def wait_for(self, unit: str, timeout: float = TIMEOUT, **want: str) -> dict[str, str]:
        """Poll `systemctl show` until every property has the wanted value."""
        seen: dict[str, str] = {}

        def reached() -> bool:
            nonlocal seen
            seen = self.show(unit, *want)
            return all(seen.get(k) == v for k, v in want.items())

        assert wait_until(reached, timeout, 0.05), (
            f"{unit}: wanted {want} within {timeout}s, last {seen}\n{self.status(unit)}"
        )
        return seen


def _wait_for_boot(proc: subprocess.Popen[bytes], notify: NotifySocket,
                   console: Path, state: dict[str, int]) -> None:  # fmt: skip
    """Until nspawn reports READY=1 (the container's systemd finished booting,
    --notify-ready=yes) and the leader's PID (X_NSPAWN_LEADER_PID=)."""
    notify.sock.settimeout(0.1)
    deadline = time.monotonic() + BOOT_TIMEOUT
    ready = False
    while not (ready and "leader" in state):
        try:
            message = notify.sock.recv(4096).decode()
        except TimeoutError:
            message = ""
        for line in message.splitlines():
            if line.startswith("X_NSPAWN_LEADER_PID="):
                state["leader"] = int(line.partition("=")[2])
            ready = ready or line == "READY=1"
        if proc.poll() is not None:
            raise AssertionError(
                f"systemd-nspawn exited {proc.returncode} before the container was up:\n"
                f"{_tail(console)}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"no container up in {BOOT_TIMEOUT}s:\n{_tail(console)}")


def _halt(proc: subprocess.Popen[bytes], leader: int | None) -> None:
    """Halt the container and wait for systemd-nspawn to exit."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # nspawn: SIGRTMIN+3 to the container's systemd
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(HALT_TIMEOUT)
        return
    # Kill the container's PID 1, which nspawn then reaps (killing nspawn
    # first would orphan it, and PID 1 here reaps no orphans).  Only while it
    # is alive and still nspawn's child: no PID reuse.
    if leader is not None and _alive_child(leader, proc.pid):
        os.kill(leader, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(TIMEOUT)
            return
    proc.kill()
    proc.wait(TIMEOUT)


def _alive_child(pid: int, parent: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state, ppid = stat[stat.rindex(b")") + 2 :].split()[:2]
    return state not in (b"Z", b"X") and int(ppid) == parent


def _populated(cgroup: Path) -> bool:
    """Any live process in the cgroup or below (zombies do not count)."""
    for procs in cgroup.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            if procs.read_text().strip():
                return True
    return False


def _remove_cgroup(cgroup: Path) -> bool:
    for root, dirs, _ in os.walk(cgroup, topdown=False):
        for d in dirs:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(os.path.join(root, d))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(cgroup)
    return not cgroup.exists()


@contextlib.contextmanager
def _cgroups(name: str) -> Iterator[list[Path]]:
    """A cgroup NAME at the top of each hierarchy nspawn uses; removed afterwards,
    once nothing lives in it any more.  nspawn puts the container in a
    "payload" child of the cgroup it runs in, itself in "supervisor"."""
    made: list[Path] = []
    failed = True
    try:
        for hierarchy in _cgroup_hierarchies():
            if hierarchy is not None:
                try:
                    (hierarchy / name).mkdir()
                except OSError as e:
                    pytest.skip(f"cannot make a cgroup for the container in {hierarchy}: {e}")
                made.append(hierarchy / name)
        yield made
        failed = False
    finally:
        left = [c for c in made if not wait_until(lambda c=c: not _populated(c), TIMEOUT)]
        stuck = [c for c in made if not wait_until(lambda c=c: _remove_cgroup(c), 5.0)]
        # Not over the test's own failure, which says more.
        assert failed or not (left or stuck), f"cgroups not emptied {left}, not removed {stuck}"


def stage_tree(stage: Path) -> None:
    """What the upper layer starts with: the install steps of docs/systemd.md."""
    script = Path(sys.executable).parent / "qfuse"  # what `make install-helper` links
    assert script.exists(), f"needs the installed console script {script}"
    # `install` writes through a merged-/usr system's /sbin -> usr/sbin link
    # (the host's root is the lower layer): an sbin/ directory in the upper
    # layer would hide that link and everything in /usr/sbin.
    umount_helper = stage / os.path.realpath(UMOUNT_HELPER).lstrip("/")
    qfuse = stage / INSTALLED_QFUSE.lstrip("/")
    for d in (stage / "etc/systemd/system", stage / "etc/qfuse", qfuse.parent,
              umount_helper.parent):  # fmt: skip
        d.mkdir(parents=True, exist_ok=True)
    for d in [p for p in stage.rglob("*") if p.is_dir()]:
        d.chmod(0o755)  # the upper layer's directories give the merged ones their modes
    shutil.copyfile(SERVICE, stage / "etc/systemd/system" / SERVICE.name)
    (stage / "etc/systemd/system" / BOOT_TARGET).write_text(BOOT_TARGET_UNIT)
    shutil.copyfile(EXAMPLE_CONF, stage / "etc/qfuse/disk.conf")
    qfuse.symlink_to(script)
    shutil.copyfile(UMOUNT_SCRIPT, umount_helper)
    umount_helper.chmod(0o755)


def read_only_binds() -> list[str]:
    """This checkout, the venv and the Python it was made from (perhaps under
    /root/.pyenv), each once: whatever the console script needs to run."""
    paths: list[Path] = []
    for p in sorted({p.resolve() for p in (REPO, Path(sys.prefix), Path(sys.base_prefix))}):
        if not any(q in p.parents for q in paths):  # sorted: a parent comes first
            paths.append(p)
    return [f"--bind-ro={p}" for p in paths]


def nspawn_argv(root: Path, name: str, images: Path) -> list[str]:
    return [
        "systemd-nspawn",
        f"--directory={root}",
        f"--machine={name}",
        "--register=no",  # no systemd-machined on the host
        "--keep-unit",  # no host manager to make a scope: the cgroup is ours (_cgroups)
        "--private-network",
        "--link-journal=no",  # never touch the host's /var/log/journal
        "--console=read-only",
        "--notify-ready=yes",
        "--system-call-filter=bpf",  # DevicePolicy= needs BPF device programs
        "--bind=/dev/fuse",
        f"--bind={images}:{IMAGES}",
        *read_only_binds(),
        "--boot",
        "--",
        f"systemd.unit={BOOT_TARGET}",
        "systemd.log_color=0",
    ]


@contextlib.contextmanager
def booted_container(work: Path, images: Path) -> Iterator[Container]:
    """Boot the container (work/: stage, overlay mount points, console.log); halt
    it, wait for it and remove its cgroup when done."""
    reason = _why_no_container()
    if reason:
        pytest.skip(f"cannot boot a systemd container: {reason}")
    assert not set(",:") & set(str(work)), f"overlay options cannot name {work}"
    stage_tree(work / "stage")
    name = f"qfuse-test-{uuid.uuid4().hex[:8]}"
    console = work / "console.log"
    notify = NotifySocket()
    env = {
        "PATH": INSIDE_ENV["PATH"],
        "LANG": "C.UTF-8",
        "NOTIFY_SOCKET": "@" + notify.name,
        "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
    }
    state: dict[str, int] = {}
    try:
        with _cgroups(name) as cgroups:
            procs = [str(c / "cgroup.procs") for c in cgroups]
            argv = ["setpriv", "--pdeathsig", "TERM",
                    "unshare", "--mount", "--propagation", "private",
                    "sh", "-euc", OVERLAY_SCRIPT, "sh", str(work), *procs, "--",
                    *nspawn_argv(work / "root", name, images)]  # fmt: skip
            with open(console, "wb") as out:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True,
                )  # fmt: skip
            try:
                try:
                    _wait_for_boot(proc, notify, console, state)
                finally:
                    # Nobody reads it any more: nspawn's later status messages
                    # would fill it, and nspawn blocks on a full socket.
                    notify.close()
                yield Container(proc, state["leader"], console)
            finally:
                _halt(proc, state.get("leader"))
    finally:
        notify.close()


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """The host directory bound at /var/lib/images: the example's image, the
    raw view qemu-img makes of it, and data to write."""
    d = tmp_path / "images"
    d.mkdir()
    image = pattern_image(d / os.path.basename(IMAGE))
    (d / os.path.basename(EXPECTED)).write_bytes(convert_raw(image))
    (d / os.path.basename(CHUNK)).write_bytes(random_bytes(7, 1 << 20))
    return d


@pytest.fixture
def container(tmp_path: Path, images: Path) -> Iterator[Container]:
    work = tmp_path / "container"
    work.mkdir()
    with booted_container(work, images) as c:
        yield c


# -- the tests ---------------------------------------------------------------------------

# sd-messages.h: SD_MESSAGE_UNIT_PROCESS_EXIT, "Main process exited, code=..., status=...".
PROCESS_EXIT = "MESSAGE_ID=98e322203f7a4ed290d09fe03c09fe15"


def stop_cleanly(c: Container) -> None:
    """`systemctl stop`: qfuse handles the SIGTERM and exits with status 0 (not
    killed by it, which systemd would also call a success), nothing stays
    mounted.  The manager logs that exit only at debug level, and forgets the
    unit's exit status once it is stopped: so the journal is the witness."""
    invocation = c.show(UNIT, "InvocationID")["InvocationID"]
    c.run("systemd-analyze", "log-level", "debug")
    c.systemctl("stop", UNIT)
    assert c.show(UNIT, "ActiveState")["ActiveState"] == "inactive"
    assert not c.mounted(VIEW)
    matches = (f"UNIT={UNIT}", f"INVOCATION_ID={invocation}", PROCESS_EXIT, "COMMAND=ExecStart")
    assert wait_until(lambda: c.journal(*matches), 10.0), c.status(UNIT)
    (record,) = c.journal(*matches)
    exit_status = (record["EXIT_CODE"], record["EXIT_STATUS"])
    assert exit_status == ("exited", "0"), record["MESSAGE"]


def serves_and_takes_a_write(c: Container) -> None:
    """The view reads byte for byte what `qemu-img convert -O raw` makes of the
    image; 1 MiB written through it (dd, flushed by fsync) reads back."""
    c.run("cmp", VIEW, EXPECTED)
    c.run("dd", f"if={CHUNK}", f"of={VIEW}", "bs=64k", "seek=16", "conv=notrunc,fsync",
          "status=none")  # fmt: skip
    c.run("cmp", "--bytes=1048576", "--ignore-initial=1048576:0", VIEW, CHUNK)


def image_is_clean_and_written(images: Path) -> None:
    """On the host: `qemu-img check` is clean, and the image holds the write."""
    image = images / os.path.basename(IMAGE)
    qemu_img_check(image)
    raw = convert_raw(image)
    assert raw[:65536] == PATTERN
    assert raw[1 << 20 : 2 << 20] == (images / os.path.basename(CHUNK)).read_bytes()


def test_service_starts_serves_writes_and_stops_cleanly(
    container: Container, images: Path
) -> None:
    c = container
    loaded = c.show(UNIT, "FragmentPath", "Type")
    assert loaded == {"FragmentPath": f"/etc/systemd/system/{SERVICE.name}", "Type": "notify"}
    # Type=notify: `systemctl start` returns once qfuse sent READY=1.
    c.systemctl("start", UNIT)
    assert c.show(UNIT, "ActiveState", "SubState") == {
        "ActiveState": "active", "SubState": "running",
    }  # fmt: skip
    assert c.mounted(VIEW)
    serves_and_takes_a_write(c)
    stop_cleanly(c)
    # qfuse's own lines reached journald, priority taken from the <6> prefix.
    want = [
        ("6", f"{VIEW}: serving {IMAGE} (cache=writeback, read-write)"),
        ("6", "SIGTERM: unmounting"),
        ("6", f"{VIEW}: unmounted, {IMAGE} closed"),
    ]
    assert wait_until(lambda: c.qfuse_journal(UNIT) == want, 10.0), c.qfuse_journal(UNIT)
    image_is_clean_and_written(images)


def test_hardening_is_in_force_while_it_serves(container: Container) -> None:
    c = container
    c.systemctl("start", UNIT)
    main = c.show(UNIT, "MainPID", "ControlGroup")
    status = dict(
        line.split(":\t", 1)
        for line in c.run("cat", f"/proc/{main['MainPID']}/status").stdout.splitlines()
    )
    # CapabilityBoundingSet=, NoNewPrivileges=, and a seccomp filter
    # (SystemCallFilter=, RestrictAddressFamilies=, MemoryDenyWriteExecute=, ...).
    (line,) = [x for x in SERVICE.read_text().splitlines() if x.startswith("CapabilityBound")]
    names = line.partition("=")[2].split()
    assert int(status["CapBnd"], 16) == sum(1 << CAPABILITIES[n] for n in names), status
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    assert int(status["Seccomp_filters"]) >= 1
    # DevicePolicy=closed + DeviceAllow=/dev/fuse, a BPF program on the
    # service's cgroup: a process placed in that cgroup may open /dev/fuse but
    # not /dev/net/tun, which it may open outside it.
    procs = f"/sys/fs/cgroup{main['ControlGroup']}/cgroup.procs"
    probe = 'echo $$ >"$1" || exit 90; true 3<>"$2"'
    outside = c.run("sh", "-c", "true 3<>/dev/net/tun", check=False)
    assert outside.returncode == 0, f"control: /dev/net/tun must open here: {outside.stderr}"
    c.run("sh", "-c", probe, "sh", procs, "/dev/fuse")
    inside = c.run("sh", "-c", probe, "sh", procs, "/dev/net/tun", check=False)
    assert inside.returncode not in (0, 90), inside.stderr
    assert "Operation not permitted" in inside.stderr
    # All of it with the view serving.
    c.run("cmp", VIEW, EXPECTED)
    stop_cleanly(c)


def test_sigkill_restarts_it_and_the_view_serves_again(
    container: Container, images: Path
) -> None:
    c = container
    c.systemctl("start", UNIT)
    first = c.show(UNIT, "MainPID")["MainPID"]
    c.systemctl("kill", "--signal=KILL", UNIT)  # as the OOM killer would
    # Restart=on-failure: the unit waits RestartSec= in "auto-restart", after
    # ExecStopPost= has run and detached the dead mount the kill left.
    c.wait_for(UNIT, SubState="auto-restart", Result="signal")
    stop_post = c.show(UNIT, "ExecStopPost")["ExecStopPost"]  # its last run
    assert re.search(r" pid=[1-9]\d* ; code=exited ; status=0 ", stop_post), stop_post
    assert not c.mounted(VIEW)
    c.wait_for(UNIT, TIMEOUT + 5, NRestarts="1", ActiveState="active", SubState="running")
    assert c.show(UNIT, "MainPID")["MainPID"] != first
    assert c.mounted(VIEW)
    c.run("cmp", VIEW, EXPECTED)
    stop_cleanly(c)
    qemu_img_check(images / os.path.basename(IMAGE))


# -- the .mount unit and the fstab line: mount(8) under the manager ----------------------


# A unit that uses the view, as docs/systemd.md says to write one.
USER_UNIT = f"""\
[Unit]
Description=qfuse tests: reads the view
RequiresMountsFor={VIEW}

[Service]
Type=oneshot
ExecStart=/usr/bin/cmp --bytes=65536 {VIEW} {EXPECTED}
"""


def documented_fstab_line() -> str:
    """The fstab line of docs/systemd.md (the block under "# /etc/fstab")."""
    lines = SYSTEMD_DOC.read_text().splitlines()
    start = lines.index("# /etc/fstab")
    line = lines[start + 1]
    assert line.split()[:3] == [IMAGE, VIEW, "fuse.qfuse"], line
    return line


def mount_unit_mounts_serves_and_unmounts(c: Container, images: Path, unit: str) -> None:
    """`systemctl start UNIT`: mount(8) -> mount.fuse3 -> `qfuse IMAGE VIEW -o
    OPTS`, which returns once the view serves and leaves the daemon in the
    unit's cgroup.  `systemctl stop UNIT`: `umount -c VIEW` -> umount.fuse.qfuse
    -> `qfuse umount`, which returns once the daemon has closed the image; so
    the stop job ends with the daemon gone."""
    # Documented: systemd orders the mount after, and makes it require, the
    # filesystems holding the image and Where='s parent directory.
    requires = c.show(unit, "RequiresMountsFor")["RequiresMountsFor"].split()
    assert {IMAGE, IMAGES} <= set(requires), requires
    c.systemctl("start", unit)
    assert c.show(unit, "ActiveState", "SubState") == {
        "ActiveState": "active", "SubState": "mounted",
    }  # fmt: skip
    assert c.fstype(VIEW) == "fuse.qfuse"
    (daemon,) = c.unit_processes(unit)  # qfuse, in the background
    serves_and_takes_a_write(c)
    invocation = c.show(unit, "InvocationID")["InvocationID"]
    c.systemctl("stop", unit)
    assert c.show(unit, "ActiveState")["ActiveState"] == "inactive"
    assert not c.mounted(VIEW)
    # No waiting: the stop job itself waited for the daemon (without the
    # helper, umount returns as soon as the view is detached, and the manager
    # logs "Unit process N (qfuse) remains running after unit stopped").
    assert c.exited(daemon), c.journal_tail()
    leftovers = c.journal(f"UNIT={unit}", f"INVOCATION_ID={invocation}")
    assert not [r["MESSAGE"] for r in leftovers if "remains running" in r["MESSAGE"]]
    # The daemon logs to syslog (the journal), attributed to the unit by its cgroup.
    want = [
        ("6", f"{VIEW}: serving {IMAGE} (cache=writeback, read-write)"),
        ("6", f"{VIEW}: unmounted, {IMAGE} closed"),
    ]
    assert wait_until(lambda: c.qfuse_journal(unit) == want, 10.0), c.qfuse_journal(unit)
    image_is_clean_and_written(images)


def test_example_mount_unit_mounts_serves_and_unmounts(
    container: Container, images: Path
) -> None:
    c = container
    # As its comment says: Where= must exist as a regular file, and the file
    # name is Where= escaped.
    (images / os.path.basename(VIEW)).touch()
    escaped = c.run("systemd-escape", "--path", "--suffix=mount", VIEW).stdout.strip()
    assert escaped == MOUNT_UNIT
    c.write(f"/etc/systemd/system/{MOUNT_UNIT}", MOUNT_UNIT_FILE.read_text())
    c.systemctl("daemon-reload")
    loaded = c.show(MOUNT_UNIT, "FragmentPath", "What", "Where", "Type", "Options")
    assert loaded == {
        "FragmentPath": f"/etc/systemd/system/{MOUNT_UNIT}", "What": IMAGE, "Where": VIEW,
        "Type": "fuse.qfuse", "Options": "cache=writeback",
    }  # fmt: skip
    # Enabled ([Install]), local-fs.target wants it and is ordered after it:
    # the boot waits for the view, but goes on if it fails.
    c.systemctl("enable", MOUNT_UNIT)
    deps = c.show(MOUNT_UNIT, "WantedBy", "RequiredBy", "Before")
    assert "local-fs.target" in deps["WantedBy"].split()
    assert "local-fs.target" in deps["Before"].split()
    assert "local-fs.target" not in deps["RequiredBy"].split()
    mount_unit_mounts_serves_and_unmounts(c, images, MOUNT_UNIT)


def test_fstab_line_mounts_through_the_generated_unit(
    container: Container, images: Path
) -> None:
    c = container
    line = documented_fstab_line()
    (images / os.path.basename(VIEW)).touch()
    c.write("/etc/fstab", f"# docs/systemd.md\n{line}\n")
    c.systemctl("daemon-reload")  # runs systemd-fstab-generator
    loaded = c.show(MOUNT_UNIT, "SourcePath", "What", "Where", "Type", "WantedBy",
                    "RequiredBy", "Before")  # fmt: skip
    assert loaded["SourcePath"] == "/etc/fstab"
    assert (loaded["What"], loaded["Where"], loaded["Type"]) == (IMAGE, VIEW, "fuse.qfuse")
    # nofail: local-fs.target only wants the mount and is not ordered after
    # it, so the boot neither waits for the view nor fails with it.
    assert "nofail" in line.split()[3].split(",")
    assert "local-fs.target" in loaded["WantedBy"].split()
    assert "local-fs.target" not in loaded["RequiredBy"].split() + loaded["Before"].split()
    image = images / os.path.basename(IMAGE)
    aside = image.with_name("moved-aside.qcow2")
    image.rename(aside)
    try:
        c.systemctl("start", "local-fs.target")  # pulls the mount in again
        c.wait_for(MOUNT_UNIT, ActiveState="failed", Result="exit-code")  # no image
        assert c.show("local-fs.target", "ActiveState")["ActiveState"] == "active"
        assert not c.mounted(VIEW)
        # qfuse's one line, on mount(8)'s stderr, is in the journal as an error.
        errors = c.journal(f"_SYSTEMD_UNIT={MOUNT_UNIT}", "PRIORITY=3")
        assert [r["MESSAGE"] for r in errors if r["MESSAGE"].startswith(f"{IMAGE}: ")], errors
    finally:
        aside.rename(image)
    mount_unit_mounts_serves_and_unmounts(c, images, MOUNT_UNIT)
    # So a unit that uses the view says RequiresMountsFor=, which pulls the
    # mount in and orders the unit after it: it starts once the view serves.
    c.write("/etc/systemd/system/qfuse-test-user.service", USER_UNIT)
    c.systemctl("daemon-reload")
    c.systemctl("start", "qfuse-test-user.service")  # oneshot: fails if cmp does
    assert c.show(MOUNT_UNIT, "ActiveState")["ActiveState"] == "active"
    c.systemctl("stop", MOUNT_UNIT)
    assert not c.mounted(VIEW)
    qemu_img_check(image)
