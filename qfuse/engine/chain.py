"""Opening an image with its backing chain.

Rules (issue 2): names resolve against the overlay's directory; the format
comes from the backing-format extension, or is qcow2 when the file has the
qcow2 magic; a raw backing file with no recorded format is refused (never
guess raw, as QEMU now also refuses); `json:` and `proto://` names are
refused; loops and chains of more than 16 backing files are refused.
"""

from __future__ import annotations

import os
import re

from qfuse.engine.hostfile import CacheMode
from qfuse.engine.qcow2 import Qcow2Image, resolve_relative
from qfuse.engine.raw import RawImage
from qfuse.errors import ImageError
from qfuse.format.header import MAGIC

MAX_BACKING_FILES = 16
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def open_image(path: str, *, cache: CacheMode = CacheMode.WRITEBACK, read_only: bool = True,
               snapshot: str | None = None, l2_cache_size: int | None = None) -> Qcow2Image:
    """Open a qcow2 image and its whole backing chain; `ImageError` if anything is wrong."""
    return _open_qcow2(path, cache, read_only, snapshot, l2_cache_size, [])


def _file_identity(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ImageError(path, exc.strerror or str(exc)) from None
    return st.st_dev, st.st_ino


def _open_qcow2(path: str, cache: CacheMode, read_only: bool, snapshot: str | None,
                l2_cache_size: int | None, chain: list[tuple[int, int]]) -> Qcow2Image:
    identity = _file_identity(path)
    if identity in chain:
        raise ImageError(path, "backing chain loops back to this file")
    chain.append(identity)
    image = Qcow2Image(path, cache=cache, read_only=read_only, snapshot=snapshot,
                       l2_cache_size=l2_cache_size)
    try:
        if image.backing_name is not None:
            image.backing = _open_backing(image, cache, chain)
    except BaseException:
        image.close()
        raise
    return image


def _open_backing(image: Qcow2Image, cache: CacheMode,
                  chain: list[tuple[int, int]]) -> Qcow2Image | RawImage:
    name = image.backing_name
    assert name is not None
    if name.startswith("json:"):
        raise ImageError(image.path, "backing file given as a json: specification "
                         "is not supported")
    if _PROTOCOL.match(name):
        raise ImageError(image.path, f"backing file {name!r} is a network or protocol "
                         "URL, which is not supported")
    if len(chain) > MAX_BACKING_FILES:
        raise ImageError(image.path, f"backing chain is deeper than {MAX_BACKING_FILES} files")
    path = resolve_relative(image.path, name)
    fmt = image.backing_format
    try:
        if fmt is None:
            fmt = _probe_qcow2(path, image.path)
        if fmt == "qcow2":
            return _open_qcow2(path, cache, True, None, None, chain)
        if fmt == "raw":
            if _file_identity(path) in chain:
                raise ImageError(path, "backing chain loops back to this file")
            return RawImage(path, cache)
    except ImageError as exc:
        if exc.path == image.path:
            raise
        raise ImageError(image.path, f"backing file {exc}") from None
    raise ImageError(image.path, f"backing file {path}: format {fmt!r} is not supported "
                     "(only qcow2 and raw)")


def _probe_qcow2(path: str, overlay: str) -> str:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ImageError(path, exc.strerror or str(exc)) from None
    if magic == MAGIC:
        return "qcow2"
    raise ImageError(overlay, f"backing file {path} has no recorded format and is not "
                     "qcow2; refusing to guess raw (record it with 'qemu-img rebase -u -F raw')")
