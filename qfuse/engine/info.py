"""`describe`: what `qemu-img info --output json` says of an image.

Reads only the header cluster and the snapshot table of each file (the
checks of `read_metadata` apply), in qemu-img's field names and order.
"""

from __future__ import annotations

import os
from typing import Any

from qfuse.engine.chain import MAX_BACKING_FILES
from qfuse.engine.hostfile import HostFile
from qfuse.engine.metadata import read_metadata
from qfuse.errors import FormatError, ImageError
from qfuse.format.header import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    MAGIC,
)

_NO_ICOUNT = (1 << 64) - 1


def describe(path: str, backing_chain: bool = False) -> list[dict[str, Any]]:
    """One dict per image: the image, then (with `backing_chain`) its backing files."""
    result: list[dict[str, Any]] = []
    fmt: str | None = None
    seen: set[tuple[int, int]] = set()
    while True:
        info, backing, backing_fmt = _describe_one(path, fmt)
        result.append(info)
        if not backing_chain or backing is None:
            return result
        st = os.stat(path)
        seen.add((st.st_dev, st.st_ino))
        if len(result) > MAX_BACKING_FILES:
            raise ImageError(path, f"backing chain is deeper than {MAX_BACKING_FILES} files")
        path, fmt = backing, backing_fmt
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ImageError(path, exc.strerror or str(exc)) from None
        if (st.st_dev, st.st_ino) in seen:
            raise ImageError(path, "backing chain loops back to this file")


def _describe_one(path: str, fmt: str | None) -> tuple[dict[str, Any], str | None, str | None]:
    file = HostFile(path)
    try:
        if fmt is None:
            fmt = "qcow2" if file.pread_sync(0, 4) == MAGIC else "raw"
        if fmt == "raw":
            info: dict[str, Any] = {
                "virtual-size": file.size(),
                "filename": path,
                "format": "raw",
                "actual-size": file.stat().st_blocks * 512,
                "dirty-flag": False,
            }
            return info, None, None
        try:
            meta = read_metadata(file)
        except FormatError as exc:
            raise ImageError(path, str(exc)) from None
        actual = file.stat().st_blocks * 512
    finally:
        file.close()
    header = meta.header
    info = {}
    backing_path = None
    if meta.backing_name is not None and meta.extensions.backing_format:
        info["backing-filename-format"] = meta.extensions.backing_format
    if meta.snapshots:
        info["snapshots"] = [snapshot_info(s) for s in meta.snapshots]
    info["virtual-size"] = header.size
    info["filename"] = path
    info["cluster-size"] = header.cluster_size
    info["format"] = "qcow2"
    data: dict[str, Any] = {"compat": "1.1" if header.version >= 3 else "0.10",
                            "compression-type": COMPRESSION_NAMES[header.compression_type]}
    if header.version >= 3:
        data["lazy-refcounts"] = bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS)
    data["refcount-bits"] = header.refcount_bits
    if header.has_data_file and meta.extensions.data_file:
        data["data-file"] = meta.extensions.data_file
        data["data-file-raw"] = bool(header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)
    if header.version >= 3:
        data["corrupt"] = bool(header.incompatible_features & INCOMPAT_CORRUPT)
        data["extended-l2"] = header.extended_l2
    info["actual-size"] = actual
    info["format-specific"] = {"type": "qcow2", "data": data}
    if meta.backing_name is not None:
        backing_path = os.path.join(os.path.dirname(path), meta.backing_name)
        info["full-backing-filename"] = backing_path
        info["backing-filename"] = meta.backing_name
    info["dirty-flag"] = bool(header.incompatible_features & INCOMPAT_DIRTY)
    return info, backing_path, meta.extensions.backing_format


def snapshot_info(snap: Any) -> dict[str, Any]:
    """One snapshot as `qemu-img info --output json` lists it."""
    info: dict[str, Any] = {}
    if len(snap.extra_data) >= 24:
        icount = int.from_bytes(snap.extra_data[16:24], "big")
        if icount != _NO_ICOUNT:
            info["icount"] = icount
    info.update({
        "vm-clock-nsec": snap.vm_clock_nsec % 1_000_000_000,
        "name": snap.name,
        "date-sec": snap.date_sec,
        "date-nsec": snap.date_nsec,
        "vm-clock-sec": snap.vm_clock_nsec // 1_000_000_000,
        "id": snap.id,
        "vm-state-size": snap.vm_state_size,
    })
    return info
