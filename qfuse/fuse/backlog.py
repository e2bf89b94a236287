"""Whether FUSE requests are queued that no handler has taken yet.

The engine runs O_DIRECT I/O on the event loop when nothing else waits for
it (qfuse.engine.hostfile.run_direct_io_inline_when): at queue depth 1 that
saves the two thread wake-ups of a worker-thread hop.  Requests that wait
show as a readable /dev/fuse descriptor; then the I/O goes to a worker
thread so that those requests are taken in the meantime.

pyfuse3 does not expose its session's descriptor, so it is found among the
process's open files: the one /dev/fuse descriptor opened by pyfuse3.init().
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable


def _fuse_fds() -> list[int]:
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                fds.append(int(name))
        except OSError:  # closed while listing (the listing's own descriptor)
            continue
    return fds


def queue_empty_probe() -> Callable[[], bool] | None:
    """A cheap test "no request waits on the session", or None when the
    session's descriptor cannot be told apart (then never run inline)."""
    fds = _fuse_fds()
    if len(fds) != 1:
        return None
    poller = select.poll()
    poller.register(fds[0], select.POLLIN)

    def queue_empty() -> bool:
        return not poller.poll(0)

    return queue_empty
