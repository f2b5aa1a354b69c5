"""A real Orthanc (Debian's `orthanc` package) as a PACS peer, on free ports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.helpers.processes import free_port


class Orthanc:
    def __init__(self, workdir: Path, *, modalities: dict[str, tuple[str, str, int]], aet: str = "ORTHANC",
                 extra_config: dict | None = None) -> None:
        """``modalities``: name -> (AE title, host, port), the peers Orthanc knows (C-MOVE
        destinations; Orthanc answers C-FIND/C-MOVE only from these calling AE titles);
        ``extra_config``: further Orthanc configuration keys."""
        exe = shutil.which("Orthanc") or shutil.which("orthanc") or "/usr/sbin/Orthanc"
        if not Path(exe).exists():
            raise RuntimeError("Orthanc is not installed (apt-get install orthanc)")
        self.aet = aet
        self.http_port, self.dicom_port = free_port(), free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "pneumoscreen-test", "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": aet, "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
            "DicomModalities": {name: list(v) for name, v in modalities.items()},
            "DicomScuTimeout": 30, "StableAge": 1,
            **(extra_config or {}),
        }
        (workdir / "orthanc.json").write_text(json.dumps(config))
        self._log = open(workdir / "orthanc.log", "wb")
        self.proc = subprocess.Popen([exe, str(workdir / "orthanc.json")], stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TCP_NODELAY": "1"})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"Orthanc exited: {(workdir / 'orthanc.log').read_text()[-2000:]}")
                time.sleep(0.2)
        raise TimeoutError("Orthanc did not start")

    def _raw(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json") -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method,
                                     headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.read()

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        data = self._raw(method, path, body, content_type)
        return json.loads(data) if data else None

    def get(self, path: str):
        return self._request("GET", path)

    def post(self, path: str, payload) -> object:
        return self._request("POST", path, json.dumps(payload).encode())

    def upload(self, path: Path) -> str:
        return self._request("POST", "/instances", path.read_bytes(), "application/dicom")["ID"]

    def instance_id(self, sop_instance_uid: str) -> str:
        """Orthanc's ID of the stored instance with this SOPInstanceUID."""
        found = self.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}})
        if len(found) != 1:
            raise LookupError(f"Orthanc holds {len(found)} instances with SOPInstanceUID {sop_instance_uid}")
        return found[0]

    def download(self, instance_id: str) -> bytes:
        """The stored DICOM file, as Orthanc received it."""
        return self._raw("GET", f"/instances/{instance_id}/file")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
