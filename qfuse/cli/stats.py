"""`qfuse stats MOUNTPOINT`: a mounted view's live statistics.

The daemon publishes each image view's statistics as the extended attribute
``user.qfuse.stats`` (one JSON object, built by
`qfuse.fuse.view.ImageFile.statistics`), so this command needs no IPC: one
getxattr per view file.  MOUNTPOINT is a file-form mountpoint, one view file
of a directory-form mount, or a directory-form mountpoint (every image view
in it, by name).

Only a path on a qfuse mount is read: a copy made with ``cp -a`` carries a
stale copy of the attribute, and must not pass for a live view.  Nothing
here reads the image or stats a path beyond what the answer needs.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
from collections.abc import Mapping
from typing import Any

from qfuse.errors import QfuseError

FSTYPE = "fuse.qfuse"
STATS_XATTR = "user.qfuse.stats"  # qfuse.fuse.view.STATS_XATTR, without importing pyfuse3

_NO_ATTRIBUTE = {errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP}


def register(commands: Any) -> None:
    stats = commands.add_parser(
        "stats",
        help="show a mounted view's live statistics",
        description="Show the statistics of the view mounted at MOUNTPOINT: requests served, "
        "bytes moved, flushes, L2 and refcount cache use, allocation.  The same JSON is the "
        f"extended attribute {STATS_XATTR} of each view file.",
        allow_abbrev=False,
    )
    stats.add_argument("mountpoint", metavar="MOUNTPOINT")
    stats.add_argument("--output", choices=("human", "json"), default="human")
    stats.set_defaults(func=_cmd_stats)


def _cmd_stats(args: argparse.Namespace) -> int:
    from qfuse.cli.main import setup_logging

    setup_logging(False)
    return run_stats(args.mountpoint, output=args.output)


def run_stats(path: str, *, output: str) -> int:
    where, views = collect(path)
    if output == "json":
        # A view file: its object.  A directory: an object keyed by file name.
        print(json.dumps(views if where is not None else views[""], indent=4))
    else:
        text = "\n".join(
            format_human(os.path.join(where, name) if where is not None else path, stats)
            for name, stats in views.items()
        )
        print(text, end="")
    return 0


def collect(path: str) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """(None, {"": stats}) for a view file; (the mountpoint, {name: stats}) for a
    directory-form mountpoint, one entry per image view in it."""
    from qfuse.fuse import runstate

    if os.path.islink(path):
        path = os.path.realpath(path)
    os.lstat(path)  # a missing path: one line, from main
    where = runstate.canonical_mountpoint(path)
    if runstate.mount_fstype(where) == FSTYPE:
        if not os.path.isdir(where):
            return None, {"": read_stats(where)}
        views = {}
        for name in sorted(os.listdir(where)):
            view = os.path.join(where, name)
            if STATS_XATTR in os.listxattr(view):
                views[name] = read_stats(view)
        return where, views
    if runstate.mount_fstype(os.path.dirname(where)) == FSTYPE and not os.path.isdir(where):
        return None, {"": read_stats(where)}
    raise QfuseError(path, "not a qfuse mount (see 'qfuse mount')")


def read_stats(view: str) -> dict[str, Any]:
    """The JSON object in `view`'s statistics attribute."""
    try:
        raw = os.getxattr(view, STATS_XATTR)
    except OSError as err:
        if err.errno in _NO_ATTRIBUTE:
            raise QfuseError(view, "not an image view (no statistics)") from None
        raise
    try:
        stats = json.loads(raw)
    except ValueError:
        raise QfuseError(view, f"unreadable {STATS_XATTR} attribute") from None
    if not isinstance(stats, dict):
        raise QfuseError(view, f"unreadable {STATS_XATTR} attribute")
    return stats


# -- the human form --------------------------------------------------------------


def _size(value: int) -> str:
    from qfuse.cli.info import size_to_str

    return f"{size_to_str(value)} ({value} bytes)"


def _cache_rows(caches: Mapping[str, Mapping[str, int]]) -> list[tuple[str, str]]:
    columns = ("hits", "misses", "evictions", "dirty", "cached")
    cells = {
        label: [str(cache.get(c, 0)) for c in columns[:-1]]
        + [f"{cache.get('cached', 0)}/{cache.get('capacity', 0)}"]
        for label, cache in caches.items()
    }
    widths = [max(len(c), *(len(row[i]) for row in cells.values())) for i, c in enumerate(columns)]
    rows = [("", "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))]
    for label, row in cells.items():
        rows.append((label, "  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True))))
    return rows


def format_human(view: str, stats: Mapping[str, Any]) -> str:
    """A short table: one fact a line, labels aligned, then the two caches."""
    requests = stats.get("requests", {})
    rows: list[tuple[str, str]] = [
        ("view", view),
        ("image", str(stats.get("image"))),
    ]
    if stats.get("snapshot") is not None:
        rows.append(("snapshot", str(stats["snapshot"])))
    rows += [
        ("virtual size", _size(stats.get("virtual_size", 0))),
        ("allocated", _size(stats.get("allocated_bytes", 0))),
        ("cluster size", str(stats.get("cluster_size"))),
        ("cache mode", str(stats.get("cache_mode"))),
        ("read-only", "yes" if stats.get("read_only") else "no"),
        ("requests", ", ".join(f"{kind} {count}" for kind, count in requests.items())),
        ("bytes read", _size(stats.get("bytes_read", 0))),
        ("bytes written", _size(stats.get("bytes_written", 0))),
        ("flushes", str(stats.get("flushes", 0))),
        ("pending frees", str(stats.get("pending_frees", 0))),
    ]
    rows += _cache_rows(
        {"L2 cache": stats.get("l2_cache", {}), "refcount cache": stats.get("refcount_cache", {})}
    )
    width = max(len(label) for label, _ in rows)
    return "".join(f"{label:<{width}}  {value}\n" for label, value in rows)
