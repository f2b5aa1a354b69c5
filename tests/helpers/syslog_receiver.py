"""A syslog receiver of the tests' own, run as a process of its own: RFC 5426 over UDP, or RFC 5425
octet-counted frames over TCP or TLS. Each message it receives becomes one file in ``--out``.

    python -m tests.helpers.syslog_receiver --transport tls --port P --out DIR --cert C --key K

It prints ``LISTENING <port>`` once it listens.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import ssl
import sys
import threading
from pathlib import Path

_names = itertools.count()
_lock = threading.Lock()


def _keep(out: Path, message: bytes) -> None:
    with _lock:
        name = f"{next(_names):06d}"
    tmp = out / f"{name}.tmp"
    tmp.write_bytes(message)
    os.replace(tmp, out / f"{name}.syslog")


def _read_frames(conn: socket.socket, out: Path) -> None:
    buffer = b""
    with conn:
        while True:
            try:
                data = conn.recv(65536)
            except (OSError, ssl.SSLError):
                return
            if not data:
                return
            buffer += data
            while b" " in buffer:
                length, _, rest = buffer.partition(b" ")
                if not length.isdigit():
                    print(f"bad frame: {buffer[:40]!r}", file=sys.stderr, flush=True)
                    return
                if len(rest) < int(length):
                    break
                _keep(out, rest[:int(length)])
                buffer = rest[int(length):]


def _serve_stream(server: socket.socket, out: Path, context: ssl.SSLContext | None) -> None:
    while True:
        conn, _ = server.accept()
        if context is not None:
            try:
                conn = context.wrap_socket(conn, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                print(f"TLS handshake failed: {exc}", file=sys.stderr, flush=True)
                conn.close()
                continue
        threading.Thread(target=_read_frames, args=(conn, out), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", choices=["udp", "tcp", "tls"], required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--client-ca", type=Path, help="require a client certificate signed by this CA")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.transport == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", args.port))
        print(f"LISTENING {sock.getsockname()[1]}", flush=True)
        while True:
            data, _ = sock.recvfrom(65535)
            _keep(args.out, data)
    context = None
    if args.transport == "tls":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
        if args.client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=args.client_ca)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", args.port))
    server.listen(16)
    print(f"LISTENING {server.getsockname()[1]}", flush=True)
    _serve_stream(server, args.out, context)


if __name__ == "__main__":
    main()
