"""DICOM TLS (PS3.15 Annex B secure transport): typed settings and ``ssl`` contexts.

One ``TlsConfig`` is parsed from a TOML table: ``[tls]`` for the receiver, and a
``tls`` sub-table in each ``[[destinations]]`` entry for the sender. Relative paths
are resolved against the config file's directory; missing files and bad values fail
at start with a ``dicom_node.errors.ConfigError`` naming the key.

- ``server_context(cfg)`` is given to ``AE.start_server(..., ssl_context=ctx)``. It
  presents the node's certificate and, when ``require_client_cert`` is set, refuses
  any peer without a certificate signed by ``ca_file``.
- ``client_tls_args(cfg, host)`` gives the ``tls_args`` for ``AE.associate``: the
  destination's certificate is verified against ``ca_file`` (hostname or IP address
  checked unless ``check_hostname = false``) and the node's own certificate is
  offered when ``cert_file`` is set.

pynetdicom 3.0.4 wraps each accepted socket in the thread that accepts connections,
with the handshake done at once: one peer that opens a TCP connection and says
nothing would hold up every other caller. The server context here defers the
handshake to the association's own thread (it happens on the first read, under the
association's timeouts), so a silent or slow peer only blocks itself.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dicom_node.errors import ConfigError

TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
Role = Literal["server", "client"]
_KEYS = ("enabled", "cert_file", "key_file", "ca_file", "require_client_cert", "min_version",
         "ciphers", "check_hostname", "server_hostname")


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings of one side of an association; ``enabled = False`` means plain TCP.

    - ``cert_file`` / ``key_file``: PEM certificate (chain) and unencrypted private key
      of this node. Required on the server; on the client only when the peer asks for
      a client certificate.
    - ``ca_file``: PEM bundle of the CA(s) trusted to sign the peer's certificate.
      Required on the client (the server is always verified) and on the server when
      ``require_client_cert`` is set.
    - ``require_client_cert`` (server): refuse peers without a trusted certificate.
      Without it, a client certificate is still verified when ``ca_file`` is set and
      the peer offers one.
    - ``min_version``: ``"TLSv1.2"`` (default, BCP 195) or ``"TLSv1.3"``.
    - ``ciphers``: an OpenSSL cipher string for TLS 1.2; ``None`` keeps Python's
      secure defaults. TLS 1.3 suites are not affected.
    - ``check_hostname`` (client): match the peer certificate's subjectAltName against
      ``server_hostname`` or the destination host (an IP address is matched against
      IP SAN entries). ``False`` trusts any certificate signed by ``ca_file``; use it
      for peers addressed by IP whose certificate has no IP SAN.
    - ``server_hostname`` (client): the name to check (and send as SNI) instead of
      the host the node connects to.
    """

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False
    min_version: str = "TLSv1.2"
    ciphers: str | None = None
    check_hostname: bool = True
    server_hostname: str | None = None


def parse_tls(raw: Mapping[str, Any] | None, base_dir: Path, *, section: str,
              role: Role) -> TlsConfig:
    """Validate a TOML table into a TlsConfig; errors name ``section.key``.

    ``role`` is ``"server"`` for the receiver's ``[tls]`` and ``"client"`` for a
    destination's ``tls`` table: it decides which files are required.
    """
    if raw is None:
        return TlsConfig()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{section}] must be a table")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ConfigError(f"[{section}] unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")

    def flag(key: str, default: bool) -> bool:
        value = raw.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{section}.{key} must be true or false")
        return value

    def text(key: str) -> str | None:
        value = raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{section}.{key} must be a non-empty string")
        return value

    def path(key: str) -> Path | None:
        value = text(key)
        if value is None:
            return None
        resolved = Path(value).expanduser()
        if not resolved.is_absolute():
            resolved = (base_dir / resolved).resolve()
        return resolved

    enabled = flag("enabled", False)
    require_client_cert = flag("require_client_cert", False)
    check_hostname = flag("check_hostname", True)
    min_version = text("min_version") or "TLSv1.2"
    if min_version not in TLS_VERSIONS:
        raise ConfigError(f"{section}.min_version must be one of {sorted(TLS_VERSIONS)}, "
                          f"got {min_version!r}")
    cfg = TlsConfig(enabled=enabled, cert_file=path("cert_file"), key_file=path("key_file"),
                    ca_file=path("ca_file"), require_client_cert=require_client_cert,
                    min_version=min_version, ciphers=text("ciphers"),
                    check_hostname=check_hostname, server_hostname=text("server_hostname"))
    if role == "server" and ("check_hostname" in raw or "server_hostname" in raw):
        raise ConfigError(f"{section}: check_hostname and server_hostname apply to "
                          "destinations (the client side) only")
    if role == "client" and require_client_cert:
        raise ConfigError(f"{section}.require_client_cert applies to the receiver only")
    if not enabled:
        return cfg

    required = ["cert_file", "key_file"] if role == "server" else ["ca_file"]
    if role == "server" and require_client_cert:
        required.append("ca_file")
    for key in required:
        if getattr(cfg, key) is None:
            raise ConfigError(f"{section}.{key} is required when {section}.enabled = true"
                              + (" and require_client_cert = true" if key == "ca_file"
                                 and role == "server" else ""))
    if (cfg.cert_file is None) != (cfg.key_file is None):
        raise ConfigError(f"{section}: give both cert_file and key_file, or neither")
    for key in ("cert_file", "key_file", "ca_file"):
        file = getattr(cfg, key)
        if file is not None and not file.is_file():
            raise ConfigError(f"{section}.{key}: file not found: {file}")
    # Build the context once so unreadable PEM, a key that does not match the
    # certificate or a bad cipher string fail at start, not on the first association.
    if role == "server":
        server_context(cfg, section=section)
    else:
        client_context(cfg, section=section)
    return cfg


