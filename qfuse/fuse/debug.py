"""``--debug``: a subclass of the view that logs every request and its answer.

The plain `View` has no log call on its request path.  Rather than guard
each handler with ``if debug:``, `--debug` swaps in a subclass built here
whose handlers log and then call the real ones, so debugging costs nothing
when it is off.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pyfuse3 import FUSEError

from qfuse.fuse.view import View, debug_repr

log = logging.getLogger("qfuse.fuse.requests")

HANDLERS = (
    "lookup", "getattr", "setattr", "open", "read", "write", "flush", "fsync", "release",
    "opendir", "readdir", "releasedir", "statfs", "getxattr", "listxattr", "forget",
)  # fmt: skip


def _logged(name: str, handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(handler)
    async def logged(self: View, *args: Any) -> Any:
        shown = ", ".join(debug_repr(arg) for arg in args)
        try:
            result = await handler(self, *args)
        except FUSEError as err:
            log.debug("%s(%s) -> %s", name, shown, errno.errorcode.get(err.errno, err.errno))
            raise
        log.debug("%s(%s) -> %s", name, shown, debug_repr(result))
        return result

    return logged


def with_request_log(view_class: type[View]) -> type[View]:
    """`view_class` with every request handler logged at DEBUG level."""
    namespace = {name: _logged(name, getattr(view_class, name)) for name in HANDLERS}
    return type(f"Logged{view_class.__name__}", (view_class,), namespace)
