"""HostFile's O_DIRECT path: aligned scratch buffers are reused, so what a
write does not cover must never come from an earlier use of the buffer."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio

from qfuse.engine import hostfile
from qfuse.engine.hostfile import CacheMode, HostFile


@pytest.fixture(params=["thread", "inline"])
def io_place(request: pytest.FixtureRequest):
    hostfile.run_direct_io_inline_when((lambda: True) if request.param == "inline" else None)
    yield request.param
    hostfile.run_direct_io_inline_when(None)


@pytest.mark.parametrize("cache", [CacheMode.NONE, CacheMode.DIRECTSYNC])
def test_unaligned_direct_writes_match_a_model(tmp_path: Path, cache: CacheMode,
                                               io_place: str) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"")
    model = bytearray()
    rng = random.Random(7)
    try:
        host = HostFile(str(path), writable=True, cache=cache)
    except OSError as err:  # a filesystem without O_DIRECT (tmpfs)
        pytest.skip(f"O_DIRECT: {err}")

    async def run() -> None:
        for _ in range(200):
            # Random bytes pass through the pooled buffers all along, so a
            # stale byte would show in the model check.
            offset = rng.randrange(0, 3 << 16)
            pieces = [rng.randbytes(rng.randrange(1, 9000)) for _ in range(rng.randrange(1, 4))]
            await host.pwritev(offset, pieces)
            data = b"".join(pieces)
            if len(model) < offset:
                model.extend(bytes(offset - len(model)))
            model[offset:offset + len(data)] = data
            probe = rng.randrange(0, len(model))
            length = rng.randrange(1, 70000)
            got = await host.pread(probe, length)
            want = bytes(model[probe:probe + length])
            # Past the model's end: the zeros that pad the file to the alignment.
            assert got[:len(want)] == want
            assert not got[len(want):].strip(b"\0")

    try:
        trio.run(run)
    finally:
        host.close()
    on_disk = path.read_bytes()
    # The file may be padded with zeros to the alignment past the last write.
    assert on_disk[:len(model)] == bytes(model)
    assert not on_disk[len(model):].strip(b"\0")
    assert os.path.getsize(path) >= len(model)


@pytest.mark.parametrize("cache", [CacheMode.NONE, CacheMode.DIRECTSYNC])
def test_sync_direct_write_of_a_header_field(tmp_path: Path, cache: CacheMode) -> None:
    """`pwrite_sync` (header fields, repairs) is an unaligned O_DIRECT write
    of a few bytes: the rest of its block is kept."""
    path = tmp_path / "file"
    before = bytes(range(256)) * 64
    path.write_bytes(before)
    try:
        host = HostFile(str(path), writable=True, cache=cache)
    except OSError as err:  # a filesystem without O_DIRECT (tmpfs)
        pytest.skip(f"O_DIRECT: {err}")
    try:
        host.pwrite_sync(72, b"\x00\x00\x00\x00\x00\x00\x00\x01")
        assert host.pread_sync(72, 8) == b"\x00" * 7 + b"\x01"
    finally:
        host.close()
    after = path.read_bytes()
    assert after[:72] == before[:72] and after[80:] == before[80:]