class _DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets shake hands on first use, not on accept.

    pynetdicom calls ``wrap_socket(sock, server_side=True)`` in its accept loop;
    with the handshake deferred, OpenSSL performs it inside the first ``recv`` in
    the association's thread, and a failure there closes only that association.
    """

    def wrap_socket(
        self, sock: socket.socket, server_side: bool = False,
        do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None, session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock, server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect and not server_side,
            suppress_ragged_eofs=suppress_ragged_eofs, server_hostname=server_hostname,
            session=session)


def _configure(ctx: ssl.SSLContext, cfg: TlsConfig, section: str) -> None:
    ctx.minimum_version = TLS_VERSIONS[cfg.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION
    if cfg.ciphers is not None:
        try:
            ctx.set_ciphers(cfg.ciphers)
        except ssl.SSLError as exc:
            raise ConfigError(f"{section}.ciphers {cfg.ciphers!r} selects no usable cipher: "
                              f"{exc}") from exc
    if cfg.cert_file is not None and cfg.key_file is not None:
        try:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{section}.cert_file / {section}.key_file: cannot load "
                              f"{cfg.cert_file} with {cfg.key_file} (unreadable, encrypted "
                              f"or not a matching pair): {exc}") from exc
    if cfg.ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=cfg.ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{section}.ca_file: cannot load {cfg.ca_file}: {exc}") from exc


def server_context(cfg: TlsConfig, *, section: str = "tls") -> ssl.SSLContext:
    """The receiver's context for ``AE.start_server(..., ssl_context=...)``."""
    if cfg.cert_file is None or cfg.key_file is None:
        raise ConfigError(f"{section}.cert_file and {section}.key_file are required")
    if cfg.require_client_cert and cfg.ca_file is None:
        raise ConfigError(f"{section}.ca_file is required when require_client_cert = true")
    ctx = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(ctx, cfg, section)
    if cfg.require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif cfg.ca_file is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(cfg: TlsConfig, *, section: str = "tls") -> ssl.SSLContext:
    """The sender's context: verifies the peer against ``ca_file`` (never the system store)."""
    if cfg.ca_file is None:
        raise ConfigError(f"{section}.ca_file is required to verify the destination")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = cfg.check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    _configure(ctx, cfg, section)
    return ctx


def client_tls_args(cfg: TlsConfig, host: str, *,
                    section: str = "tls") -> tuple[ssl.SSLContext, str] | None:
    """``tls_args`` for ``AE.associate``; None when TLS is off for this destination.

    The context is built on each call, so renewed certificate files are picked up by
    the next association without a restart.
    """
    if not cfg.enabled:
        return None
    return client_context(cfg, section=section), cfg.server_hostname or host


def peer_certificate_subject(sock: object) -> str | None:
    """The verified peer certificate's subject as ``CN=...,O=...``, for the audit log.

    ``sock`` is ``assoc.dul.socket.socket``; None for plain TCP, before the handshake
    or when the peer sent no certificate.
    """
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cert = sock.getpeercert()
    except ValueError:  # handshake not done yet
        return None
    if not cert:
        return None
    subject: Any = cert.get("subject", ())
    parts = [f"{name}={value}" for rdn in subject for name, value in rdn]
    return ",".join(parts) or None
