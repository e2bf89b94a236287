"""`qfuse`: the command line.

Every user error ends here as one line on stderr, ``qfuse: PATH: reason``,
and a documented exit status (1 for a bad image or a refused operation, 2
for a bad option); never a traceback.  The work itself lives elsewhere: the
mount daemon in `qfuse.fuse`, image facts in `qfuse.engine`.

Besides ``qfuse COMMAND ...`` this accepts the form mount.fuse3 uses,
``qfuse IMAGE MOUNTPOINT -o OPTS`` (no command word), as ``mount``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from qfuse import __version__
from qfuse.cli.logformat import StderrFormatter, error_line, stderr_is_journal
from qfuse.cli.mountopts import CACHE_MODES, MountOptions, apply_o_options, parse_size
from qfuse.errors import QfuseError, UsageError

log = logging.getLogger(__name__)

# Commands beyond mount/umount/info, each a module `qfuse.cli.NAME` with
# `register(commands)` (adds its subparser and sets `func`).
_EXTRA_COMMANDS: tuple[str, ...] = (
    "create",
    "check",
    "snapshot",
    "convert",
    "stats",
)
COMMANDS = ("mount", "umount", "info", *_EXTRA_COMMANDS)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, through the usual path."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(None, f"{message} (see '{self.prog} --help')")


def _size_arg(text: str) -> int:
    return parse_size(text, "--l2-cache-size")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qfuse",
        description="Mount a qcow2 image so that the mountpoint is its raw view.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"qfuse {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    mount = commands.add_parser(
        "mount",
        help="mount IMAGE's raw view at MOUNTPOINT",
        description="Mount IMAGE so that MOUNTPOINT (a file, created if missing) is its raw "
        "view; or, if MOUNTPOINT is a directory, show IMAGE.raw and one read-only file per "
        "internal snapshot in it.",
        allow_abbrev=False,
    )
    mount.add_argument("image", metavar="IMAGE")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT")
    mount.add_argument("--cache", choices=CACHE_MODES, help="host cache mode (default writeback)")
    mount.add_argument("--read-only", action="store_true", help="no writes reach the image")
    mount.add_argument(
        "--snapshot", metavar="NAME", help="expose internal snapshot NAME, read-only"
    )
    mount.add_argument(
        "--l2-cache-size", metavar="BYTES", type=_size_arg, help="memory for L2 tables (K, M, G)"
    )
    mount.add_argument("--allow-other", action="store_true", help="let other users reach the view")
    mount.add_argument(
        "--vmdk", action="store_true", help="also write a flat VMDK descriptor beside the view"
    )
    mount.add_argument(
        "-o", dest="o_options", metavar="OPTS", action="append", default=[],
        help="comma-separated mount options (cache=, ro, snapshot=, l2_cache_size=, "
        "allow_other, vmdk; generic mount options are ignored)",
    )  # fmt: skip
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument("--debug", action="store_true", help="log every request (slow)")
    mount.set_defaults(func=_cmd_mount)

    umount = commands.add_parser(
        "umount",
        help="unmount MOUNTPOINT once the daemon has closed the image",
        allow_abbrev=False,
    )
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.set_defaults(func=_cmd_umount)

    info = commands.add_parser("info", help="describe IMAGE like qemu-img info", allow_abbrev=False)
    info.add_argument("image", metavar="IMAGE")
    info.add_argument("--output", choices=("human", "json"), default="human")
    info.add_argument("--backing-chain", action="store_true", help="describe every backing file")
    info.set_defaults(func=_cmd_info)
    for name in _EXTRA_COMMANDS:
        importlib.import_module(f"qfuse.cli.{name}").register(commands)
    return parser


def _normalize_argv(argv: list[str]) -> list[str]:
    """Turn mount.fuse3's ``IMAGE MOUNTPOINT -o OPTS`` into ``mount IMAGE ...``.

    mount.fuse3 always passes ``-o`` (it adds ``dev``/``suid`` or their
    negations), so only a command line with ``-o`` is read this way: a
    mistyped command word (``qfuse chekc disk.qcow2``) must not mount a file
    named "chekc" over the image.
    """
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-") and "-o" in argv:
        return ["mount", *argv]
    return argv


def mount_options_from_args(args: argparse.Namespace) -> MountOptions:
    """Merge the long options and the ``-o`` strings; ``-o`` values are applied first."""
    options = apply_o_options(MountOptions(), args.o_options)
    if args.cache is not None:
        options.cache = args.cache
    if args.read_only:
        options.read_only = True
    if args.snapshot is not None:
        if not args.snapshot:
            raise UsageError(None, "--snapshot needs a snapshot name")
        options.snapshot = args.snapshot
    if args.l2_cache_size is not None:
        options.l2_cache_size = args.l2_cache_size
    options.allow_other |= args.allow_other
    options.vmdk |= args.vmdk
    options.foreground = args.foreground
    options.debug = args.debug
    return options


def _subcommand_parser(
    parser: argparse.ArgumentParser, command: str | None
) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line (without the program name); UsageError if it is wrong."""
    parser = _build_parser()
    args, extras = parser.parse_known_args(_normalize_argv(list(argv)))
    if extras:
        # Said by the command's own parser, so that its exit status applies
        # (`qfuse check --bogus` exits 1 like qemu-img, not 2 = corruptions).
        chosen = _subcommand_parser(parser, args.command)
        chosen.error(f"unrecognized arguments: {' '.join(extras)}")
    if args.command is None:
        raise UsageError(None, f"a command is needed: one of {', '.join(COMMANDS)}")
    return args


def setup_logging(debug: bool) -> None:
    """Log to stderr, one line per event: ``qfuse: ...``, or ``<N>...`` for journald.

    Below INFO only with `debug` (``--debug``); see `qfuse.cli.logformat`.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StderrFormatter(journal=stderr_is_journal(), debug=debug))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def _cmd_mount(args: argparse.Namespace) -> int:
    from qfuse.fuse.daemon import mount

    options = mount_options_from_args(args)
    setup_logging(options.debug)
    return mount(args.image, args.mountpoint, options)


def _cmd_umount(args: argparse.Namespace) -> int:
    from qfuse.fuse.umount import umount

    setup_logging(False)
    return umount(args.mountpoint)


def _cmd_info(args: argparse.Namespace) -> int:
    from qfuse.cli.info import run_info

    setup_logging(False)
    return run_info(args.image, output=args.output, backing_chain=args.backing_chain)


def _describe_oserror(err: OSError) -> str:
    reason = err.strerror or str(err)
    return f"{err.filename}: {reason}" if err.filename else reason


def _say(message: str) -> None:
    """A failed command's one line on stderr."""
    print(error_line(message, journal=stderr_is_journal()), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one qfuse command; return its exit status."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        args = parse_args(argv)
        return int(args.func(args))
    except QfuseError as err:
        _say(str(err))
        return err.exit_status
    except OSError as err:
        _say(_describe_oserror(err))
        return 1
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    finally:
        # `qfuse info | head` closes our stdout early; say nothing about it.
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
