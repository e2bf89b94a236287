"""The mount daemon's life: open, mount, serve, and always unmount.

In order:

1. Check the mountpoint, then open the image (every snapshot too, for the
   directory form) *before* anything is mounted: a bad image is one line
   and exit 1, with nothing mounted and the image untouched.
2. Mount (pyfuse3.init).  From here on, a ``finally`` unmounts
   (``pyfuse3.close(unmount=True)``), so no dead "Transport endpoint is not
   connected" mount is ever left behind by an error.
3. Serve under trio.  Readiness is proven, not assumed: a worker thread
   stat()s the mountpoint through the kernel, and only when our own getattr
   answered with the virtual size does the daemon report ready (exit 0 of
   `qfuse mount`, or ``READY=1`` to systemd in the foreground).
4. SIGTERM, SIGINT or SIGHUP calls pyfuse3.terminate(); an external
   ``fusermount3 -u`` ends pyfuse3.main() by itself.  Either way the
   requests in flight finish, then the image is flushed and closed, then
   the view is unmounted and the state file removed; exit 0.

Logged at INFO (one line each): serving, the stop signal, unmounted and
closed; requests only with ``--debug`` (debug.py).  See docs/concurrency.md
("The FUSE layer") for the why of each step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import stat
import sys
import tempfile
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pyfuse3
import trio

from qfuse.cli.mountopts import MountOptions
from qfuse.errors import QfuseError, UsageError
from qfuse.fuse import backlog, detach, runstate, vmdk
from qfuse.fuse.view import ImageFile, Node, TextFile, View

log = logging.getLogger(__name__)

# How long the view may take to answer its first stat before the mount is
# declared failed and undone.
READY_TIMEOUT = 30.0

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclasses.dataclass(frozen=True)
class MountSpec:
    image: str  # absolute
    mountpoint: str  # absolute, symlinks resolved
    directory: bool  # directory form (else the file form)
    options: MountOptions

    @property
    def read_only(self) -> bool:
        return self.options.read_only or self.options.snapshot is not None

    @property
    def stem(self) -> str:
        """The image's name in the directory form: ``disk.qcow2`` -> ``disk``."""
        name = os.path.basename(self.image)
        return name.removesuffix(".qcow2") or name


def mount(image: str, mountpoint: str, options: MountOptions) -> int:
    """`qfuse mount`: returns 0 once the view serves I/O (or after it ended, with -f)."""
    spec = _make_spec(image, mountpoint, options)
    if options.foreground:
        return serve(spec, _ForegroundReporter())
    return detach.spawn(lambda reporter: serve(spec, reporter))


def _make_spec(image: str, mountpoint: str, options: MountOptions) -> MountSpec:
    mountpoint = runstate.canonical_mountpoint(mountpoint)
    if runstate.mount_fstype(mountpoint) == "fuse.qfuse":
        # Checked before any stat: a stat of a hung mount would hang us too.
        raise QfuseError(mountpoint, "already mounted by qfuse ('qfuse umount' it first)")
    if os.path.islink(mountpoint):
        mountpoint = os.path.realpath(mountpoint)
    try:
        mode = os.stat(mountpoint).st_mode
    except FileNotFoundError:
        parent = os.path.dirname(mountpoint)
        if not os.path.isdir(parent):
            raise QfuseError(mountpoint, "its directory does not exist") from None
        directory = False
    else:
        if stat.S_ISDIR(mode):
            directory = True
        elif stat.S_ISREG(mode):
            directory = False
        else:
            raise QfuseError(mountpoint, "the mountpoint must be a regular file or a directory")
    if directory and options.snapshot is not None:
        raise UsageError(
            mountpoint,
            "snapshot= needs a file mountpoint; a directory mountpoint shows every snapshot",
        )
    return MountSpec(os.path.abspath(image), mountpoint, directory, options)


class _ForegroundReporter(detach.Reporter):
    """``--foreground``: tell systemd (Type=notify) when NOTIFY_SOCKET is set."""

    def __init__(self) -> None:
        self._notifier: Any = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier()

    def ready(self) -> None:
        log.debug("ready")
        if self._notifier is not None:
            self._notifier.notify("READY=1")

    def stopping(self) -> None:
        if self._notifier is not None:
            self._notifier.notify("STOPPING=1")


# -- the images ----------------------------------------------------------------


