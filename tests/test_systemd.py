"""The systemd side: sd_notify over a real AF_UNIX socket, the unit file as systemd sees it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicom_node.config import NodeConfig
from dicom_node.ops import systemd_notify
from dicom_node.service import Node
from tests.conftest import REPO, free_port, pynetdicom_send, subprocess_node_toml, wait_for
from tests.dicom_factory import SeriesSpec, write_series

UNIT = REPO / "systemd" / "dicom-node.service"
ROLES = ("receiver", "worker", "sender")
#: One unit per role (several nodes on one PostgreSQL): dicom-node-<role>.service.
ROLE_UNITS = {role: REPO / "systemd" / f"dicom-node-{role}.service" for role in ROLES}
PORT_104_DROPIN = REPO / "systemd" / "port-104.conf"
MAX_EXPOSURE = 2.0


# -- a notify socket the way systemd makes one ----------------------------------------------
class NotifySocket:
    """A bound AF_UNIX datagram socket collecting sd_notify messages."""

    def __init__(self, address: str | bytes, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.env = {systemd_notify.NOTIFY_SOCKET_ENV: env_value}
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                return self.messages

    def saw(self, line: str) -> bool:
        return any(line in message.split("\n") for message in self.drain())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    path = tmp_path / "notify"
    if len(str(path)) >= 100:  # sun_path is 108 bytes
        pytest.skip(f"tmp path too long for an AF_UNIX socket: {path}")
    notify_socket = NotifySocket(str(path), str(path))
    yield notify_socket
    notify_socket.close()


@pytest.fixture
def abstract_socket() -> Iterator[NotifySocket]:
    name = f"dicom-node-test-{uuid.uuid4().hex}"
    notify_socket = NotifySocket(b"\0" + name.encode(), "@" + name)
    yield notify_socket
    notify_socket.close()


def test_ready_status_stopping_reach_a_path_socket(path_socket: NotifySocket) -> None:
    env = path_socket.env
    assert systemd_notify.ready("listening on 127.0.0.1:11112\nmodel x", env)
    assert systemd_notify.status("3 series queued", env)
    assert systemd_notify.watchdog(env)
    assert systemd_notify.stopping("draining", env)
    messages = path_socket.drain()
    assert messages[0].split("\n") == ["READY=1", f"MAINPID={os.getpid()}",
                                       "STATUS=listening on 127.0.0.1:11112 model x"]
    assert messages[1:] == ["STATUS=3 series queued", "WATCHDOG=1",
                            "STOPPING=1\nSTATUS=draining"]


def test_abstract_namespace_socket(abstract_socket: NotifySocket) -> None:
    assert systemd_notify.watchdog(abstract_socket.env)
    assert abstract_socket.drain() == ["WATCHDOG=1"]


def test_no_socket_is_a_quiet_no_op(tmp_path: Path) -> None:
    assert systemd_notify.ready(environ={}) is False
    assert systemd_notify.watchdog(environ={"NOTIFY_SOCKET": ""}) is False
    # a socket that went away: logged, not raised
    assert systemd_notify.watchdog(environ={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_watchdog_interval_from_environment() -> None:
    pid = str(os.getpid())
    assert systemd_notify.watchdog_interval_s({}) is None
    assert systemd_notify.watchdog_interval_s({"WATCHDOG_USEC": "60000000"}) == 60.0
    assert systemd_notify.watchdog_interval_s(
        {"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": pid}) == 2.5
    assert systemd_notify.watchdog_interval_s(
        {"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert systemd_notify.watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None
    assert systemd_notify.watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None


def test_notifier_rate_limits_the_watchdog(path_socket: NotifySocket) -> None:
    notifier = systemd_notify.Notifier({**path_socket.env, "WATCHDOG_USEC": "2000000"})
    assert notifier.enabled and notifier.watchdog_timeout_s == 2.0
    assert notifier.min_interval_s == 0.5
    for _ in range(20):
        notifier.watchdog()
    assert path_socket.drain() == ["WATCHDOG=1"]
    time.sleep(0.6)
    notifier.watchdog()
    assert path_socket.drain() == ["WATCHDOG=1", "WATCHDOG=1"]


def test_running_node_pings_the_watchdog_from_its_sweep(
        path_socket: NotifySocket, make_config: Callable[..., NodeConfig]) -> None:
    """The scheduler heartbeat drives WATCHDOG=1: stop the scheduler and the pings stop."""
    notifier = systemd_notify.Notifier({**path_socket.env, "WATCHDOG_USEC": "1000000"})
    node = Node(make_config())
    node.start(heartbeat=notifier.watchdog)
    try:
        assert wait_for(lambda: path_socket.drain().count("WATCHDOG=1") >= 3, 20)
    finally:
        node.stop()
    path_socket.drain()
    before = len(path_socket.messages)
    time.sleep(1.0)
    assert len(path_socket.drain()) == before


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_serve_under_a_notify_socket_reports_ready_watchdog_stopping(
        tmp_path: Path, path_socket: NotifySocket, test_weights: Path) -> None:
    """`dicom-node serve` as systemd runs it: READY once listening, WATCHDOG, STOPPING, exit 0."""
    port = free_port()
    sections: dict[str, dict[str, object]] = {
        "node": {"data_dir": str(tmp_path / "node")},
        "receiver": {"ae_title": "DICOMNODE", "port": port, "min_free_disk_mb": 1.0},
        "series": {"stable_after_s": 1.0, "sweep_interval_s": 0.25},
        "model": {"weights_path": str(test_weights), "device": "cpu"},
    }
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())
                   for name, values in sections.items())
    config = tmp_path / "config.toml"
    config.write_text(text)
    env = {**os.environ, **path_socket.env, "WATCHDOG_USEC": "2000000"}
    binary = Path(sys.executable).with_name("dicom-node")
    proc = subprocess.Popen([str(binary), "serve", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: path_socket.saw("READY=1") or proc.poll() is not None, 60)
        assert proc.poll() is None, proc.communicate()[0]
        assert path_socket.saw("READY=1"), path_socket.messages
        # READY means listening: a connection succeeds right away
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        assert wait_for(lambda: path_socket.saw("WATCHDOG=1"), 10), path_socket.messages
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert path_socket.saw("STOPPING=1"), path_socket.messages
        ready_at = next(i for i, m in enumerate(path_socket.messages) if "READY=1" in m)
        stopping_at = next(i for i, m in enumerate(path_socket.messages) if "STOPPING=1" in m)
        assert ready_at < stopping_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the unit file ------------------------------------------------------------------------
def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze not installed (Debian package 'systemd')")
    return path


def _installable_copy(tmp_path: Path, dropins: tuple[Path, ...] = (),
                      source: Path = UNIT) -> Path:
    """The unit with ExecStart pointing at this checkout's dicom-node (verify needs it)."""
    binary = Path(sys.executable).with_name("dicom-node")
    assert binary.exists(), f"{binary} missing: is the project installed in the venv?"
    text = source.read_text()
    assert "ExecStart=/opt/dicom-node/.venv/bin/dicom-node serve" in text
    unit = tmp_path / "units" / source.name
    unit.parent.mkdir(parents=True)
    unit.write_text(text.replace("ExecStart=/opt/dicom-node/.venv/bin/dicom-node",
                                 f"ExecStart={binary}"))
    if dropins:
        folder = unit.parent / f"{source.name}.d"
        folder.mkdir()
        for dropin in dropins:
            shutil.copy(dropin, folder / dropin.name)
    return unit


