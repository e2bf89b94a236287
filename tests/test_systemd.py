"""The systemd units in systemd/: they verify, and their command lines work.

No unit is started by a systemd manager in this module (PID 1 here is not
systemd); test_systemd_boot.py does that, booting a systemd container to run
the shipped qfuse@.service with its hardening in force, the shipped .mount
unit and the documented fstab line.  What is checked here:

* `systemd-analyze verify` accepts every unit (with ExecStart pointing at
  this checkout's qfuse, since /usr/local/bin/qfuse need not exist);
* no setting of qfuse@.service gives it a private mount namespace (the view
  would then be invisible outside the service), and the hardening keeps what
  mounting needs;
* the service's own command lines, ExecStart and ExecStopPost, taken from the
  unit file and expanded with the example EnvironmentFile the way systemd
  does, run here with a real ``$NOTIFY_SOCKET`` and ``$JOURNAL_STREAM``:
  ``READY=1`` once the view serves, ``STOPPING=1`` on SIGTERM, ``<N>``-prefixed
  log lines, a clean image; after a SIGKILL, ExecStopPost clears the dead
  mount so that a restart works;
* systemd-fstab-generator turns a fuse.qfuse fstab line into a local mount
  (what docs/systemd.md says about ``_netdev`` and ``nofail``).

Generic lifecycle (signals, ``fusermount3 -u``, ``--debug``) is in
test_fuse_lifecycle.py; the helpers and fixtures both use are in
mountutil.py and conftest.py.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from mountutil import (
    PATTERN,
    TIMEOUT,
    Cleanup,
    NotifySocket,
    is_mounted,
    qemu_img_check,
    qfuse_argv,
    wait_until,
)

pytestmark = pytest.mark.mount

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"
SERVICE = UNIT_DIR / "qfuse@.service"
EXAMPLE_CONF = UNIT_DIR / "qfuse-example.conf"
INSTALLED_QFUSE = "/usr/local/bin/qfuse"
FSTAB_GENERATOR = Path("/usr/lib/systemd/system-generators/systemd-fstab-generator")

# Settings that make systemd run a service in a mount namespace of its own
# (exec_needs_mount_namespace() in systemd's src/core/execute.c, v252).
MOUNT_NAMESPACE_SETTINGS = {
    "RootDirectory", "RootImage", "MountImages", "ExtensionImages", "ExtensionDirectories",
    "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths",
    "BindPaths", "BindReadOnlyPaths", "TemporaryFileSystem", "PrivateTmp", "PrivateDevices",
    "PrivateMounts", "PrivateNetwork", "PrivateIPC", "NetworkNamespacePath",
    "IPCNamespacePath", "ProtectSystem", "ProtectHome", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc",
    "ProcSubset", "ProtectHostname", "DynamicUser", "LogNamespace",
}  # fmt: skip


# -- reading units the way systemd does ------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``{"Section.Key": [values...]}`` of a unit file (no continuation lines used)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def environment_file(path: Path) -> dict[str, str]:
    """VAR=value lines (systemd EnvironmentFile=, as the example uses it)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = " ".join(shlex.split(value)) if value.strip() else ""
    return env


_VAR = re.compile(r"\$\$|\$\{(\w+)\}|\$(\w+)")


def expand_command(line: str, env: dict[str, str]) -> list[str]:
    """An Exec*= line as systemd runs it (systemd.service(5), "Command lines").

    The prefixes ``-@:+!`` are dropped; a word that is exactly ``$VAR`` splits
    into words at whitespace; ``${VAR}`` and ``$VAR`` inside a word are
    replaced (an unset variable by nothing); ``$$`` is a literal ``$``.
    """
    words = shlex.split(line)
    words[0] = words[0].lstrip("-@:+!")
    argv: list[str] = []
    for word in words:
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            argv += env.get(whole.group(1), "").split()
            continue
        argv.append(
            _VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m[1] or m[2], ""), word)
        )
    return argv


def service_command(key: str, env: dict[str, str]) -> list[str]:
    """``Service.ExecStart`` (...) of qfuse@.service, with this checkout's qfuse."""
    (line,) = unit_settings(SERVICE)[key]
    argv = expand_command(line, env)
    if argv[0] == INSTALLED_QFUSE:
        argv[:1] = qfuse_argv()
    return argv


