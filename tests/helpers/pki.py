"""A throw-away CA with a server certificate for 127.0.0.1/localhost and a client certificate,
made with openssl (EC P-256 keys: milliseconds, not the seconds of RSA)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def _sign(folder: Path, name: str, usage: str) -> None:
    subprocess.run(["openssl", "req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}"],
                   cwd=folder, check=True, capture_output=True, timeout=30)
    (folder / f"{name}.ext").write_text(f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n")
    subprocess.run(["openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                    "-set_serial", str(abs(hash(name)) % 10**9), "-days", "2", "-out", f"{name}.crt",
                    "-extfile", f"{name}.ext"], cwd=folder, check=True, capture_output=True, timeout=30)


def make_pki(folder: Path) -> Path:
    """``ca.crt``, ``server.crt``/``server.key`` (127.0.0.1, localhost), ``client.crt``/``client.key`` in ``folder``."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make test certificates")
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", *_EC, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
                    "-subj", "/CN=pneumoscreen test CA"], cwd=folder, check=True, capture_output=True, timeout=30)
    _sign(folder, "server", "serverAuth")
    _sign(folder, "client", "clientAuth")
    return folder