class _Images:
    """The engine images one mount uses; closes each exactly once."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def close(self) -> None:
        while self.items:
            image = self.items.pop()
            try:
                image.close()
            except Exception:
                log.exception("%s: closing the image failed", getattr(image, "path", "?"))

    async def flush(self) -> bool:
        """Flush every writable image; False if one failed (already logged)."""
        ok = True
        for image in self.items:
            if image.read_only:
                continue
            try:
                await getattr(image, "shutdown", image.flush)()
            except Exception as err:
                log.error("%s: flushing the image failed: %s", image.path, err)
                ok = False
        return ok


def _open_images(spec: MountSpec) -> tuple[_Images, list[Node]]:
    """Open what the view shows and build its nodes; nothing stays open on error."""
    from qfuse.engine import CacheMode, open_image

    cache = CacheMode(spec.options.cache)
    l2 = spec.options.l2_cache_size
    images = _Images()
    try:
        main = open_image(
            spec.image, cache=cache, read_only=spec.read_only,
            snapshot=spec.options.snapshot, l2_cache_size=l2,
        )  # fmt: skip
        images.items.append(main)
        if not spec.directory:
            size = main.virtual_size
            return images, [ImageFile(pyfuse3.ROOT_INODE, b"", main, spec.read_only, size)]
        nodes: list[Node] = [
            ImageFile(2, os.fsencode(f"{spec.stem}.raw"), main, spec.read_only, main.virtual_size)
        ]
        seen: set[str] = set()
        for snap in main.snapshots:
            if "/" in snap.name or "\0" in snap.name or not snap.name or snap.name in seen:
                log.warning("%s: snapshot %s (%r) cannot be shown by name; skipped",
                            spec.image, snap.id, snap.name)  # fmt: skip
                continue
            seen.add(snap.name)
            image = main.snapshot_view(snap.id, l2_cache_size=l2)
            images.items.append(image)
            name = os.fsencode(f"{spec.stem}@{snap.name}.raw")
            nodes.append(ImageFile(len(nodes) + 2, name, image, True, image.virtual_size))
        if spec.options.vmdk:
            nodes += _vmdk_nodes(nodes, first_inode=len(nodes) + 2)
        return images, nodes
    except BaseException:
        images.close()
        raise


def _vmdk_nodes(raw_nodes: list[Node], first_inode: int) -> list[Node]:
    """The directory form's descriptors: ``X.vmdk`` beside each ``X.raw``."""
    out: list[Node] = []
    for node in raw_nodes:
        raw_name = os.fsdecode(node.name)
        text = vmdk.descriptor(raw_name, node.size, node.read_only)
        name = os.fsencode(raw_name.removesuffix(".raw") + ".vmdk")
        out.append(TextFile(first_inode + len(out), name, text))
    return out


# -- mounting ------------------------------------------------------------------


def _fuse_options(spec: MountSpec) -> set[str]:
    # libfuse splits -o values on commas (a backslash escapes one) and
    # pyfuse3 passes them as ASCII: the fsname is cosmetic, so escape or
    # replace rather than refuse.
    fsname = spec.image.replace("\\", "\\\\").replace(",", "\\,")
    fsname = fsname.encode("ascii", "replace").decode("ascii")
    options = {"default_permissions", f"fsname={fsname}", "subtype=qfuse"}
    if spec.options.allow_other:
        options.add("allow_other")
    if spec.read_only and not spec.directory:
        # The kernel then refuses writes itself, and /proc/mounts says "ro".
        options.add("ro")
    return options


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Collect what libfuse prints on fd 2 (its errors) instead of showing it."""
    sys.stderr.flush()
    saved = os.dup(2)
    captured: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.extend(
                line.strip() for line in tmp.read().decode(errors="replace").splitlines()
            )


def _fuse_init(view: View, spec: MountSpec) -> None:
    with _captured_stderr() as messages:
        try:
            pyfuse3.init(view, spec.mountpoint, _fuse_options(spec))
            failed = None
        except RuntimeError as err:
            failed = err
    lines = [line for line in messages if line]
    if failed is not None:
        reason = lines[-1] if lines else str(failed)
        raise QfuseError(spec.mountpoint, f"cannot mount: {reason.removeprefix('fuse: ')}")
    for line in lines:
        log.warning("%s", line)


def _prepare_mountpoint(spec: MountSpec) -> bool:
    """Create the file mountpoint if it is missing; True if we created it."""
    if spec.directory:
        return False
    try:
        fd = os.open(spec.mountpoint, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _write_vmdk(spec: MountSpec, node: Node) -> str | None:
    """The file form's descriptor beside the view; returns its path."""
    if not spec.options.vmdk or spec.directory:
        return None
    path = vmdk.descriptor_path(spec.mountpoint)
    if os.path.lexists(path) and not vmdk.is_ours(path):
        raise QfuseError(path, "exists and was not written by qfuse; not replacing it")
    text = vmdk.descriptor(os.path.basename(spec.mountpoint), node.size, node.read_only)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _view_class(debug: bool) -> type[View]:
    if not debug:
        return View
    from qfuse.fuse.debug import with_request_log

    return with_request_log(View)