# -- fixtures ------------------------------------------------------------------


@pytest.fixture
def conf(tmp_path: Path, image: Path) -> dict[str, str]:
    """The example EnvironmentFile, with the image and view under tmp_path."""
    env = environment_file(EXAMPLE_CONF)
    assert set(env) == {"IMAGE", "MOUNTPOINT", "OPTIONS"}
    env["IMAGE"] = str(image)
    env["MOUNTPOINT"] = str(tmp_path / "disk.raw")
    return env


def start_service(
    cleanup: Cleanup, notify: NotifySocket, conf: dict[str, str], stderr: Path
) -> subprocess.Popen[bytes]:
    """ExecStart as systemd would run it, stderr standing in for the journal stream."""
    mountpoint = Path(conf["MOUNTPOINT"])
    cleanup.mountpoints.append(mountpoint)
    with open(stderr, "wb") as err:
        st = os.fstat(err.fileno())
        env = {**notify.env(), **conf, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = subprocess.Popen(
            service_command("Service.ExecStart", conf), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=err, env=env,
        )  # fmt: skip
    cleanup.procs.append(proc)
    return proc


def stop_post(conf: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """ExecStopPost, which systemd runs with the EnvironmentFile's variables set."""
    return subprocess.run(
        service_command("Service.ExecStopPost", conf), env={**os.environ, **conf},
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip


# -- the units -----------------------------------------------------------------


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip(
            "systemd-analyze is not installed (Debian package 'systemd'; make test adds it)"
        )
    return path


def test_every_unit_verifies(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    qfuse = Path(qfuse_argv()[0])
    assert qfuse.name == "qfuse", "needs the installed console script"
    units = sorted(p for p in UNIT_DIR.iterdir() if p.suffix in (".service", ".mount"))
    assert {p.name for p in units} >= {"qfuse@.service", "var-lib-images-disk.raw.mount"}
    args = []
    for unit in units:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace(INSTALLED_QFUSE, str(qfuse)))
        args.append(str(copy).replace("@.service", "@example.service"))
    result = subprocess.run(
        [analyze, "verify", "--man=no", *args], capture_output=True, text=True, timeout=60
    )
    ours = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if str(tmp_path) in line or any(Path(a).name.split("@")[0] in line for a in args)
    ]
    assert result.returncode == 0, result.stdout + result.stderr
    assert ours == [], ours


def test_no_setting_hides_the_mount_in_a_namespace() -> None:
    keys = {key.split(".", 1)[1] for key in unit_settings(SERVICE)}
    assert keys & MOUNT_NAMESPACE_SETTINGS == set()
    mount_flags = unit_settings(SERVICE).get("Service.MountFlags", ["shared"])
    assert mount_flags == ["shared"]


def test_hardening_keeps_what_mounting_needs() -> None:
    settings = unit_settings(SERVICE)
    assert settings["Service.Type"] == ["notify"]
    assert settings["Service.DeviceAllow"] == ["/dev/fuse rw"]
    assert "CAP_SYS_ADMIN" in settings["Service.CapabilityBoundingSet"][0].split()
    assert "@mount" in settings["Service.SystemCallFilter"][0].split()
    assert settings["Service.KillMode"] == ["mixed"]  # SIGTERM to qfuse itself
    assert settings.get("Service.KillSignal", ["SIGTERM"]) == ["SIGTERM"]
    assert settings["Service.RestartPreventExitStatus"] == ["2"]


# -- the service's command lines -------------------------------------------------


def test_service_notifies_ready_and_stopping_and_logs_for_journald(
    cleanup: Cleanup, notify: NotifySocket, conf: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "journal"
    proc = start_service(cleanup, notify, conf, log)
    assert notify.receive() == b"READY=1"
    view = Path(conf["MOUNTPOINT"])
    with open(view, "rb") as f:
        assert f.read(65536) == PATTERN
    proc.send_signal(signal.SIGTERM)  # KillSignal=, KillMode=mixed
    assert notify.receive() == b"STOPPING=1"
    assert proc.wait(TIMEOUT) == 0
    assert not is_mounted(view)
    qemu_img_check(Path(conf["IMAGE"]))
    lines = log.read_text().splitlines()
    image, mountpoint = conf["IMAGE"], conf["MOUNTPOINT"]
    assert lines == [
        f"<6>{mountpoint}: serving {image} (cache=writeback, read-write)",
        "<6>SIGTERM: unmounting",
        f"<6>{mountpoint}: unmounted, {image} closed",
    ]


def test_empty_options_are_allowed(
    cleanup: Cleanup, notify: NotifySocket, conf: dict[str, str], tmp_path: Path
) -> None:
    conf["OPTIONS"] = ""  # `-o ""`
    proc = start_service(cleanup, notify, conf, tmp_path / "journal")
    assert notify.receive() == b"READY=1"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 0


def test_bad_option_is_one_journal_error_and_exit_2(
    cleanup: Cleanup, notify: NotifySocket, conf: dict[str, str], tmp_path: Path
) -> None:
    conf["OPTIONS"] = "cache=none,turbo"
    log = tmp_path / "journal"
    proc = start_service(cleanup, notify, conf, log)
    assert proc.wait(TIMEOUT) == 2  # RestartPreventExitStatus=2: no restart loop
    assert log.read_text() == "<3>unknown mount option 'turbo'\n"
    assert not is_mounted(Path(conf["MOUNTPOINT"]))


def test_stop_post_clears_only_a_dead_mount_so_restart_works(
    cleanup: Cleanup, notify: NotifySocket, conf: dict[str, str], tmp_path: Path
) -> None:
    view = Path(conf["MOUNTPOINT"])
    proc = start_service(cleanup, notify, conf, tmp_path / "journal1")
    assert notify.receive() == b"READY=1"
    # A live mount at MOUNTPOINT is left alone.
    assert stop_post(conf).returncode == 0
    assert is_mounted(view)
    with open(view, "rb") as f:
        assert f.read(65536) == PATTERN
    # The daemon dies (OOM killer, SIGKILL): the kernel keeps a dead mount.
    proc.kill()
    proc.wait(TIMEOUT)
    assert is_mounted(view)
    with pytest.raises(OSError) as info:
        os.stat(view)
    assert "not connected" in str(info.value)
    # What systemd runs after the main process died: the dead mount goes.
    result = stop_post(conf)
    assert result.returncode == 0, result.stderr
    assert not is_mounted(view)
    # Restart=on-failure: ExecStart again, and the view is back.
    proc = start_service(cleanup, notify, conf, tmp_path / "journal2")
    assert notify.receive() == b"READY=1"
    with open(view, "rb") as f:
        assert f.read(65536) == PATTERN
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT) == 0
    assert wait_until(lambda: not is_mounted(view), TIMEOUT)
    qemu_img_check(Path(conf["IMAGE"]))


# -- fstab through systemd-fstab-generator ---------------------------------------


def test_fstab_line_becomes_a_local_mount(tmp_path: Path) -> None:
    if not FSTAB_GENERATOR.exists():
        pytest.skip(f"{FSTAB_GENERATOR} is not installed (Debian package 'systemd')")
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "/var/lib/images/a.qcow2 /var/lib/images/a.raw fuse.qfuse cache=none 0 0\n"
        "/var/lib/images/b.qcow2 /var/lib/images/b.raw fuse.qfuse "
        "ro,nofail,x-systemd.requires=vm-store.service 0 0\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [FSTAB_GENERATOR, out, out, out], env={**os.environ, "SYSTEMD_FSTAB": str(fstab)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    a = unit_settings(out / "var-lib-images-a.raw.mount")
    assert a["Mount.Type"] == ["fuse.qfuse"]
    # A local filesystem (ordered before local-fs.target, required by it):
    # fuse.qfuse is not a network type, and _netdev is not needed.
    assert a["Unit.Before"] == ["local-fs.target"]
    assert (out / "local-fs.target.requires" / "var-lib-images-a.raw.mount").is_symlink()
    assert not (out / "remote-fs.target.requires").exists()
    b = unit_settings(out / "var-lib-images-b.raw.mount")
    # nofail: only wanted, so a failed mount does not fail the boot.
    assert (out / "local-fs.target.wants" / "var-lib-images-b.raw.mount").is_symlink()
    assert b["Unit.Requires"] == ["vm-store.service"]
    assert b["Unit.After"] == ["vm-store.service"]
