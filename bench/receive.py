"""Receive throughput: pneumoscreen's listener against Orthanc and dcmtk's storescp.

N (default 300) CR images of about 2 MB each are sent with dcmtk's storescu
(TCP_NODELAY=1 on both ends) over 1 and over 4 parallel associations, into
`pneumoscreen listen` (fsync of every file and its folder, a committed
database row per instance, before each success status) and into `storescp`
(which writes the files without fsync), in the same run, alternating, each
configuration repeated. Prints instances/s, MB/s and the ratio, and writes
JSON.

The same run also measures pynetdicom's own ceiling: its SCP configured as
our listener (chunked receive into a temporary file, the same PDU size and
socket reads) with a C-STORE handler that only deletes the file. Whatever a
durable handler adds (fsync, rename, a committed row) comes on top of it.

With ``--listener-processes N`` (default 2; 1 leaves it out), pneumoscreen is
also run with N listener processes sharing the port
(PNEUMOSCREEN_LISTENER_PROCESSES), on a scratch PostgreSQL database
(PNEUMOSCREEN_BENCH_POSTGRES, default
postgresql+psycopg://postgres@127.0.0.1:5432/postgres; created and dropped),
since SQLite serializes writers across processes.

    .venv/bin/python bench/receive.py [--count 300] [--repeats 3] [--database-url URL] [--listener-processes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURE = ROOT / "tests" / "fixtures" / "images" / "PNEUMONIA" / "person1003_virus_1685.jpeg"
ENV = {**os.environ, "TCP_NODELAY": "1"}
DCMTK = Path("/usr/bin")
"""dcmtk's tools, by full path: pynetdicom installs console scripts of the same names in the venv."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {port}")


def listening_sockets(port: int) -> int:
    """Sockets in LISTEN state on ``port`` (one per listener process sharing it), from /proc/net/tcp."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A")


def make_images(folder: Path, count: int) -> list[Path]:
    """``count`` 1024x1024 12-bit CR images (2 MiB of pixel data each), one study per 4 images."""
    grey = cv2.resize(cv2.imread(str(FIXTURE), cv2.IMREAD_GRAYSCALE), (1024, 1024))
    pixels = (grey.astype(np.uint16) * 16).tobytes()
    paths = []
    study = None
    for i in range(count):
        if i % 4 == 0:
            study, series = generate_uid(), generate_uid()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
        ds.PatientName, ds.PatientID, ds.AccessionNumber = "Bench^Patient", f"B{i // 4:05d}", f"ACC{i // 4:05d}"
        ds.Rows = ds.Columns = 1024
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PixelData = pixels
        ds["PixelData"].VR = "OW"
        path = folder / f"cr{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(port: int, aec: str, files: list[Path], associations: int) -> float:
    """Seconds to send ``files`` over ``associations`` parallel storescu processes."""
    chunks = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    procs = [subprocess.Popen([str(DCMTK / "storescu"), "-aec", aec, "127.0.0.1", str(port), *map(str, chunk)],
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for chunk in chunks]
    failed = [p.stderr.read().decode() for p in procs if p.wait() != 0]
    elapsed = time.perf_counter() - started
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0][-1000:]}")
    return elapsed


def serve_and_send(command: list[str], env: dict[str, str], port: int, aec: str, files: list[Path],
                   associations: int, log_path: Path, ready=None) -> float:
    """Start the receiver ``command``, time sending ``files`` to it, stop it.
    ``ready``: a further condition to wait for (all listener processes up)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_for_port(port)
            deadline = time.monotonic() + 60
            while ready is not None and not ready():
                if time.monotonic() > deadline:
                    raise TimeoutError("the listener processes did not all start")
                time.sleep(0.2)
            return send(port, aec, files, associations)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def run_storescp(workdir: Path, files: list[Path], associations: int) -> float:
    port = free_port()
    out = workdir / "storescp"
    out.mkdir()
    seconds = serve_and_send([str(DCMTK / "storescp"), "--fork", "-od", str(out), str(port)], ENV, port,
                             "STORESCP", files, associations, workdir / "storescp.log")
    received = len(list(out.iterdir()))
    if received != len(files):
        raise RuntimeError(f"storescp kept {received} of {len(files)} files")
    shutil.rmtree(out)
    return seconds


