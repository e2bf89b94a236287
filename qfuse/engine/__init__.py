"""The image engine: opening, translating and reading qcow2 images."""

from qfuse.engine.chain import open_image
from qfuse.engine.hostfile import CacheMode
from qfuse.engine.qcow2 import Qcow2Image

__all__ = ["CacheMode", "Qcow2Image", "open_image"]
