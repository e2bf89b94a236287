"""``--vmdk``: a flat VMDK descriptor that points at the raw view.

VirtualBox and VMware cannot open a raw file as a disk, but they can open a
"monolithicFlat" VMDK: a short text descriptor naming a raw extent.  The
descriptor names the view by its base name, so it must sit beside it.
"""

from __future__ import annotations

import os

from qfuse.errors import QfuseError

# Marks a descriptor as ours, so a stale one left by a crash may be replaced
# and a user's own file never is.
MARKER = "# Written by qfuse for a mounted raw view; removed at unmount."


# QEMU reads the extent line with sscanf's ``"%511[^\n\r\"]"`` (block/vmdk.c), and
# VMware and VirtualBox have no escape either: such a name cannot be written.
_UNSAYABLE = ('"', "\n", "\r")
MAX_EXTENT_NAME = 511


def descriptor(extent_name: str, virtual_size: int, read_only: bool) -> bytes:
    """The descriptor text for a raw extent `extent_name` of `virtual_size` bytes.

    `extent_name` is a file name as `os.fsdecode` gives it; its bytes go into
    the descriptor unchanged.  QfuseError if no descriptor can name it.
    """
    name_bytes = os.fsencode(extent_name)
    if any(c in extent_name for c in _UNSAYABLE) or len(name_bytes) > MAX_EXTENT_NAME:
        raise QfuseError(extent_name, "a VMDK descriptor cannot name this file "
                         "(a double quote or line break in it, or too long); mount without vmdk")
    sectors = virtual_size // 512
    # The classic ATA geometry VMware writes: 16 heads, 63 sectors a track.
    cylinders = min(16383, -(-sectors // (16 * 63)))
    access = "RDONLY" if read_only else "RW"
    text = f"""# Disk DescriptorFile
{MARKER}
version=1
CID=fffffffe
parentCID=ffffffff
createType="monolithicFlat"

# Extent description
{access} {sectors} FLAT "{extent_name}" 0

# The Disk Data Base
#DDB

ddb.virtualHWVersion = "4"
ddb.geometry.cylinders = "{cylinders}"
ddb.geometry.heads = "16"
ddb.geometry.sectors = "63"
ddb.adapterType = "ide"
"""
    # surrogateescape: a file name that is not UTF-8 keeps its own bytes.
    return text.encode("utf-8", "surrogateescape")


def descriptor_path(view_path: str) -> str:
    """Where the descriptor of a file-form view goes: ``disk.raw`` -> ``disk.vmdk``."""
    stem, ext = os.path.splitext(view_path)
    if ext == ".vmdk":  # never the view itself
        return view_path + ".vmdk"
    return stem + ".vmdk"


def is_ours(path: str) -> bool:
    """True if `path` is a descriptor qfuse wrote (so it may be replaced)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return MARKER.encode() in head