def serve(spec: MountSpec, reporter: detach.Reporter) -> int:
    """Open, mount, serve until unmounted or signalled, clean up; the exit status.

    Raises QfuseError (with nothing left mounted) if the view never got
    ready; afterwards, failures are logged and give exit status 1.
    """
    images, nodes = _open_images(spec)
    try:
        view = _view_class(spec.options.debug)(spec.image, nodes, directory=spec.directory)
        early = _EarlySignals()
        created = _prepare_mountpoint(spec)
        try:
            _fuse_init(view, spec)
        except BaseException:
            if created:
                os.unlink(spec.mountpoint)
            raise
        from qfuse.engine import hostfile

        hostfile.run_direct_io_inline_when(backlog.queue_empty_probe())
        record = None
        vmdk_path = None
        served = False
        try:
            record = runstate.write_record(spec.mountpoint, spec.image)
            vmdk_path = _write_vmdk(spec, nodes[0])
            expected = None if spec.directory else nodes[0].size
            status = trio.run(
                _serve, spec.mountpoint, expected, images, reporter, early, _summary(spec)
            )
            served = True
            return status
        finally:
            # Flushed inside _serve; now close, then unmount (a no-op when
            # fusermount3 -u already did), then forget the mount.
            images.close()
            pyfuse3.close(unmount=True)
            if created and not served:
                with contextlib.suppress(OSError):
                    os.unlink(spec.mountpoint)
            if record is not None:
                runstate.remove_record(record)
            if vmdk_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(vmdk_path)
            if served:
                log.info("%s: unmounted, %s closed", spec.mountpoint, spec.image)
    finally:
        images.close()


def _summary(spec: MountSpec) -> str:
    """The one line logged once the view serves."""
    what = [f"cache={spec.options.cache}", "read-only" if spec.read_only else "read-write"]
    if spec.options.snapshot is not None:
        what.append(f"snapshot {spec.options.snapshot}")
    return f"{spec.mountpoint}: serving {spec.image} ({', '.join(what)})"


class _EarlySignals:
    """Catch stop signals between mounting and trio's own signal receiver.

    Without this, a SIGTERM in that window would kill the process with the
    default action and leave a dead mount.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum


async def _serve(
    mountpoint: str,
    expected_size: int | None,
    images: _Images,
    reporter: detach.Reporter,
    early: _EarlySignals,
    summary: str,
) -> int:
    ready = False
    failure: QfuseError | None = None
    status = 0
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_fuse_main, nursery.cancel_scope)
            nursery.start_soon(_stop_on_signal, early)
            await _wait_serving(mountpoint, expected_size)
            reporter.ready()
            ready = True
            # After ready(): a background daemon logs to syslog by now, so
            # `qfuse mount` itself stays silent.
            log.info("%s", summary)
    except* QfuseError as group:
        failure = _first(group)
    except* Exception as group:
        # pyfuse3.main() itself failed (the handlers raise only FUSEError).
        log.error("%s: the FUSE loop failed", mountpoint, exc_info=_first(group))
        failure = QfuseError(mountpoint, f"the FUSE loop failed: {_first(group)}")
        status = 1
    finally:
        reporter.stopping()
        with trio.CancelScope(shield=True):
            if not await images.flush():
                status = 1
    if not ready:
        raise failure or QfuseError(mountpoint, "unmounted before the view was ready")
    return status


def _first(group: BaseExceptionGroup[Any]) -> Any:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _fuse_main(scope: trio.CancelScope) -> None:
    """Serve requests until unmounted or terminated, then end the rest."""
    await pyfuse3.main()
    scope.cancel()


async def _stop_on_signal(early: _EarlySignals) -> None:
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        if early.received is not None:
            _terminate(early.received)
        async for signum in signals:
            _terminate(signum)


def _terminate(signum: int) -> None:
    log.info("%s: unmounting", signal.Signals(signum).name)
    pyfuse3.terminate()


async def _wait_serving(mountpoint: str, expected_size: int | None) -> None:
    """Return once the kernel has routed a stat of the mountpoint to us."""
    try:
        with trio.fail_after(READY_TIMEOUT):
            # In a thread: the stat blocks until our own loop answers it.
            st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
    except trio.TooSlowError:
        raise QfuseError(
            mountpoint, f"the view did not answer within {READY_TIMEOUT:.0f} s"
        ) from None
    except OSError as err:
        raise QfuseError(mountpoint, f"the view does not answer: {err.strerror}") from None
    if expected_size is None:
        ok = stat.S_ISDIR(st.st_mode)
    else:
        ok = stat.S_ISREG(st.st_mode) and st.st_size == expected_size
    if not ok:
        raise QfuseError(mountpoint, "the mounted view does not look like ours")
