"""qfuse: mount a qcow2 image as its raw view through FUSE."""

__version__ = "0.1.0"
