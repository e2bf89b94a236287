"""`qfuse check IMAGE [--repair leaks|all] [--output human|json]`.

Prints what `qemu-img check` 7.2 prints (qemu-img.c: img_check,
dump_human_image_check, dump_json_image_check) and exits as it does: 0
clean, 2 corruptions, 3 leaks only, 1 when the check could not complete.
The findings ("ERROR cluster 5 refcount=0 reference=1", "Leaked cluster
...") go to stderr as they are found; the summary goes to stdout.  The
work is `qfuse.engine.check`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from qfuse.engine.check import CheckOutcome, CheckResult
from qfuse.errors import UsageError

# Checks of images this large (file size) may take a while: show progress
# on a terminal.
LARGE_IMAGE_BYTES = 1 << 30

# The order in which qemu-img 7.2 prints the keys: its QDict's hash-bucket
# order (tdb_hash(key) % 512), not ImageCheck's field order.
JSON_KEY_ORDER = (
    "image-end-offset",
    "compressed-clusters",
    "total-clusters",
    "corruptions",
    "corruptions-fixed",
    "check-errors",
    "leaks",
    "leaks-fixed",
    "allocated-clusters",
    "filename",
    "format",
    "fragmented-clusters",
)


def register(commands: argparse._SubParsersAction) -> None:
    check = commands.add_parser(
        "check",
        help="check IMAGE's refcounts like qemu-img check, and repair them",
        description="Recount every cluster's references and compare them with the stored "
        "refcounts, as qemu-img check does.  Exit status: 0 clean, 2 corruptions, 3 leaked "
        "clusters only, 1 the check could not complete.",
        allow_abbrev=False,
    )
    check.add_argument("image", metavar="IMAGE")
    check.add_argument(
        "-r", "--repair", choices=("leaks", "all"),
        help="leaks: free leaked clusters; all: also fix refcounts that are too low, "
        "COPIED flags, and rebuild the refcount structures if need be",
    )  # fmt: skip
    check.add_argument("--output", choices=("human", "json"), default="human")
    check.set_defaults(func=_cmd_check)
    check.error = _usage_error  # type: ignore[method-assign]


class CheckUsageError(UsageError):
    """A wrong option of `check`: exit 1, as qemu-img check, for 2 says
    "corruptions" here."""

    exit_status = 1


def _usage_error(message: str) -> NoReturn:
    raise CheckUsageError(None, f"{message} (see 'qfuse check --help')")


def _cmd_check(args: argparse.Namespace) -> int:
    from qfuse.cli.main import setup_logging

    setup_logging(False)
    return run_check(args.image, repair=args.repair, output=args.output)


def run_check(path: str, *, repair: str | None, output: str) -> int:
    from qfuse.engine.check import check_image
    from qfuse.engine.refcheck import Fix

    fix = {None: Fix.NONE, "leaks": Fix.LEAKS, "all": Fix.ALL}[repair]
    with _progress(path) as (report, progress):
        outcome = check_image(path, fix=fix, report=report, progress=progress)
    result = outcome.result
    if output == "json":
        print(format_json(result, path))
    else:
        print(format_human(outcome), end="")
    if result.check_errors:
        print(f"qfuse: {path}: check failed", file=sys.stderr)
        return 1
    if result.corruptions:
        return 2
    if result.leaks:
        return 3
    return 0


def _stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def _progress(path: str) -> Iterator[tuple[Callable[[str], None],
                                           Callable[[int, int], None] | None]]:
    """(report, progress): a tqdm bar on a terminal for a large image."""
    import os

    try:
        large = os.stat(path).st_size >= LARGE_IMAGE_BYTES
    except OSError:
        large = False
    if not (large and sys.stderr.isatty()):
        yield _stderr_line, None
        return
    from tqdm import tqdm

    with tqdm(total=0, unit=" tables", file=sys.stderr, delay=0.5, leave=False,
              desc="checking") as bar:

        def report(message: str) -> None:
            bar.write(message, file=sys.stderr)

        def progress(done: int, total: int) -> None:
            if bar.total != total:
                bar.reset(total=total)
            bar.update(done - bar.n)

        yield report, progress


def format_human(outcome: CheckOutcome) -> str:
    """qemu-img's human output: the repair note, then dump_human_image_check."""
    check = outcome.result
    out: list[str] = []
    if outcome.repaired:
        out.append("The following inconsistencies were found and repaired:\n\n"
                   f"    {check.leaks_fixed} leaked clusters\n"
                   f"    {check.corruptions_fixed} corruptions\n\n"
                   "Double checking the fixed image now...\n")
    if not (check.corruptions or check.leaks or check.check_errors):
        out.append("No errors were found on the image.\n")
    else:
        if check.corruptions:
            out.append(f"\n{check.corruptions} errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if check.leaks:
            out.append(f"\n{check.leaks} leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.\n")
        if check.check_errors:
            out.append(f"\n{check.check_errors} internal errors have occurred during the "
                       "check.\n")
    if check.total_clusters and check.allocated_clusters:
        out.append(
            f"{check.allocated_clusters}/{check.total_clusters} = "
            f"{check.allocated_clusters * 100.0 / check.total_clusters:0.2f}% allocated, "
            f"{check.fragmented_clusters * 100.0 / check.allocated_clusters:0.2f}% fragmented, "
            f"{check.compressed_clusters * 100.0 / check.allocated_clusters:0.2f}% "
            "compressed clusters\n"
        )
    if check.image_end_offset:
        out.append(f"Image end offset: {check.image_end_offset}\n")
    return "".join(out)


def check_dict(check: CheckResult, filename: str) -> dict[str, Any]:
    """ImageCheck as qemu-img fills it: optional fields only when non-zero."""
    fields: dict[str, Any] = {
        "filename": filename,
        "format": "qcow2",
        "check-errors": check.check_errors,
    }
    optional = {
        "image-end-offset": check.image_end_offset,
        "corruptions": check.corruptions,
        "leaks": check.leaks,
        "corruptions-fixed": check.corruptions_fixed,
        "leaks-fixed": check.leaks_fixed,
        "total-clusters": check.total_clusters,
        "allocated-clusters": check.allocated_clusters,
        "fragmented-clusters": check.fragmented_clusters,
        "compressed-clusters": check.compressed_clusters,
    }
    fields.update((key, value) for key, value in optional.items() if value)
    return {key: fields[key] for key in JSON_KEY_ORDER if key in fields}


def format_json(check: CheckResult, filename: str) -> str:
    return json.dumps(check_dict(check, filename), indent=4)
