"""The mount options: the `-o` string and its long-option twins.

`qfuse mount` takes each qfuse option twice, as a long option (``--cache
none``) and in the ``-o`` form (``-o cache=none``), so that `mount -t
fuse.qfuse`, fstab lines and systemd ``.mount`` units work: those reach us
through mount.fuse3 as ``qfuse IMAGE MOUNTPOINT -o OPTS`` and can only speak
``-o``.  They also pass along the generic options mount(8) knows (``rw``,
``nofail``, ``x-systemd.*``, ...): those mean nothing to the daemon and are
accepted and ignored.  Anything else is an error, so that a typo never mounts
with a silently different meaning.

This module only parses; the engine's `CacheMode` is built from the string
by the daemon, so parsing needs neither the engine nor pyfuse3.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from qfuse.errors import UsageError

# The values of qfuse.engine.CacheMode, in the order the help text lists them.
CACHE_MODES: tuple[str, ...] = ("writeback", "writethrough", "none", "directsync", "unsafe")
DEFAULT_CACHE = "writeback"

# Generic mount(8) / fstab / FUSE options that are accepted and ignored.
# ``default_permissions`` is here because the view always has it on.
IGNORED_OPTIONS: frozenset[str] = frozenset(
    {
        "defaults", "rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec",
        "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser", "owner",
        "group", "async", "sync", "dirsync", "atime", "noatime", "relatime",
        "norelatime", "strictatime", "nostrictatime", "lazytime", "nolazytime",
        "diratime", "nodiratime", "iversion", "noiversion", "mand", "nomand",
        "silent", "loud", "default_permissions",
    }
)  # fmt: skip
# Prefixes of generic options that carry a value or a namespace of their own:
# ``x-systemd.requires=...``, ``x-gvfs-show``, ``comment=systemd.automount``,
# ``context=`` (SELinux).
IGNORED_PREFIXES: tuple[str, ...] = (
    "x-", "comment=", "context=", "fscontext=", "defcontext=", "rootcontext=",
)  # fmt: skip

_SIZE_RE = re.compile(r"\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)
_SIZE_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


@dataclasses.dataclass
class MountOptions:
    """What the user asked of one mount, however they spelled it."""

    cache: str = DEFAULT_CACHE
    read_only: bool = False
    snapshot: str | None = None
    l2_cache_size: int | None = None
    allow_other: bool = False
    vmdk: bool = False
    foreground: bool = False
    debug: bool = False


def parse_size(text: str, what: str = "size") -> int:
    """Parse a byte count with an optional K/M/G/T suffix (powers of 1024).

    ``"65536"``, ``"64K"``, ``"64k"``, ``"64KiB"`` and ``"1M"`` are accepted;
    anything else is a UsageError naming `what`.
    """
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise UsageError(None, f"{what}: not a byte count: {text!r} (use e.g. 65536, 64K, 1M, 1G)")
    return int(match.group(1)) << _SIZE_SHIFT[match.group(2).upper()]


def parse_cache_mode(text: str) -> str:
    if text not in CACHE_MODES:
        raise UsageError(
            None, f"cache mode {text!r} is unknown (choose one of {', '.join(CACHE_MODES)})"
        )
    return text


def _split(opts: str) -> list[str]:
    """Split an ``-o`` string on commas, honouring ``\\,`` like libfuse does."""
    items: list[str] = []
    current: list[str] = []
    chars = iter(opts)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, "\\"))
        elif ch == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _is_ignored(name: str, item: str) -> bool:
    return name in IGNORED_OPTIONS or item.startswith(IGNORED_PREFIXES)


def apply_o_options(options: MountOptions, o_strings: Iterable[str]) -> MountOptions:
    """Fold ``-o`` strings into `options` (in place, and returned).

    Later items win over earlier ones, as with mount(8): ``-o ro,rw`` is
    read-write.  Raises UsageError for an unknown option or a bad value.
    """
    for o_string in o_strings:
        for item in _split(o_string):
            name, equals, value = item.partition("=")
            has_value = bool(equals)
            if _is_ignored(name, item):
                # mount(8) semantics: a later ``rw`` undoes an earlier ``ro``.
                if name == "rw" and not has_value:
                    options.read_only = False
                continue
            _apply_one(options, name, has_value, value, item)
    return options


def _apply_one(options: MountOptions, name: str, has_value: bool, value: str, item: str) -> None:
    flags = {"ro": "read_only", "allow_other": "allow_other", "vmdk": "vmdk"}
    valued = {"cache", "snapshot", "l2_cache_size"}
    if name in flags:
        if has_value:
            raise UsageError(None, f"mount option {name!r} takes no value (got {item!r})")
        setattr(options, flags[name], True)
    elif name in valued:
        if not has_value or not value:
            raise UsageError(None, f"mount option {name!r} needs a value ({name}=...)")
        if name == "cache":
            options.cache = parse_cache_mode(value)
        elif name == "snapshot":
            options.snapshot = value
        else:
            options.l2_cache_size = parse_size(value, "l2_cache_size")
    else:
        raise UsageError(None, f"unknown mount option {item!r}")
