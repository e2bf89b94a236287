"""The image engine: opening, translating and reading qcow2 images.

The names below are loaded on first use: `qfuse check` and the other
offline tools import only the modules they need (qfuse.engine.check, ...),
and the chain/qcow2 modules bring in trio, half of a tool's start-up time.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qfuse.engine.chain import open_image
    from qfuse.engine.hostfile import CacheMode
    from qfuse.engine.qcow2 import Qcow2Image

__all__ = ["CacheMode", "Qcow2Image", "open_image"]

_HOME = {"CacheMode": "hostfile", "Qcow2Image": "qcow2", "open_image": "chain"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"qfuse.engine.{_HOME[name]}"), name)
