"""`-o` image options and sizes, spelled as qemu-img spells them.

Shared by `qfuse create` and `qfuse convert`.  Parsing only: the result is
an `ImageSpec` (qfuse.format.layout) and a preallocation mode, and every
refusal is a `UsageError` naming the image, worded after qemu-img's own.

qemu-img's rules, kept here: ``-o`` may be given many times and a later key
wins; ``,,`` is a literal comma inside a value; a boolean key given alone
(``-o lazy_refcounts``) means on; sizes take ``k``/``M``/``G``/``T``/``P``/``E``
suffixes (powers of 1024, either case), a ``b`` suffix for bytes, a decimal
fraction before a suffix (``1.5G``) and hexadecimal (``0x10000``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from qfuse.errors import UsageError
from qfuse.format.header import COMPRESSION_ZLIB, COMPRESSION_ZSTD, MAX_CLUSTER_BITS
from qfuse.format.layout import DEFAULT_CLUSTER_BITS, ImageSpec

QCOW2_KEYS: dict[str, str] = {
    "size": "virtual disk size",
    "compat": "qcow2 compatibility level: 0.10 (v2) or 1.1 (v3)",
    "backing_file": "file name of a base image",
    "backing_fmt": "format of the base image: qcow2 or raw",
    "cluster_size": "qcow2 cluster size (512 to 2M, a power of two)",
    "preallocation": "off, metadata, falloc or full",
    "lazy_refcounts": "postpone refcount updates (on/off, v3)",
    "refcount_bits": "width of a reference count entry in bits (1 to 64, v3)",
    "extended_l2": "extended L2 tables: 32 subclusters per cluster (on/off, v3)",
    "compression_type": "compression for compressed clusters: zlib or zstd (v3)",
}
RAW_KEYS: dict[str, str] = {
    "size": "virtual disk size",
    "preallocation": "off, falloc or full",
}
BOOL_KEYS = frozenset({"lazy_refcounts", "extended_l2"})
# qemu-img options qfuse knows of but does not do.
UNSUPPORTED_KEYS = frozenset({
    "data_file", "data_file_raw", "encryption", "encrypt.format", "encrypt.key-secret",
    "encrypt.cipher-alg", "encrypt.cipher-mode", "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg", "encrypt.iter-time", "nocow", "extent_size_hint",
})  # fmt: skip
VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
COMPRESSION_TYPES = {"zlib": COMPRESSION_ZLIB, "zstd": COMPRESSION_ZSTD}
_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})
_SIZE_RE = re.compile(
    r"\s*(?:(0[xX][0-9a-fA-F]+)|(\d+)(?:\.(\d+))?)\s*([bBkKmMgGtTpPeE]?)\s*"
)
_SHIFT = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
INT64_MAX = (1 << 63) - 1


def parse_qemu_size(text: str) -> int | None:
    """qemu's qemu_strtosz: a byte count, or None when `text` is not one."""
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        return None
    hex_digits, whole, fraction, suffix = match.groups()
    shift = _SHIFT[suffix.lower()]
    if hex_digits is not None:
        if suffix.lower() in ("b", "e"):  # 'b'/'e' would be hex digits
            return None
        value = int(hex_digits, 16) << shift
    elif fraction is not None:
        if not shift:  # a fraction of a byte
            return None
        value = (int(whole + fraction) << shift) // 10 ** len(fraction)
    else:
        value = int(whole) << shift
    return value if value <= INT64_MAX else None


def parse_image_size(text: str, image: str) -> int:
    """The SIZE argument of `create`."""
    value = parse_qemu_size(text)
    if value is None:
        raise UsageError(image, f"invalid image size {text!r}: use bytes or a k, M, G, T, P "
                         "or E suffix (e.g. 10G, 1.5T)")
    return value


def split_options(text: str) -> list[tuple[str, str | None]]:
    """``a=1,b,c=x,,y`` → [(a, '1'), (b, None), (c, 'x,y')]: qemu's ``,,`` escape."""
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    items.append("".join(current))
    out: list[tuple[str, str | None]] = []
    for item in items:
        if not item:
            continue
        key, equals, value = item.partition("=")
        out.append((key, value if equals else None))
    return out


def collect_options(strings: Iterable[str], known: dict[str, str],
                    image: str, fmt: str) -> dict[str, str | None]:
    """Fold the ``-o`` strings into one dict, later keys winning."""
    result: dict[str, str | None] = {}
    for text in strings:
        for key, value in split_options(text):
            if key in known:
                result[key] = value
            elif key in UNSUPPORTED_KEYS:
                raise UsageError(image, f"option {key!r} is not supported by qfuse")
            else:
                raise UsageError(image, f"invalid parameter {key!r} for format {fmt} "
                                 f"(known: {', '.join(known)})")
    return result


def options_help(known: dict[str, str], fmt: str) -> str:
    lines = [f"Supported options for {fmt}:"]
    lines += [f"  {key:<17} - {text}" for key, text in known.items()]
    return "\n".join(lines)


def wants_help(strings: Iterable[str]) -> bool:
    return any(key in ("help", "?") for text in strings for key, _ in split_options(text))


