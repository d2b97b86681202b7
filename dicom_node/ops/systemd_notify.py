"""A tiny sd_notify(3): tell systemd (Type=notify) that the node is ready, alive, stopping.

No dependency on libsystemd: one AF_UNIX datagram per message to ``$NOTIFY_SOCKET``.
A socket name starting with ``@`` is in the abstract namespace (a leading NUL byte).
When ``$NOTIFY_SOCKET`` is unset (not started by systemd, tests, a terminal) every
call is a no-op that returns False, so callers never need to check.

Typical use in the service::

    notifier = Notifier.from_environment()
    node.start(heartbeat=notifier.watchdog)     # WATCHDOG=1 from the scheduler sweep
    notifier.ready(f"listening on {port}")       # READY=1 once SCP and model are up
    ...
    notifier.stopping()                          # STOPPING=1 on SIGTERM
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def _address(name: str) -> str | bytes | None:
    """Socket address from $NOTIFY_SOCKET: a path, or '@name' for the abstract namespace."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None  # vsock and other forms are not used by the service manager here


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one sd_notify message (``KEY=VALUE`` lines). True if it was sent.

    Errors are logged, never raised: a lost notification must not stop the node
    (systemd then times the start out or the watchdog fires, which is the signal).
    """
    env = os.environ if environ is None else environ
    name = env.get(NOTIFY_SOCKET_ENV, "")
    if not name:
        return False
    address = _address(name)
    if address is None:
        log.warning("unsupported NOTIFY_SOCKET %r: notifications disabled", name)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify %r failed: %s", message.split("\n", 1)[0], exc)
        return False
    return True


def _clean(text: str) -> str:
    """One line: STATUS= ends at the first newline."""
    return " ".join(text.split())


def ready(status_text: str | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """READY=1 (optionally with STATUS=): start-up finished, the SCP listens."""
    lines = ["READY=1", f"MAINPID={os.getpid()}"]
    if status_text:
        lines.append(f"STATUS={_clean(status_text)}")
    return notify("\n".join(lines), environ)


def watchdog(environ: Mapping[str, str] | None = None) -> bool:
    """WATCHDOG=1: the scheduler is alive. Call more often than WatchdogSec/2."""
    return notify("WATCHDOG=1", environ)


def stopping(status_text: str | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """STOPPING=1: shutdown has begun (systemd shows 'deactivating')."""
    lines = ["STOPPING=1"]
    if status_text:
        lines.append(f"STATUS={_clean(status_text)}")
    return notify("\n".join(lines), environ)


def status(text: str, environ: Mapping[str, str] | None = None) -> bool:
    """STATUS=...: a one-line free text shown by ``systemctl status``."""
    return notify(f"STATUS={_clean(text)}", environ)


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds from $WATCHDOG_USEC, or None when not enabled.

    Like sd_watchdog_enabled(3): ignored when $WATCHDOG_PID names another process.
    Ping at least every half of this value.
    """
    env = os.environ if environ is None else environ
    raw = env.get(WATCHDOG_USEC_ENV, "")
    if not raw:
        return None
    pid = env.get(WATCHDOG_PID_ENV, "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring malformed %s=%r", WATCHDOG_USEC_ENV, raw)
        return None
    return usec / 1_000_000 if usec > 0 else None


class Notifier:
    """The helpers bound to one environment snapshot, with a rate-limited watchdog.

    The scheduler's sweep runs every ``sweep_interval_s`` (1 s by default); the
    notifier sends WATCHDOG=1 at most every ``min_interval_s`` (a quarter of the
    watchdog timeout, at most 1 s apart when no timeout is known).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._env: dict[str, str] = dict(os.environ if environ is None else environ)
        interval = watchdog_interval_s(self._env)
        self.enabled = bool(self._env.get(NOTIFY_SOCKET_ENV))
        self.watchdog_timeout_s = interval
        self.min_interval_s = min(1.0, interval / 4) if interval else 1.0
        self._last_ping = float("-inf")

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls()

    def ready(self, status_text: str | None = None) -> bool:
        return ready(status_text, self._env)

    def watchdog(self) -> None:
        """Heartbeat callable for Node.start(heartbeat=...)."""
        now = time.monotonic()
        if now - self._last_ping < self.min_interval_s:
            return
        self._last_ping = now
        watchdog(self._env)

    def stopping(self, status_text: str | None = None) -> bool:
        return stopping(status_text, self._env)

    def status(self, text: str) -> bool:
        return status(text, self._env)