def run_orthanc(workdir: Path, files: list[Path], associations: int) -> float:
    """Orthanc (Debian's package) as a PACS receives: it stores each file and indexes it in SQLite."""
    from tests.helpers.orthanc import Orthanc

    orthanc = Orthanc(workdir / "orthanc", modalities={})
    try:
        seconds = send(orthanc.dicom_port, orthanc.aet, files, associations)
        received = orthanc.get("/statistics")["CountInstances"]
    finally:
        orthanc.stop()
    if received != len(files):
        raise RuntimeError(f"Orthanc kept {received} of {len(files)} files")
    shutil.rmtree(workdir / "orthanc")
    return seconds


def serve_pynetdicom_alone(port: int, incoming: Path) -> None:
    """pynetdicom's SCP as ``pneumoscreen listen`` sets it up, with a handler that only deletes the file."""
    import importlib

    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    from worker.settings import Settings

    importlib.import_module("dicom_io.server")  # chunked receive and the bounded one-buffer PDU read, as the listener

    tempfile.tempdir = str(incoming)  # where pynetdicom writes each dataset, as the listener does

    def handle_store(event) -> int:
        os.unlink(event.dataset_path)
        return 0x0000

    ae = AE("ALONE")
    ae.maximum_pdu_size = Settings.model_fields["max_pdu_size"].default
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, handle_store)])


def run_pynetdicom_alone(workdir: Path, files: list[Path], associations: int) -> float:
    port = free_port()
    incoming = workdir / "alone"
    incoming.mkdir()
    seconds = serve_and_send([sys.executable, str(Path(__file__).resolve()), "--serve-pynetdicom-alone", str(port),
                              str(incoming)], ENV, port, "ALONE", files, associations, workdir / "alone.log")
    shutil.rmtree(incoming)
    return seconds


