"""`qfuse convert`: a disk image into a new raw or qcow2 file.

    qfuse convert [-c] [-O raw|qcow2] [-o k=v,...] SOURCE DEST

SOURCE is a qcow2 image (its backing chain read through and flattened) or
a raw disk image; the output format is raw unless -O says qcow2, as with
qemu-img.  ``-o`` takes `qfuse create`'s options for a qcow2 DEST
(`preallocation` only for raw); ``-c`` compresses every cluster of a qcow2
DEST with its compression_type.  DEST is replaced only once complete
(`qfuse.engine.convert`).  A progress bar is shown when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from qfuse.cli.imageopts import (
    QCOW2_KEYS,
    RAW_KEYS,
    collect_options,
    options_help,
    qcow2_options,
    raw_preallocation,
    split_options,
    wants_help,
)
from qfuse.errors import UsageError

if TYPE_CHECKING:
    from qfuse.engine.convert import Progress

OUTPUT_FORMATS = ("raw", "qcow2")
_NOT_FOR_CONVERT = ("size", "backing_file", "backing_fmt")


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "convert",
        help="convert a qcow2 or raw image into a new raw or qcow2 file",
        description="Copy SOURCE's guest data (qcow2 with its backing chain, or raw) into "
        "DEST, leaving zeros unwritten. '-o help' lists the options of the output format.",
        allow_abbrev=False,
    )
    parser.add_argument("-c", dest="compress", action="store_true",
                        help="compress the clusters of a qcow2 DEST")
    parser.add_argument("-O", dest="output_format", metavar="FMT", default="raw",
                        choices=OUTPUT_FORMATS, help="output format: raw (default) or qcow2")
    parser.add_argument("-o", dest="options", metavar="OPTIONS", action="append", default=[],
                        help="comma-separated options of the output format, as for create")
    parser.add_argument("-p", dest="progress", action="store_true",
                        help="show a progress bar even when stderr is not a terminal")
    parser.add_argument("source", metavar="SOURCE", nargs="?")
    parser.add_argument("dest", metavar="DEST", nargs="?")
    parser.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from qfuse.cli.main import setup_logging
    from qfuse.engine.convert import Target, convert

    setup_logging(False)
    keys = QCOW2_KEYS if args.output_format == "qcow2" else RAW_KEYS
    if wants_help(args.options):
        shown = {k: v for k, v in keys.items() if k not in _NOT_FOR_CONVERT}
        print(options_help(shown, args.output_format))
        return 0
    if args.source is None or args.dest is None:
        raise UsageError(None, "convert needs a SOURCE and a DEST (see 'qfuse convert --help')")
    dest: str = args.dest
    for text in args.options:
        for key, _ in split_options(text):
            if key in _NOT_FOR_CONVERT:
                raise UsageError(dest, f"option {key!r} cannot be used with convert "
                                 "(DEST takes SOURCE's size and stands alone)")
    allowed = {k: v for k, v in keys.items() if k not in _NOT_FOR_CONVERT}
    options = collect_options(args.options, allowed, dest, args.output_format)
    target = Target(format=args.output_format, compress=args.compress)
    if args.output_format == "qcow2":
        wanted = qcow2_options(options, dest)
        target.spec = wanted.spec
        target.preallocation = wanted.preallocation
        if args.compress and wanted.preallocation != "off":
            raise UsageError(dest, "compression and preallocation cannot be used together")
    else:
        if args.compress:
            raise UsageError(dest, "compression needs a qcow2 DEST (-O qcow2)")
        target.preallocation = raw_preallocation(options, dest)
    with _progress_bar(args.progress or sys.stderr.isatty(), os.path.basename(dest)) as bar:
        convert(args.source, dest, target, progress=bar)
    return 0


@contextlib.contextmanager
def _progress_bar(enabled: bool, name: str) -> Iterator[Progress | None]:
    """A tqdm bar in bytes (on a terminal only), or None."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=name, leave=False,
              dynamic_ncols=True) as bar:

        def advance(done: int, total: int) -> None:
            if bar.total != total:
                bar.total = total
            bar.update(done)

        yield advance