def _bool(key: str, value: str | None, image: str) -> bool:
    if value is None:
        return True  # a bare flag, as qemu-img reads it
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise UsageError(image, f"parameter {key!r} expects 'on' or 'off' (got {value!r})")


def _value(key: str, value: str | None, image: str) -> str:
    if value is None or (not value and key not in ("backing_file",)):
        raise UsageError(image, f"parameter {key!r} needs a value ({key}=...)")
    return value


def _number(key: str, value: str | None, image: str) -> int:
    text = _value(key, value, image)
    number = parse_qemu_size(text)
    if number is None:
        raise UsageError(image, f"parameter {key!r} expects a non-negative number "
                         f"(k, M, G suffixes allowed), not {text!r}")
    return number


@dataclass
class ImageOptions:
    """What ``-o`` (and ``-b``/``-F``/SIZE) asked for, checked."""

    spec: ImageSpec
    preallocation: str = "off"
    size_given: bool = False


def qcow2_options(options: dict[str, str | None], image: str, *,
                  size: int | None = None) -> ImageOptions:
    """Build and check a qcow2 `ImageSpec` as QEMU's qcow2 create does.

    `size` is the SIZE argument, if any (``-o size=`` too, but not both).
    The virtual size is rounded up to 512 bytes, as qemu-img does silently.
    """
    if "size" in options:
        if size is not None:
            raise UsageError(image, "the image size must be given only once")
        size = _number("size", options["size"], image)
    version = 3
    if "compat" in options:
        text = _value("compat", options["compat"], image)
        if text not in VERSIONS:
            raise UsageError(image, f"compat {text!r} is unknown (use 0.10 or 1.1)")
        version = VERSIONS[text]
    cluster_size = 1 << DEFAULT_CLUSTER_BITS
    if "cluster_size" in options:
        cluster_size = _number("cluster_size", options["cluster_size"], image)
    extended_l2 = _bool("extended_l2", options["extended_l2"], image) \
        if "extended_l2" in options else False
    lazy = _bool("lazy_refcounts", options["lazy_refcounts"], image) \
        if "lazy_refcounts" in options else False
    preallocation = "off"
    if "preallocation" in options:
        preallocation = _value("preallocation", options["preallocation"], image)
        if preallocation not in ("off", "metadata", "falloc", "full"):
            raise UsageError(image, f"preallocation {preallocation!r} is unknown "
                             "(use off, metadata, falloc or full)")
    refcount_bits = _number("refcount_bits", options["refcount_bits"], image) \
        if "refcount_bits" in options else 16
    compression = COMPRESSION_ZLIB
    if "compression_type" in options:
        text = _value("compression_type", options["compression_type"], image)
        if text not in COMPRESSION_TYPES:
            raise UsageError(image, f"compression_type {text!r} is unknown (use zlib or zstd)")
        compression = COMPRESSION_TYPES[text]
    backing_file = options.get("backing_file") or None
    backing_fmt = options.get("backing_fmt") or None

    # QEMU's order of checks (qcow2_co_create).
    if extended_l2 and version < 3:
        raise UsageError(image, "extended L2 entries need compat=1.1")
    if not (cluster_size & (cluster_size - 1) == 0
            and 512 <= cluster_size <= 1 << MAX_CLUSTER_BITS):
        raise UsageError(image, "cluster size must be a power of two between 512 and 2048k")
    if extended_l2 and cluster_size < 16384:
        raise UsageError(image, "extended L2 entries need a cluster size of at least 16k")
    if backing_file and preallocation != "off" and not extended_l2:
        raise UsageError(image, "a backing file and preallocation go together only "
                         "with extended_l2=on")
    if backing_fmt and not backing_file:
        raise UsageError(image, "a backing format needs a backing file")
    if lazy and version < 3:
        raise UsageError(image, "lazy refcounts need compat=1.1")
    if not (refcount_bits and refcount_bits & (refcount_bits - 1) == 0 and refcount_bits <= 64):
        raise UsageError(image, "refcount width must be a power of two and may not "
                         "exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise UsageError(image, "refcount widths other than 16 bits need compat=1.1")
    if compression != COMPRESSION_ZLIB and version < 3:
        raise UsageError(image, "compression types other than zlib need compat=1.1")
    spec = ImageSpec(
        virtual_size=-(-(size or 0) // 512) * 512,
        cluster_bits=cluster_size.bit_length() - 1,
        version=version,
        refcount_order=refcount_bits.bit_length() - 1,
        lazy_refcounts=lazy,
        extended_l2=extended_l2,
        compression_type=compression,
        backing_file=backing_file,
        backing_format=backing_fmt,
    )
    return ImageOptions(spec, preallocation, size is not None)


def raw_preallocation(options: dict[str, str | None], image: str) -> str:
    """The preallocation of a raw output file (off, falloc or full)."""
    if "preallocation" not in options:
        return "off"
    mode = _value("preallocation", options["preallocation"], image)
    if mode not in ("off", "falloc", "full"):
        raise UsageError(image, f"preallocation {mode!r} is unknown for raw "
                         "(use off, falloc or full)")
    return mode
