"""`qfuse snapshot (-l | -c NAME | -a NAME | -d NAME) IMAGE`: internal snapshots.

The work is `qfuse.engine.snapshots`'s.  `-l` prints `qemu-img snapshot -l`'s
layout (nothing at all for an image without snapshots); the others print
nothing and exit 0, or one line and exit 1 with the image untouched.  `-a`
and `-d` find a snapshot by ID first, then by name.  Every one takes the
image's locks, so an image that QEMU or a qfuse mount holds is refused.

Names and IDs with characters that are not printable (control characters,
for instance ESC) are listed with Python-style escapes, ``\\x1b``; see
`qfuse.format.snapshots.escape_name`.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any) -> None:
    """Add the `snapshot` subcommand to the parser's subcommands."""
    parser = commands.add_parser(
        "snapshot",
        help="list, create, apply or delete internal snapshots",
        description="List, create, apply (revert to) or delete the internal snapshots "
        "of a qcow2 image, like qemu-img snapshot.",
        allow_abbrev=False,
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("-l", dest="list", action="store_true", help="list the snapshots")
    action.add_argument("-c", dest="create", metavar="NAME",
                        help="create snapshot NAME of the current state")
    action.add_argument("-a", dest="apply", metavar="NAME",
                        help="revert the image to snapshot NAME (an ID or a name)")
    action.add_argument("-d", dest="delete", metavar="NAME",
                        help="delete snapshot NAME (an ID or a name)")
    parser.add_argument("image", metavar="IMAGE")
    parser.set_defaults(func=run_snapshot)


def run_snapshot(args: argparse.Namespace) -> int:
    from qfuse.cli.info import snapshot_table_lines
    from qfuse.cli.main import setup_logging
    from qfuse.engine import snapshots

    setup_logging(False)
    if args.list:
        infos = snapshots.list_snapshots(args.image)
        if infos:
            print("\n".join(snapshot_table_lines(infos)))
    elif args.create is not None:
        snapshots.create_snapshot(args.image, args.create)
    elif args.apply is not None:
        snapshots.apply_snapshot(args.image, args.apply)
    else:
        snapshots.delete_snapshot(args.image, args.delete)
    return 0