def scratch_postgres():
    """A new PostgreSQL database for one run, dropped afterwards (``with``; yields its URL)."""
    from tests.helpers.services import scratch_database

    admin_url = os.environ.get("PNEUMOSCREEN_BENCH_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    return scratch_database(admin_url, prefix="pneumoscreen_bench")


def run_pneumoscreen(workdir: Path, files: list[Path], associations: int, database_url: str | None,
                     processes: int = 1) -> float:
    if processes > 1 and database_url is None:
        with scratch_postgres() as url:
            return run_pneumoscreen(workdir, files, associations, url, processes)
    port = free_port()
    data_dir = workdir / "pneumoscreen"
    env = {k: v for k, v in ENV.items() if not k.startswith("PNEUMOSCREEN_")}
    env.update({"PNEUMOSCREEN_DATA_DIR": str(data_dir), "PNEUMOSCREEN_PORT": str(port),
                "PNEUMOSCREEN_STUDY_QUIET_SECONDS": "86400", "PNEUMOSCREEN_LOG_LEVEL": "WARNING",
                "PNEUMOSCREEN_MIN_FREE_MB": "64", "PNEUMOSCREEN_LISTENER_PROCESSES": str(processes)})
    if database_url:
        env["PNEUMOSCREEN_DATABASE_URL"] = database_url
    cli = [sys.executable, "-m", "worker.cli"]
    subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True, cwd=ROOT)
    ready = (lambda: listening_sockets(port) >= processes) if processes > 1 else None
    seconds = serve_and_send([*cli, "listen"], env, port, "PNEUMOSCREEN", files, associations,
                             workdir / "pneumoscreen.log", ready=ready)
    out = subprocess.run([*cli, "instances", "--json"], env=env, check=True, capture_output=True, cwd=ROOT)
    received = len(json.loads(out.stdout))
    if received != len(files):
        raise RuntimeError(f"pneumoscreen recorded {received} of {len(files)} instances")
    shutil.rmtree(data_dir)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--database-url", help="PostgreSQL for pneumoscreen (default: SQLite in a temp dir); "
                        "its schema must be new or current, and it is not cleaned")
    parser.add_argument("--listener-processes", type=int, default=2,
                        help="also run pneumoscreen with this many listener processes (1: not)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "receive.json")
    parser.add_argument("--serve-pynetdicom-alone", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_pynetdicom_alone:
        serve_pynetdicom_alone(int(args.serve_pynetdicom_alone[0]), Path(args.serve_pynetdicom_alone[1]))
        return
    for tool in ("storescu", "storescp"):
        if not (DCMTK / tool).is_file():
            sys.exit(f"dcmtk's {tool} is needed (apt-get install dcmtk)")

    with tempfile.TemporaryDirectory(prefix="pneumoscreen-bench-", dir=ROOT / "bench") as tmp:
        workdir = Path(tmp)
        (workdir / "images").mkdir()
        files = make_images(workdir / "images", args.count)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        print(f"{len(files)} files, {megabytes:.0f} MB ({megabytes / len(files):.2f} MB each)")
        results = {}
        shared = f"pneumoscreen_{args.listener_processes}_processes"
        for associations in (1, 4):
            receivers = {"storescp": lambda: run_storescp(workdir, files, associations),
                         "orthanc": lambda: run_orthanc(workdir, files, associations),
                         "pneumoscreen": lambda: run_pneumoscreen(workdir, files, associations, args.database_url),
                         "pynetdicom_alone": lambda: run_pynetdicom_alone(workdir, files, associations)}
            if associations > 1 and args.listener_processes > 1:
                receivers[shared] = lambda: run_pneumoscreen(workdir, files, associations, None,
                                                             args.listener_processes)
            times: dict[str, list[float]] = {name: [] for name in receivers}
            for _ in range(args.repeats):
                for name, run in receivers.items():
                    times[name].append(run())
            row = {}
            for name, seconds in times.items():
                median = statistics.median(seconds)
                row[name] = {"seconds": seconds, "median_seconds": median,
                             "instances_per_second": len(files) / median, "mb_per_second": megabytes / median}
            reference = row["storescp"]["instances_per_second"]
            row["ratio"] = row["pneumoscreen"]["instances_per_second"] / reference
            row["ratio_pynetdicom_alone"] = row["pynetdicom_alone"]["instances_per_second"] / reference
            orthanc = row["orthanc"]["instances_per_second"]
            row["ratio_to_orthanc"] = row["pneumoscreen"]["instances_per_second"] / orthanc
            line = (f"{associations} association(s): storescp {reference:.1f} inst/s "
                    f"({row['storescp']['mb_per_second']:.0f} MB/s), pneumoscreen "
                    f"{row['pneumoscreen']['instances_per_second']:.1f} inst/s "
                    f"({row['pneumoscreen']['mb_per_second']:.0f} MB/s), ratio {row['ratio']:.2f}; Orthanc "
                    f"{orthanc:.1f} inst/s, pneumoscreen/Orthanc {row['ratio_to_orthanc']:.2f}; "
                    f"pynetdicom alone {row['pynetdicom_alone']['instances_per_second']:.1f} inst/s, ratio "
                    f"{row['ratio_pynetdicom_alone']:.2f}")
            if shared in row:
                row[f"ratio_{args.listener_processes}_processes"] = row[shared]["instances_per_second"] / reference
                row[f"ratio_to_orthanc_{args.listener_processes}_processes"] = \
                    row[shared]["instances_per_second"] / orthanc
                line += (f"; {args.listener_processes} listener processes (PostgreSQL) "
                         f"{row[shared]['instances_per_second']:.1f} inst/s, ratio "
                         f"{row[f'ratio_{args.listener_processes}_processes']:.2f}")
            results[f"{associations}_association{'s' if associations > 1 else ''}"] = row
            print(f"{line} (medians of {args.repeats})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"count": len(files), "megabytes": megabytes, "repeats": args.repeats,
              "database": "postgresql" if args.database_url else "sqlite", "results": results}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
