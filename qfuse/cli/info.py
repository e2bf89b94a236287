"""`qfuse info`: print what `qfuse.engine.info.describe` found.

The dicts use `qemu-img info --output json`'s field names; the human form
copies qemu-img 7.2's layout line for line (block/qapi.c,
bdrv_image_info_dump), so scripts and eyes used to one read the other.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from qfuse.format.snapshots import escape_name


def run_info(path: str, *, output: str, backing_chain: bool) -> int:
    from qfuse.engine.info import describe

    infos = describe(path, backing_chain)
    if output == "json":
        print(format_json(infos, backing_chain))
    else:
        print(format_human(infos), end="")
    return 0


def format_json(infos: Sequence[Mapping[str, Any]], backing_chain: bool) -> str:
    """A JSON list with --backing-chain, else the one object, as qemu-img prints."""
    return json.dumps(list(infos) if backing_chain else infos[0], indent=4)


def size_to_str(value: int) -> str:
    """qemu's size_to_str(): ``"64 MiB"``, ``"332 KiB"``, ``"1.5 GiB"``, ``"0 B"``."""
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    # frexp's exponent minus one is floor(log2(value * 1024 / 1000)): this
    # switches to the next unit once the integer part reaches 1000.
    _, exponent = math.frexp(value / (1000.0 / 1024.0))
    index = max(0, min(len(suffixes) - 1, (exponent - 1) // 10))
    return f"{value / (1 << (index * 10)):0.3g} {suffixes[index]}B"


def _snapshot_line(snap: Mapping[str, Any]) -> str:
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.get("date-sec", 0)))
    clock_ns = snap.get("vm-clock-sec", 0) * 1_000_000_000 + snap.get("vm-clock-nsec", 0)
    secs = clock_ns // 1_000_000_000
    clock = (
        f"{secs // 3600:02d}:{(secs // 60) % 60:02d}:{secs % 60:02d}."
        f"{(clock_ns // 1_000_000) % 1000:03d}"
    )
    icount = str(snap["icount"]) if "icount" in snap else ""
    size = size_to_str(snap.get("vm-state-size", 0))
    # C's printf pads by bytes: a name with non-ASCII letters gets fewer spaces.
    snap_id = _pad_bytes(escape_name(snap["id"]), 9)
    name = _pad_bytes(escape_name(snap["name"]), 16)
    return f"{snap_id} {name} {size:>8}{date:>20}{clock:>13}{icount:>11}"


def _pad_bytes(text: str, width: int) -> str:
    """`text` left-aligned in `width` bytes of UTF-8, as ``%-*s`` does."""
    return text + " " * max(0, width - len(text.encode("utf-8", "replace")))


def snapshot_table_lines(snapshots: Sequence[Mapping[str, Any]]) -> list[str]:
    """qemu-img's snapshot list (bdrv_snapshot_dump), as `info` and
    `snapshot -l` print it: a title, the column heads, one line each.  Names
    and IDs with control characters are escaped (`escape_name`)."""
    return [
        "Snapshot list:",
        f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}",
        *(_snapshot_line(snap) for snap in snapshots),
    ]


def _dump_value(value: Any, level: int, lines: list[str], prefix: str) -> None:
    """qemu's dump_qobject: dashes in keys become spaces, 4 spaces a level.

    `prefix` is the ``key:`` line at `level`; a dict's or list's members go
    one level deeper.
    """
    pad = " " * ((level + 1) * 4)
    composite = isinstance(value, dict | list)
    if not composite:
        if isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        lines.append(f"{prefix} {text}")
        return
    lines.append(prefix)
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        label = key.replace("-", " ") if isinstance(key, str) else f"[{key}]"
        _dump_value(item, level + 1, lines, f"{pad}{label}:")


def format_one(info: Mapping[str, Any]) -> str:
    virtual = info["virtual-size"]
    actual = info.get("actual-size")
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {size_to_str(virtual)} ({virtual} bytes)",
        f"disk size: {'unavailable' if actual is None else size_to_str(actual)}",
    ]
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    backing = info.get("backing-filename")
    if backing:
        full = info.get("full-backing-filename")
        if full is None:
            lines.append(f"backing file: {backing} (cannot determine actual path)")
        elif full != backing:
            lines.append(f"backing file: {backing} (actual path: {full})")
        else:
            lines.append(f"backing file: {backing}")
        if info.get("backing-filename-format"):
            lines.append(f"backing file format: {info['backing-filename-format']}")
    snapshots = info.get("snapshots")
    if snapshots:
        lines.extend(snapshot_table_lines(snapshots))
    specific = info.get("format-specific", {}).get("data")
    if specific:
        lines.append("Format specific information:")
        for key, value in specific.items():
            _dump_value(value, 1, lines, f"    {key.replace('-', ' ')}:")
    return "\n".join(lines) + "\n"


def format_human(infos: Sequence[Mapping[str, Any]]) -> str:
    """Each image as qemu-img prints it, a blank line between chain members."""
    return "\n".join(format_one(info) for info in infos)
