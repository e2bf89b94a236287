"""What qfuse's lines on stderr look like: ``qfuse: message``, or ``<6>message`` for journald.

One event is one line.  On a terminal or in a file a line reads ``qfuse:
message`` (with ``--debug``: time, logger name and level too).  Under systemd,
when stderr is the journal's stream, each line instead starts with its syslog
priority, ``<3>`` error, ``<4>`` warning, ``<6>`` info, ``<7>`` debug
(sd-daemon(3)'s ``SD_ERR`` ...), which journald strips and records as the
entry's priority; the journal already names the program, so no ``qfuse:``.

"stderr is the journal" is decided the way systemd.exec(5) documents for
``$JOURNAL_STREAM``: the variable holds the device and inode of the stream
systemd connected, and it must match what fd 2 is *now*.  ``$INVOCATION_ID``
alone is not enough, nor is the variable merely being set: both are
inherited by children whose stderr is a pipe or a file (a test run started
from a unit, ``StandardError=file:``), where a ``<6>`` would be noise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

# syslog(3) priorities, as sd-daemon.h spells them.
SD_CRIT, SD_ERR, SD_WARNING, SD_INFO, SD_DEBUG = 2, 3, 4, 6, 7


def stderr_is_journal(environ: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """True if `fd` is the stream systemd connected to the journal ($JOURNAL_STREAM)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not (sep and dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def priority(levelno: int) -> int:
    """The syslog priority for a `logging` level."""
    if levelno >= logging.CRITICAL:
        return SD_CRIT
    if levelno >= logging.ERROR:
        return SD_ERR
    if levelno >= logging.WARNING:
        return SD_WARNING
    if levelno >= logging.INFO:
        return SD_INFO
    return SD_DEBUG


class StderrFormatter(logging.Formatter):
    """``qfuse: message``, or ``<N>message`` on every line when `journal`."""

    def __init__(self, *, journal: bool, debug: bool) -> None:
        if journal:
            fmt = "%(name)s: %(message)s" if debug else "%(message)s"
        elif debug:
            fmt = "%(asctime)s %(name)s %(levelname)s: %(message)s"
        else:
            fmt = "qfuse: %(message)s"
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.journal:
            return text
        # A traceback's lines each reach journald as an entry of their own:
        # give every one the record's priority.
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


def error_line(message: str, *, journal: bool) -> str:
    """The one line a failed command prints on stderr."""
    return f"<{SD_ERR}>{message}" if journal else f"qfuse: {message}"
