"""Running the daemon in the background, and telling the caller how it went.

`qfuse mount` without ``--foreground`` forks before anything else happens
(before the image is opened and before trio starts: fork and threads do not
mix).  The child starts a new session, moves to ``/`` and does the whole
mount; the parent waits on a pipe for one line:

* ``OK`` — the view answered a stat through the kernel: exit 0;
* ``ERR <status> <message>`` — the mount failed and was undone: print the
  message, exit with the status;
* end of file without a line — the child died; say so, exit 1.

After ``OK`` the child points its stdin, stdout and stderr at /dev/null (so
that ``$(qfuse mount ...)`` and pipes see end of file) and logs to syslog
through /dev/log if there is one, else nowhere.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from qfuse.errors import QfuseError

log = logging.getLogger(__name__)


class Reporter:
    """How the daemon says "ready" and "stopping"; the foreground one is in daemon.py."""

    def ready(self) -> None:
        pass

    def stopping(self) -> None:
        pass


class _PipeReporter(Reporter):
    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def _send(self, line: str) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.write(fd, line.encode(errors="replace") + b"\n")
        except OSError:
            pass  # the caller is gone (killed); nobody left to tell
        finally:
            os.close(fd)

    @property
    def pending(self) -> bool:
        return self.fd is not None

    def ready(self) -> None:
        self._send("OK")
        _detach_stdio()
        _log_to_syslog()

    def fail(self, status: int, message: str) -> None:
        # One line: the parent prints exactly this after "qfuse: ".
        self._send(f"ERR {status} {' '.join(message.split())}")


def _detach_stdio() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _log_to_syslog() -> None:
    root = logging.getLogger()
    handler: logging.Handler = logging.NullHandler()
    if os.path.exists("/dev/log"):
        try:
            handler = logging.handlers.SysLogHandler(
                "/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON
            )
            handler.setFormatter(logging.Formatter("qfuse[%(process)d]: %(message)s"))
        except OSError:
            handler = logging.NullHandler()
    root.handlers[:] = [handler]


def spawn(run: Callable[[Reporter], int]) -> int:
    """Run `run(reporter)` in a detached child; return once it is ready or failed.

    Returns 0 when the child reported ready; raises QfuseError (with the
    child's exit status) when it reported a failure or died.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(run, write_fd)
    os.close(write_fd)
    return _wait_for_child(pid, read_fd)


def _child(run: Callable[[Reporter], int], write_fd: int) -> NoReturn:
    reporter = _PipeReporter(write_fd)
    status = 1
    try:
        os.setsid()
        os.chdir("/")
        status = run(reporter)
        if reporter.pending:
            reporter.fail(1, "the daemon stopped before the view was ready")
    except QfuseError as err:
        status = err.exit_status
        reporter.fail(status, str(err))
    except OSError as err:
        reporter.fail(1, f"{err.filename}: {err.strerror}" if err.filename else str(err))
    except Exception as err:
        log.exception("internal error")
        reporter.fail(1, f"internal error: {type(err).__name__}: {err}")
    finally:
        # Never return into the parent's code path.
        logging.shutdown()
        os._exit(status)


def _wait_for_child(pid: int, read_fd: int) -> int:
    with os.fdopen(read_fd, "rb") as pipe:
        try:
            line = pipe.readline().decode(errors="replace").rstrip("\n")
        except KeyboardInterrupt:
            # Ctrl-C while mounting: let the child undo the mount in order.
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
            raise
    if line == "OK":
        return 0
    _, wait_status = os.waitpid(pid, 0)
    if line.startswith("ERR "):
        _, status, message = line.split(" ", 2)
        err = QfuseError(None, message)
        err.exit_status = int(status) or 1
        raise err
    if os.WIFSIGNALED(wait_status):
        how = f"was killed by {signal.Signals(os.WTERMSIG(wait_status)).name}"
    else:
        how = f"exited with status {os.waitstatus_to_exitcode(wait_status)}"
    raise QfuseError(None, f"the mount daemon {how} before the view was ready")