def _verify(tool: str, unit: Path) -> None:
    result = subprocess.run([tool, "verify", unit.name], cwd=unit.parent, capture_output=True,
                            text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    # verify exits 0 on unknown keys or bad values ("... ignoring"): fail on any remark
    assert result.returncode == 0, output
    assert unit.name not in output and "ignoring" not in output, output


def _exposure(tool: str, unit: Path) -> float:
    result = subprocess.run([tool, "security", "--offline=yes", unit.name], cwd=unit.parent,
                            capture_output=True, text=True, timeout=60, check=False)
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", output)
    assert match, output
    for line in output.splitlines():
        if line.startswith("✗"):
            print(line.rstrip())
    print(match.group(0))
    return float(match.group(1))


def test_unit_verifies(tmp_path: Path) -> None:
    _verify(_systemd_analyze(), _installable_copy(tmp_path))


def _keys(unit: Path) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            keys.setdefault(key, []).append(value)
    return keys


def test_unit_is_notify_with_watchdog_and_directories() -> None:
    keys = _keys(UNIT)
    assert keys["Type"] == ["notify"] and keys["NotifyAccess"] == ["main"]
    assert float(keys["WatchdogSec"][0]) > 0 and keys["Restart"] == ["on-failure"]
    assert keys["StateDirectory"] == ["dicom-node"]
    assert keys["ConfigurationDirectory"] == ["dicom-node"]
    assert keys["ExecStart"][0].endswith("serve --config /etc/dicom-node/config.toml")
    assert "PrivateDevices" not in keys and "MemoryDenyWriteExecute" not in keys


def test_unit_security_exposure_at_most_2(tmp_path: Path) -> None:
    score = _exposure(_systemd_analyze(), _installable_copy(tmp_path))
    assert score <= MAX_EXPOSURE


def test_port_104_dropin_verifies_and_stays_ok(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    unit = _installable_copy(tmp_path, (PORT_104_DROPIN,))
    _verify(tool, unit)
    assert _exposure(tool, unit) <= MAX_EXPOSURE


@pytest.mark.parametrize("role", ROLES)
def test_role_unit_verifies_and_stays_ok(tmp_path: Path, role: str) -> None:
    tool = _systemd_analyze()
    unit = _installable_copy(tmp_path, source=ROLE_UNITS[role])
    _verify(tool, unit)
    assert _exposure(tool, unit) <= MAX_EXPOSURE


def test_receiver_unit_takes_the_port_104_dropin(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    unit = _installable_copy(tmp_path, (PORT_104_DROPIN,), source=ROLE_UNITS["receiver"])
    _verify(tool, unit)
    assert _exposure(tool, unit) <= MAX_EXPOSURE


#: What a role's unit may set differently from dicom-node.service: what it runs and how
#: long it may take, its name, the shared dynamic user, and (receiver, sender: no model)
#: no GPU devices and no writable-then-executable memory.
PER_ROLE = {"Description", "ExecStart", "TimeoutStartSec", "TimeoutStopSec",
            "SyslogIdentifier", "User", "Group", "Conflicts"}
NO_MODEL = {"DeviceAllow", "PrivateDevices", "MemoryDenyWriteExecute"}


@pytest.mark.parametrize("role", ROLES)
def test_role_unit_keeps_the_node_units_hardening(role: str) -> None:
    base, keys = _keys(UNIT), _keys(ROLE_UNITS[role])
    allowed = PER_ROLE | (NO_MODEL if role != "worker" else set())
    changed = {k for k in set(base) | set(keys) if base.get(k) != keys.get(k)}
    assert changed <= allowed, changed - allowed
    assert keys["ExecStart"] == [
        f"/opt/dicom-node/.venv/bin/dicom-node serve --role {role} "
        "--config /etc/dicom-node/config.toml"]
    # one dynamic UID for every role on a machine (they share the state directory)
    assert keys["DynamicUser"] == ["yes"] and keys["User"] == keys["Group"] == ["dicom-node"]
    assert keys["Conflicts"] == ["dicom-node.service"]
    assert keys["Type"] == ["notify"] and float(keys["WatchdogSec"][0]) > 0
    if role == "worker":  # the model on the GPU: as the all-in-one node
        assert keys["DeviceAllow"] == base["DeviceAllow"]
        assert "PrivateDevices" not in keys and "MemoryDenyWriteExecute" not in keys
    else:
        assert "DeviceAllow" not in keys
        assert keys["PrivateDevices"] == keys["MemoryDenyWriteExecute"] == ["yes"]


ROLE_UNDER_MDWE = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(77)
from dicom_node.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("role", "ready"), [("receiver", "listening as"),
                                              ("sender", "draining the outbox")])
def test_no_model_roles_run_under_memory_deny_write_execute(
        tmp_path: Path, test_weights: Path, role: str, ready: str) -> None:
    """Why the receiver and sender units can set MemoryDenyWriteExecute=yes: each role,
    started under the kernel's PR_SET_MDWE (the same rule), gets ready, works and stops
    cleanly. The receiver also stores an instance (pydicom, pynetdicom, SQLite)."""
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(subprocess_node_toml(tmp_path / "node", port, test_weights, "TESTSCU",
                                           "PACS", free_port()))
    proc = subprocess.Popen([sys.executable, "-c", ROLE_UNDER_MDWE, "serve", "--role", role,
                             "--config", str(config)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # ends if the process exits before it is ready
            lines.append(line)
            if ready in line:
                break
        if proc.poll() == 77:
            pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
        assert any(ready in line for line in lines), "".join(lines)
        if role == "receiver":
            files = write_series(tmp_path / "t1c", SeriesSpec(n_slices=2), seed=5)
            assert pynetdicom_send(files, port, calling_ae="TESTSCU") == [0, 0]
        proc.terminate()
        rest = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, "".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


MDWE_PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(77)
import torch
from dicom_node.inference.generator import build_generator
generator = build_generator("unet_128", 8, output_nc=3).eval()
with torch.inference_mode():
    generator(torch.zeros(1, 1, 128, 128))
"""


def test_memory_deny_write_execute_would_break_inference() -> None:
    """Why the unit leaves MemoryDenyWriteExecute= out: PyTorch's JIT kernels need W^X flips.

    PR_SET_MDWE (Linux >= 6.3) is the kernel's version of the same rule.
    """
    result = subprocess.run([sys.executable, "-c", MDWE_PROBE], cwd=REPO, capture_output=True,
                            text=True, timeout=300, check=False)
    if result.returncode == 77:
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3)")
    assert result.returncode != 0, "inference works under MDWE: consider MemoryDenyWriteExecute=yes"
    assert "could not create a primitive" in result.stderr or result.returncode < 0, result.stderr
