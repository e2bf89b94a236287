"""Where the image's metadata lives, so that no data write can land on it.

Whatever the refcounts say, a guest data write must never hit the header
cluster, an L1 or L2 table, the refcount table or a refcount block, or the
snapshot table (QEMU's "overlap check").  The map is kept per host cluster.
"""

from __future__ import annotations


class MetadataMap:
    """Host clusters holding metadata, each with the name of its structure."""

    def __init__(self, cluster_bits: int) -> None:
        self.cluster_bits = cluster_bits
        self._clusters: dict[int, str] = {}

    def _range(self, host_offset: int, length: int) -> range:
        first = host_offset >> self.cluster_bits
        last = (host_offset + max(length, 1) - 1) >> self.cluster_bits
        return range(first, last + 1)

    def add(self, host_offset: int, length: int, what: str) -> None:
        for cluster in self._range(host_offset, length):
            self._clusters[cluster] = what

    def remove(self, host_offset: int, length: int) -> None:
        for cluster in self._range(host_offset, length):
            self._clusters.pop(cluster, None)

    def hit(self, host_offset: int, length: int) -> str | None:
        """The structure a write of `length` bytes at `host_offset` would hit."""
        clusters = self._clusters
        first = host_offset >> self.cluster_bits
        if first == (host_offset + length - 1) >> self.cluster_bits:  # the usual case
            what = clusters.get(first)
            return None if what is None else \
                f"{what} at host offset 0x{first << self.cluster_bits:x}"
        for cluster in self._range(host_offset, length):
            what = clusters.get(cluster)
            if what is not None:
                return f"{what} at host offset 0x{cluster << self.cluster_bits:x}"
        return None

    def __len__(self) -> int:
        return len(self._clusters)
