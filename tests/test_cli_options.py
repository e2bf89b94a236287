"""Option parsing of `qfuse mount` (long and ``-o`` forms), without mounting."""

from __future__ import annotations

import pytest

from qfuse.cli.main import main, mount_options_from_args, parse_args
from qfuse.cli.mountopts import (
    CACHE_MODES,
    MountOptions,
    apply_o_options,
    parse_size,
)
from qfuse.errors import UsageError


def o(*strings: str) -> MountOptions:
    return apply_o_options(MountOptions(), strings)


def mount_options(*argv: str) -> MountOptions:
    return mount_options_from_args(parse_args(argv))


# -- sizes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("65536", 65536),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("64KiB", 64 << 10),
        ("1M", 1 << 20),
        ("32m", 32 << 20),
        ("2G", 2 << 30),
        ("1T", 1 << 40),
        ("4MB", 4 << 20),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "K", "1.5M", "-1", "1X", "12 34", "0x10", "1MM"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_size(text, "l2_cache_size")
    assert "l2_cache_size" in str(info.value)
    assert info.value.exit_status == 2


# -- the -o form ---------------------------------------------------------------


def test_defaults() -> None:
    assert o() == MountOptions()
    assert MountOptions().cache == "writeback"


@pytest.mark.parametrize("mode", CACHE_MODES)
def test_o_cache(mode: str) -> None:
    assert o(f"cache={mode}").cache == mode


def test_o_every_qfuse_option() -> None:
    opts = o("cache=none,ro,snapshot=before upgrade,l2_cache_size=4M,allow_other,vmdk")
    assert opts == MountOptions(
        cache="none",
        read_only=True,
        snapshot="before upgrade",
        l2_cache_size=4 << 20,
        allow_other=True,
        vmdk=True,
    )


def test_o_several_strings_and_later_wins() -> None:
    opts = o("cache=none", "cache=unsafe,ro")
    assert opts.cache == "unsafe"
    assert opts.read_only


def test_o_rw_after_ro_is_read_write() -> None:
    # mount(8) semantics: the last of ro/rw counts.
    assert not o("ro,rw").read_only
    assert o("rw,ro").read_only


@pytest.mark.parametrize(
    "generic",
    [
        "rw", "defaults", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto",
        "noauto", "nofail", "_netdev", "user", "users", "nouser", "async", "sync",
        "atime", "noatime", "relatime", "strictatime", "lazytime",
        "x-systemd.automount", "x-systemd.requires=/srv", "x-systemd.device-timeout=10s",
        "x-gvfs-show", "comment=systemd.automount", "default_permissions",
    ],
)  # fmt: skip
def test_o_generic_options_are_ignored(generic: str) -> None:
    assert o(generic) == MountOptions()


def test_o_what_mount_fuse3_passes() -> None:
    # mount.fuse3 appends dev,suid unless nodev/nosuid were given.
    assert o("rw,noauto,cache=writethrough,dev,suid") == MountOptions(cache="writethrough")


def test_o_empty_items_and_spaces() -> None:
    assert o(",ro,, cache=none ,") == MountOptions(read_only=True, cache="none")


def test_o_escaped_comma_in_value() -> None:
    assert o(r"snapshot=a\,b,ro").snapshot == "a,b"


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("bogus", "unknown mount option 'bogus'"),
        ("cache=fast", "cache mode 'fast' is unknown"),
        ("cache", "'cache' needs a value"),
        ("cache=", "'cache' needs a value"),
        ("snapshot=", "'snapshot' needs a value"),
        ("l2_cache_size=lots", "l2_cache_size: not a byte count"),
        ("ro=1", "'ro' takes no value"),
        ("allow_other=yes", "'allow_other' takes no value"),
        ("auto_unmount", "unknown mount option 'auto_unmount'"),
        ("Ro", "unknown mount option 'Ro'"),
    ],
)
def test_o_errors(item: str, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        o(f"rw,{item}")
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


# -- the command line ----------------------------------------------------------


def test_long_options() -> None:
    opts = mount_options(
        "mount", "img.qcow2", "mnt", "--cache", "directsync", "--read-only",
        "--snapshot", "s1", "--l2-cache-size", "1M", "--allow-other", "--vmdk",
        "--foreground", "--debug",
    )  # fmt: skip
    assert opts == MountOptions("directsync", True, "s1", 1 << 20, True, True, True, True)


def test_short_foreground() -> None:
    assert mount_options("mount", "i", "m", "-f").foreground


def test_long_options_win_over_o() -> None:
    opts = mount_options("mount", "i", "m", "-o", "cache=none,l2_cache_size=1M", "--cache",
                         "unsafe", "--l2-cache-size", "2M")  # fmt: skip
    assert (opts.cache, opts.l2_cache_size) == ("unsafe", 2 << 20)


def test_mount_fuse3_form_has_no_command_word() -> None:
    args = parse_args(["/srv/disk.qcow2", "/mnt/disk.raw", "-o", "rw,ro,cache=none"])
    assert args.command == "mount"
    assert (args.image, args.mountpoint) == ("/srv/disk.qcow2", "/mnt/disk.raw")
    opts = mount_options_from_args(args)
    assert opts.read_only and opts.cache == "none"


def test_repeated_o() -> None:
    opts = mount_options("mount", "i", "m", "-o", "ro", "-o", "vmdk")
    assert opts.read_only and opts.vmdk


def test_umount_and_info_parse() -> None:
    assert parse_args(["umount", "m"]).mountpoint == "m"
    args = parse_args(["info", "x.qcow2", "--output", "json", "--backing-chain"])
    assert (args.image, args.output, args.backing_chain) == ("x.qcow2", "json", True)
    assert parse_args(["info", "x.qcow2"]).output == "human"


@pytest.mark.parametrize("command", ["chekc", "snapshto", "mnt"])
def test_mistyped_command_is_not_a_mount(command: str) -> None:
    # Never read as the mount.fuse3 form, which would mount a file named
    # after the command over the image.
    with pytest.raises(UsageError) as info:
        parse_args([command, "disk.qcow2"])
    assert "invalid choice" in str(info.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["mount", "i", "m", "--cache", "fast"],
        ["mount", "i", "m", "--l2-cache-size", "1Q"],
        ["mount", "i", "m", "--bogus"],
        ["mount", "i", "m", "--read"],  # no abbreviations
        ["mount", "i"],
        ["info", "x", "--output", "yaml"],
        [],
    ],
)
def test_usage_errors_are_one_line_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("qfuse: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_bad_o_option_through_main(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["img", "mnt", "-o", "rw,frobnicate"]) == 2
    assert capsys.readouterr().err == "qfuse: unknown mount option 'frobnicate'\n"


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["mount", "--help"])
    assert info.value.code == 0
    assert "--l2-cache-size" in capsys.readouterr().out
