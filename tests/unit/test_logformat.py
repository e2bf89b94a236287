"""The stderr log format: ``qfuse: message``, or journald's ``<N>message``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from qfuse.cli.logformat import StderrFormatter, error_line, priority, stderr_is_journal


def record(level: int, message: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("qfuse.fuse.daemon", level, __file__, 1, message, (), exc_info)


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.CRITICAL, "<2>"),
        (logging.ERROR, "<3>"),
        (logging.WARNING, "<4>"),
        (logging.INFO, "<6>"),
        (logging.DEBUG, "<7>"),
    ],
)
def test_journal_lines_carry_the_syslog_priority(level: int, prefix: str) -> None:
    formatter = StderrFormatter(journal=True, debug=False)
    assert formatter.format(record(level, "disk.raw: serving")) == f"{prefix}disk.raw: serving"


def test_levels_between_the_named_ones_round_down() -> None:
    assert priority(logging.INFO + 5) == 6
    assert priority(logging.DEBUG - 5) == 7


def test_plain_lines_name_the_program() -> None:
    formatter = StderrFormatter(journal=False, debug=False)
    assert formatter.format(record(logging.WARNING, "x: skipped")) == "qfuse: x: skipped"


def test_debug_lines_name_the_logger() -> None:
    journal = StderrFormatter(journal=True, debug=True)
    assert journal.format(record(logging.DEBUG, "read(1)")) == "<7>qfuse.fuse.daemon: read(1)"
    plain = StderrFormatter(journal=False, debug=True).format(record(logging.DEBUG, "read(1)"))
    assert plain.endswith(" qfuse.fuse.daemon DEBUG: read(1)")


def test_every_traceback_line_gets_the_priority() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError as err:
        text = StderrFormatter(journal=True, debug=False).format(
            record(logging.ERROR, "internal error", err)
        )
    lines = text.split("\n")
    assert len(lines) > 2
    assert lines[0] == "<3>internal error"
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>RuntimeError: boom"


def test_error_line() -> None:
    assert error_line("disk.qcow2: bad", journal=False) == "qfuse: disk.qcow2: bad"
    assert error_line("disk.qcow2: bad", journal=True) == "<3>disk.qcow2: bad"


def test_journal_stream_must_be_this_stderr(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with open(path, "wb") as f:
        st = os.fstat(f.fileno())
        this = f"{st.st_dev}:{st.st_ino}"
        assert stderr_is_journal({"JOURNAL_STREAM": this}, fd=f.fileno())
        # Inherited from a unit, but stderr now goes elsewhere: no prefixes.
        other = f"{st.st_dev}:{st.st_ino + 1}"
        assert not stderr_is_journal({"JOURNAL_STREAM": other}, fd=f.fileno())
        assert not stderr_is_journal({"INVOCATION_ID": "0" * 32}, fd=f.fileno())
        for bad in ("", "x:y", f"{st.st_dev}", f":{st.st_ino}"):
            assert not stderr_is_journal({"JOURNAL_STREAM": bad}, fd=f.fileno())
    assert not stderr_is_journal({"JOURNAL_STREAM": this}, fd=987654)  # not open


def test_per_request_logging_is_off_the_path_without_debug() -> None:
    from qfuse.fuse.daemon import _view_class
    from qfuse.fuse.debug import HANDLERS
    from qfuse.fuse.view import View

    assert _view_class(False) is View  # no wrapper, no log call per request
    logged = _view_class(True)
    assert issubclass(logged, View)
    for name in HANDLERS:
        assert getattr(logged, name) is not getattr(View, name), name
