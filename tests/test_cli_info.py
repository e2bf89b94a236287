"""`qfuse info`'s human form against qemu-img's own.

The formatter is fed qemu-img's JSON and must print what `qemu-img info`
prints for the same image, byte for byte; then the real command is checked
end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qfuse.cli.info import format_human, format_json, size_to_str
from qfuse.cli.main import main


def qemu_img(*args: str | os.PathLike[str]) -> str:
    return subprocess.run(
        ["qemu-img", *map(os.fspath, args)], check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "64M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    subprocess.run(["qemu-io", "-c", "write -P 0xab 0 64k", top], check=True,
                   capture_output=True)  # fmt: skip
    qemu_img("snapshot", "-c", "first", top)
    qemu_img("snapshot", "-c", "a rather long snapshot name", top)
    subprocess.run(["qemu-io", "-c", "write -P 0xcd 1M 64k", top], check=True,
                   capture_output=True)  # fmt: skip
    return top


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "0.977 KiB"),
        (65536, "64 KiB"),
        (339968, "332 KiB"),
        (67108864, "64 MiB"),
        (1536 << 20, "1.5 GiB"),
        (10 << 40, "10 TiB"),
    ],
)
def test_size_to_str(value: int, text: str) -> None:
    assert size_to_str(value) == text


def test_human_matches_qemu_img(chain: Path) -> None:
    infos = json.loads(qemu_img("info", "--output", "json", "--backing-chain", chain))
    assert format_human(infos) == qemu_img("info", "--backing-chain", chain)
    assert format_human(infos[:1]) == qemu_img("info", chain)


def test_nested_format_specific_data() -> None:
    info = {
        "filename": "x.qcow2", "format": "qcow2", "virtual-size": 1024,
        "format-specific": {"type": "qcow2", "data": {
            "compat": "1.1",
            "bitmaps": [{"flags": ["auto"], "name": "b0", "granularity": 65536}],
        }},
    }  # fmt: skip
    lines = format_human([info]).splitlines()
    start = lines.index("Format specific information:")
    assert lines[start:] == [
        "Format specific information:",
        "    compat: 1.1",
        "    bitmaps:",
        "        [0]:",
        "            flags:",
        "                [0]: auto",
        "            name: b0",
        "            granularity: 65536",
    ]


def test_json_is_one_object_or_a_list() -> None:
    infos = [{"filename": "a"}, {"filename": "b"}]
    assert json.loads(format_json(infos, backing_chain=False)) == {"filename": "a"}
    assert json.loads(format_json(infos, backing_chain=True)) == infos


def test_info_command_matches_qemu_img(chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", os.fspath(chain)]) == 0
    assert capsys.readouterr().out == qemu_img("info", chain)
    assert main(["info", "--output", "json", "--backing-chain", os.fspath(chain)]) == 0
    ours = json.loads(capsys.readouterr().out)
    theirs = json.loads(qemu_img("info", "--output", "json", "--backing-chain", chain))
    assert [i["virtual-size"] for i in ours] == [i["virtual-size"] for i in theirs]
    assert [i["filename"] for i in ours] == [i["filename"] for i in theirs]


def test_info_bad_image_is_one_line(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.qcow2"
    # qcow2 magic, then an impossible version: not an image qfuse can read
    # (a file without the magic is described as raw, as qemu-img does).
    bogus.write_bytes(b"QFI\xfb" + (99).to_bytes(4, "big") + bytes(504))
    missing = tmp_path / "missing.qcow2"
    for path in (bogus, missing):
        result = subprocess.run(
            [sys.executable, "-m", "qfuse", "info", os.fspath(path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.startswith(f"qfuse: {path}")
        assert result.stderr.count("\n") == 1
