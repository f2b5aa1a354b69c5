"""Sending audit messages to the audit record repository (IHE ATNA): RFC 5424 syslog messages over
UDP (RFC 5426, one message a datagram), TCP (RFC 6587) or TLS (RFC 5425), the last two framed by
octet counting (``MSG-LEN SP SYSLOG-MSG``)."""

from __future__ import annotations

import logging
import os
import socket
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

PRI = 10 * 8 + 5
"""Facility 10 (security/authorization), severity 5 (notice), as IHE ATNA asks."""
MSGID = "IHE+RFC-3881"
APP_NAME = "pneumoscreen"
BOM = b"\xef\xbb\xbf"
MAX_UDP_MESSAGE = 65507


def syslog_message(xml: bytes, *, when: datetime | None = None, hostname: str | None = None,
                   app_name: str = APP_NAME, procid: str | None = None) -> bytes:
    """One RFC 5424 SYSLOG-MSG: ``<85>1 TIMESTAMP HOSTNAME APP-NAME PROCID IHE+RFC-3881 - BOM xml``."""
    when = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    header = " ".join([
        f"<{PRI}>1", when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        _field(hostname or socket.getfqdn(), 255), _field(app_name, 48), _field(procid or str(os.getpid()), 128),
        MSGID, "-",
    ])
    return header.encode("ascii") + b" " + BOM + xml


def _field(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, at most ``limit`` characters, "-" if empty."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 / RFC 6587 framing: the length in octets, a space, the message."""
    return str(len(message)).encode("ascii") + b" " + message


@dataclass(frozen=True)
class Repository:
    """Where audit messages go: ``udp://``, ``tcp://`` or ``tls://host:port``, with what TLS needs."""

    transport: str
    host: str
    port: int
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @classmethod
    def parse(cls, url: str, *, ca_file: Path | None = None, cert_file: Path | None = None,
              key_file: Path | None = None) -> "Repository":
        parts = urlsplit(url)
        if parts.scheme not in ("udp", "tcp", "tls") or not parts.hostname or parts.port is None:
            raise ValueError(f"{url!r} is not an audit repository (udp://, tcp:// or tls://host:port)")
        return cls(parts.scheme, parts.hostname, parts.port, ca_file, cert_file, key_file)

    def __str__(self) -> str:
        return f"{self.transport}://{self.host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            context.load_cert_chain(certfile=self.cert_file, keyfile=self.key_file)
        return context


class SyslogSender:
    """A connection to the repository, made on first use and again after a failure. ``send`` raises
    ``OSError`` (``ssl.SSLError`` included) when the message could not be handed over."""

    def __init__(self, repository: Repository, *, timeout: float = 10.0) -> None:
        self.repository = repository
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._context = repository.ssl_context() if repository.transport == "tls" else None

    def send(self, message: bytes) -> None:
        if self.repository.transport == "udp":
            if len(message) > MAX_UDP_MESSAGE:
                raise ValueError(f"an audit message of {len(message)} bytes does not fit a UDP datagram")
            with socket.socket(_family(self.repository.host), socket.SOCK_DGRAM) as sock:
                sock.settimeout(self.timeout)
                sock.sendto(message, (self.repository.host, self.repository.port))
            return
        sock = self._connected()
        try:
            sock.sendall(octet_counted(message))
        except OSError:
            self.close()
            raise

    def _connected(self) -> socket.socket:
        if self._sock is not None and _peer_closed(self._sock):
            self.close()
        if self._sock is None:
            sock = socket.create_connection((self.repository.host, self.repository.port), timeout=self.timeout)
            if self._context is not None:
                try:
                    sock = self._context.wrap_socket(sock, server_hostname=self.repository.host)
                except OSError:
                    sock.close()
                    raise
            self._sock = sock
            log.info("audit messages go to %s", self.repository)
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _peer_closed(sock: socket.socket) -> bool:
    """True when the repository has closed the connection (a write would be lost, not refused)."""
    import select

    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        if not isinstance(sock, ssl.SSLSocket):
            return not sock.recv(1, socket.MSG_PEEK)
        timeout = sock.gettimeout()
        sock.setblocking(False)  # readable may be a TLS record without data (a session ticket)
        try:
            return not sock.recv(1)
        except ssl.SSLWantReadError:
            return False
        finally:
            sock.settimeout(timeout)
    except (OSError, ValueError):
        return True
