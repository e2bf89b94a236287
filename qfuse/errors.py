"""The exceptions qfuse raises, split by who must act on them.

`QfuseError` and its subclasses are for the user: the CLI prints them as one
line (``qfuse: PATH: reason``) and exits non-zero, never with a traceback.
`MetadataCorruption` is raised while serving I/O when one table entry is bad:
the FUSE layer turns it into EIO for that request only.
"""

from __future__ import annotations


class QfuseError(Exception):
    """An error the user caused or must act on; printed as one line."""

    exit_status = 1

    def __init__(self, path: str | None, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class ImageError(QfuseError):
    """The image (or a file it names) is damaged, hostile or unsupported."""


class UsageError(QfuseError):
    """A wrong command-line option or argument."""

    exit_status = 2


class MetadataCorruption(Exception):
    """One L1/L2 entry or compressed cluster is bad; that range gives EIO.

    `where` names the table and index, for the one log line.
    """

    def __init__(self, path: str, where: str, reason: str) -> None:
        super().__init__(path, where, reason)
        self.path = path
        self.where = where
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.where}: {self.reason}"


class FormatError(Exception):
    """A structure in the image breaks the qcow2 spec or one of our limits.

    Raised by the format layer, which knows no paths; the engine adds the
    image's path and re-raises it as `ImageError`.
    """
