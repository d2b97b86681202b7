"""What this host and its network say about an address, in words an admin can act on:
can the node listen there, does a host name resolve, why a connection failed.

``dicom-node check-config`` and ``serve`` ask before they start (so a port in use is one
line naming the config key, not a traceback); the sender asks after an association
failed, so the outbox says "connection refused" rather than "association aborted".
"""

from __future__ import annotations

import errno
import ipaddress
import socket


def bind_problem(address: str, port: int) -> str | None:
    """Why the node could not listen on ``address:port`` (None: it can), trying the bind
    as the receiver does (SO_REUSEADDR, so a port in TIME_WAIT counts as free)."""
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"{address!r} does not resolve ({exc.strerror})"
    family, kind, proto, _name, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {address} is already in use by another process"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{address} is not an address of this host"
            if exc.errno == errno.EACCES:
                return (f"no permission to listen on port {port} (ports below 1024 need "
                        "CAP_NET_BIND_SERVICE: systemd/port-104.conf)")
            return f"cannot listen on {address}:{port}: {exc.strerror or exc}"
    return None


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def resolve(host: str) -> tuple[list[str], str | None]:
    """The IP addresses ``host`` resolves to (an IP address resolves to itself), and why
    not if it does not."""
    if is_ip_address(host):
        return [host], None
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return [], f"host name {host!r} does not resolve ({exc.strerror})"
    except UnicodeError:
        return [], f"{host!r} is not a valid host name"
    return sorted({str(info[4][0]) for info in infos}), None


def connect_failure(host: str, port: int, timeout_s: float) -> str | None:
    """Why a TCP connection to ``host:port`` fails ("connection refused", "host name does
    not resolve", "timed out after 10 s", ...); None if it connects (then the DICOM
    association itself failed: the peer aborted or did not answer)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except socket.gaierror as exc:
        return f"host name {host!r} does not resolve ({exc.strerror})"
    except ConnectionRefusedError:
        return "connection refused (nothing listens on that port)"
    except TimeoutError:
        return f"no answer to the connection within {timeout_s:g} s (host down or firewalled)"
    except OSError as exc:
        return f"cannot connect: {exc.strerror or exc}"
