"""DICOM TLS on the listener: a server certificate, optional client certificates,
checked with pynetdicom and dcmtk's storescu as TLS clients."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from db.migrate import upgrade
from dicom_io.status import StoreStatus
from tests.helpers.dicom_factory import PNEUMONIA_JPEG, chest_dataset, write_chest_dicom
from tests.helpers.listener import Listener

pytestmark = pytest.mark.slow  # a listener on a port


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=pneumoscreen test CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


def _client_context(pki: Path, *, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    if with_cert:
        context.load_cert_chain(pki / "client.crt", pki / "client.key")
    return context


def _send(port: int, *, tls: ssl.SSLContext | None):
    ds = chest_dataset(PNEUMONIA_JPEG)
    ae = AE(ae_title="TLSCLIENT")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    kwargs = {"tls_args": (tls, "127.0.0.1")} if tls else {}
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCREEN", **kwargs)
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


@pytest.fixture
def tls_listener(tmp_path, sqlite_url, pki):
    upgrade(sqlite_url)
    lst = Listener(tmp_path, sqlite_url, tls_cert=pki / "server.crt", tls_key=pki / "server.key")
    yield lst
    lst.close()


def test_tls_client_is_served_and_plain_tcp_is_not(tls_listener, pki):
    assert _send(tls_listener.port, tls=_client_context(pki, with_cert=False)) == StoreStatus.SUCCESS
    assert _send(tls_listener.port, tls=None) is None
    assert len(tls_listener.instances()) == 1


def test_client_certificate_required_when_a_client_ca_is_set(tmp_path, sqlite_url, pki):
    upgrade(sqlite_url)
    lst = Listener(tmp_path, sqlite_url, tls_cert=pki / "server.crt", tls_key=pki / "server.key",
                   tls_client_ca=pki / "ca.crt")
    try:
        assert _send(lst.port, tls=_client_context(pki, with_cert=False)) is None
        assert _send(lst.port, tls=_client_context(pki, with_cert=True)) == StoreStatus.SUCCESS

        path = tmp_path / "tls.dcm"
        write_chest_dicom(path, PNEUMONIA_JPEG)
        result = subprocess.run(
            [shutil.which("storescu"), "+tls", str(pki / "client.key"), str(pki / "client.crt"),
             "+cf", str(pki / "ca.crt"), "-aec", "PNEUMOSCREEN", "127.0.0.1", str(lst.port), str(path)],
            capture_output=True, text=True, timeout=60, env={**os.environ, "TCP_NODELAY": "1"})
        assert result.returncode == 0, result.stderr
        assert len(lst.instances()) == 2
    finally:
        lst.close()


def test_a_stalled_tls_handshake_holds_up_no_one(tmp_path, sqlite_url, pki):
    """The handshake runs in the connection's own thread, by the ARTIM deadline, not in the accept loop."""
    upgrade(sqlite_url)
    lst = Listener(tmp_path, sqlite_url, tls_cert=pki / "server.crt", tls_key=pki / "server.key", artim_timeout=2.0)
    stalled = socket.create_connection(("127.0.0.1", lst.port))
    try:
        stalled.sendall(b"\x16\x03\x01")  # the start of a ClientHello record, then nothing
        started = time.monotonic()
        assert _send(lst.port, tls=_client_context(pki, with_cert=False)) == StoreStatus.SUCCESS
        assert time.monotonic() - started < 1.5
        stalled.settimeout(4)
        assert stalled.recv(100) == b""  # closed at the deadline
    finally:
        stalled.close()
        lst.close()
