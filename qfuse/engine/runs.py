"""Kinds of run that guest→host translation yields (see `Qcow2Image._map`)."""

DATA = 0  # guest data at a host offset
ZERO = 1  # reads as zeros
BACKING = 2  # unallocated here: the backing file's bytes, zeros past its end
COMPRESSED = 3  # inside one compressed cluster
