"""`qfuse create`: a new qcow2 image, as `qemu-img create -f qcow2` makes it.

    qfuse create [-f qcow2] [-b BACKING [-F BACKING_FMT]] [-o k=v,...] IMAGE [SIZE]

The options and their refusals are qemu-img's (`qfuse.cli.imageopts`); the
image is laid out and written by `qfuse.engine.create`.  Like qemu-img, an
existing IMAGE is overwritten (unless another process is using it), the
backing file must open (its virtual size is the default SIZE), and a
backing file needs its format (-F) given.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from qfuse.cli.imageopts import (
    QCOW2_KEYS,
    collect_options,
    options_help,
    parse_image_size,
    qcow2_options,
    wants_help,
)
from qfuse.errors import UsageError
from qfuse.format.header import COMPRESSION_NAMES


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "create",
        help="create a new qcow2 image (qemu-img create options)",
        description="Create a qcow2 image of SIZE bytes (suffixes k, M, G, T, P, E), or of "
        "the backing file's size. '-o help' lists the options.",
        allow_abbrev=False,
    )
    parser.add_argument("-f", dest="format", metavar="FMT", default="qcow2",
                        help="image format (only qcow2)")
    parser.add_argument("-b", dest="backing", metavar="BACKING",
                        help="backing file, relative to IMAGE's directory")
    parser.add_argument("-F", dest="backing_fmt", metavar="BACKING_FMT",
                        help="backing file format: qcow2 or raw")
    parser.add_argument("-o", dest="options", metavar="OPTIONS", action="append", default=[],
                        help="comma-separated options: cluster_size, preallocation, compat, "
                        "lazy_refcounts, refcount_bits, extended_l2, compression_type, "
                        "backing_file, backing_fmt")
    parser.add_argument("-q", dest="quiet", action="store_true", help="print nothing")
    parser.add_argument("image", metavar="IMAGE", nargs="?")
    parser.add_argument("size", metavar="SIZE", nargs="?")
    parser.set_defaults(func=run_create)


def run_create(args: argparse.Namespace) -> int:
    from qfuse.cli.main import setup_logging
    from qfuse.engine.create import backing_size, create_image

    setup_logging(False)
    if args.format != "qcow2":
        raise UsageError(args.image, f"format {args.format!r} is not supported "
                         "(qfuse creates qcow2 images)")
    if wants_help(args.options):
        print(options_help(QCOW2_KEYS, "qcow2"))
        return 0
    if args.image is None:
        raise UsageError(None, "create needs an IMAGE (see 'qfuse create --help')")
    image: str = args.image
    options = collect_options(args.options, QCOW2_KEYS, image, "qcow2")
    # -b and -F win over -o backing_file/backing_fmt, as in qemu-img.
    if args.backing is not None:
        options["backing_file"] = args.backing
    if args.backing_fmt is not None:
        options["backing_fmt"] = args.backing_fmt
    size = parse_image_size(args.size, image) if args.size is not None else None
    wanted = qcow2_options(options, image, size=size)
    spec = wanted.spec
    if spec.backing_file is not None:
        if spec.backing_format is None:
            raise UsageError(image, "a backing file needs its format: add -F qcow2 or -F raw")
        base_size = backing_size(image, spec.backing_file, spec.backing_format)
        if not wanted.size_given:
            spec = dataclasses.replace(spec, virtual_size=-(-base_size // 512) * 512)
    elif not wanted.size_given:
        raise UsageError(image, "create needs a SIZE (or a backing file to take it from)")
    if not args.quiet:
        print(_formatting_line(image, spec, wanted.preallocation, options))
    create_image(image, spec, wanted.preallocation)
    return 0


def _formatting_line(image: str, spec: Any, preallocation: str,
                     options: dict[str, str | None]) -> str:
    """qemu-img's "Formatting ..." line, in its order of fields."""
    def on_off(value: bool) -> str:
        return "on" if value else "off"

    parts = [f"fmt=qcow2 cluster_size={spec.cluster_size}",
             f"extended_l2={on_off(spec.extended_l2)}"]
    if preallocation != "off" or "preallocation" in options:
        parts.append(f"preallocation={preallocation}")
    parts.append(f"compression_type={COMPRESSION_NAMES[spec.compression_type]}")
    parts.append(f"size={spec.virtual_size}")
    if "compat" in options:
        parts.append(f"compat={'0.10' if spec.version == 2 else '1.1'}")
    if spec.backing_file is not None:
        parts.append(f"backing_file={spec.backing_file}")
        parts.append(f"backing_fmt={spec.backing_format}")
    parts.append(f"lazy_refcounts={on_off(spec.lazy_refcounts)}")
    parts.append(f"refcount_bits={1 << spec.refcount_order}")
    return f"Formatting '{image}', " + " ".join(parts)
