"""`pneumoscreen api` against slow clients (headers a byte a second, a body that never comes) and
over TLS, as a real process on a port."""

from __future__ import annotations

import socket
import ssl
import time

import httpx
import pytest

from tests.helpers.pki import make_pki
from tests.helpers.processes import Process, cli_env, free_port, wait_for_port

pytestmark = pytest.mark.slow  # `pneumoscreen api` processes

TOKEN = "bounds-test-token-0123456789"


def _api(tmp_path, database_url, processes, **settings) -> int:
    port = free_port()
    env = cli_env(database_url=database_url, api_token=TOKEN, api_port=port, broker_url="memory://",
                  data_dir=tmp_path / "data", **settings)
    api = Process(["api"], env, tmp_path / f"api-{port}.log")
    processes.append(api)
    wait_for_port(port, api.proc)
    return port


def _closed_within(sock: socket.socket, seconds: float, *, trickle: bytes) -> float | None:
    """Send ``trickle`` a byte a second until the server closes; the seconds it took, None if it did not."""
    started = time.monotonic()
    sock.settimeout(1.0)
    for byte in trickle:
        try:
            sock.sendall(bytes([byte]))
            if sock.recv(1024) == b"":
                return time.monotonic() - started
        except socket.timeout:
            pass
        except OSError:  # reset: closed as well
            return time.monotonic() - started
        if time.monotonic() - started > seconds:
            return None
    return None


def test_a_client_sending_its_headers_a_byte_a_second_is_cut_off(tmp_path, database_url, processes):
    port = _api(tmp_path, database_url, processes, api_header_timeout=2)
    with socket.create_connection(("127.0.0.1", port)) as slow:
        took = _closed_within(slow, 10, trickle=b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 60)
    assert took is not None, "the server kept a connection whose headers took over 10 s"
    assert 1.5 <= took <= 5, took
    # a client that sends its request at once is served, before and after the cut
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    # a kept-alive connection has the same bound for its next request's head
    with socket.create_connection(("127.0.0.1", port)) as kept:
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        kept.settimeout(5)
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        took = _closed_within(kept, 10, trickle=b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"b" * 60)
    assert took is not None and took <= 5, took


def test_a_body_that_does_not_arrive_is_answered_408_at_the_request_deadline(tmp_path, database_url, processes):
    port = _api(tmp_path, database_url, processes, api_request_timeout=2)
    with socket.create_connection(("127.0.0.1", port)) as slow:
        slow.sendall(b"POST /web/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: 200\r\n\r\ntoken=")
        slow.settimeout(10)
        started = time.monotonic()
        answer = slow.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < 6


def test_the_api_serves_tls_from_the_settings_with_hsts(tmp_path, database_url, processes):
    pki = make_pki(tmp_path / "pki")
    port = _api(tmp_path, database_url, processes, api_tls_cert=pki / "server.crt", api_tls_key=pki / "server.key")
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    with httpx.Client(verify=context, timeout=10) as client:
        health = client.get(f"https://127.0.0.1:{port}/healthz")
        assert health.status_code == 200
        assert health.headers["strict-transport-security"] == "max-age=31536000"
        refused = client.get(f"https://127.0.0.1:{port}/worklist")
        assert refused.status_code == 401
        listed = client.get(f"https://127.0.0.1:{port}/worklist", headers={"Authorization": f"Bearer {TOKEN}"})
        assert listed.status_code == 200 and listed.json() == []
    # plain HTTP on the TLS port is not answered; an unknown CA is refused
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"https://127.0.0.1:{port}/healthz", timeout=5, verify=ssl.create_default_context())
