"""A seeded mutation fuzzer of received datasets, shared by ``bench/fuzz.py datasets`` (long) and
``tests/test_dataset_fuzz.py`` (short).

From real files of many transfer syntaxes (pydicom-data: explicit and implicit VR, big endian,
deflated, JPEG baseline and lossless, JPEG 2000, RLE; and a chest CR made from a fixture film),
each mutation flips bytes, cuts the file, writes lying lengths, swaps VRs, sets huge, zero or
negative image dimensions, breaks the compressed codestream or nests sequences hundreds deep.
Each one goes the way a received file goes: ``store_received`` (spool + row, as `ingest` and
the C-STORE handler), then the pipeline (eligibility, decoding, preprocessing, the model) until
it ends PREDICTED, SKIPPED or FAILED with a reason. The time of each decoding is measured.
"""

from __future__ import annotations

import random
import resource
import shutil
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Instance
from dicom_io.handlers import StoreContext, store_received
from dicom_io.spool import Spool
from tests.helpers.dicom_factory import PNEUMONIA_JPEG, write_chest_dicom

SEED_FILES = ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm",
              "JPEG2000.dcm", "JPEG-LL.dcm", "JPEG-lossy.dcm", "RG1_J2KR.dcm", "emri_small_RLE.dcm",
              "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", "693_J2KR.dcm", "GDCMJ2K_TextGBR.dcm")
MUTATIONS = ("flip_bytes", "truncate", "lying_length", "swap_vr", "dimensions", "codestream", "deep_sequence")
_VRS = [b"OB", b"OW", b"SQ", b"UN", b"US", b"UL", b"FD", b"LO", b"UI", b"CS", b"DS", b"AT"]


def seed_files(folder: Path) -> list[Path]:
    """The real files to mutate, and a chest CR in each of two transfer syntaxes (written into ``folder``)."""
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

    found = [Path(p) for p in (get_testdata_file(name) for name in SEED_FILES) if p]
    folder.mkdir(parents=True, exist_ok=True)
    for syntax, name in ((ExplicitVRLittleEndian, "cr_explicit.dcm"), (JPEGBaseline8Bit, "cr_jpeg.dcm")):
        write_chest_dicom(folder / name, PNEUMONIA_JPEG, sop_class="CR", transfer_syntax=syntax)
        found.append(folder / name)
    return found


def renamed(original: bytes, n: int) -> bytes:
    """``original`` with its SOP Instance UID made unique for mutant ``n`` (same length, so every offset
    stays), so that each mutant is a new instance rather than a duplicate of the first."""
    uid = str(dcmread(BytesIO(original), stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    prefix, _, last = uid.rpartition(".")
    if not prefix or len(last) < 2:
        return original
    fresh = f"{prefix}.9{n % 10 ** (len(last) - 1):0{len(last) - 1}d}"
    return original.replace(uid.encode(), fresh.encode())


def mutate(original: bytes, kind: str, rng: random.Random) -> bytes:
    data = bytearray(original)
    body = 132 if data[128:132] == b"DICM" else 0
    if kind == "flip_bytes":
        for _ in range(rng.randint(1, 64)):
            data[rng.randrange(body, len(data))] = rng.randrange(256)
    elif kind == "truncate":
        del data[rng.randrange(body, len(data)):]
    elif kind == "lying_length":
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(body, len(data) - 4)
            data[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80",
                                          rng.randbytes(4)])
    elif kind == "swap_vr":
        spots = [i for i in range(body, min(len(data), body + 4096) - 2) if bytes(data[i:i + 2]) in _VRS]
        for at in rng.sample(spots, min(len(spots), rng.randint(1, 6))):
            data[at:at + 2] = rng.choice(_VRS)
    elif kind == "deep_sequence":
        return _deep_sequence(bytes(data), rng.randint(100, 3000))
    elif kind in ("dimensions", "codestream"):
        return _mutate_dataset(bytes(data), kind, rng)
    return bytes(data)


def _deep_sequence(original: bytes, depth: int) -> bytes:
    """``original`` with a Referenced Image Sequence nested ``depth`` deep (undefined lengths, explicit VR
    little endian) put first in its data set, right after the file meta information."""
    start = 0
    if original[128:132] == b"DICM":
        meta_length = struct.unpack("<L", original[140:144])[0]
        start = 144 + meta_length
    opening = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    closing = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return original[:start] + opening * depth + closing * depth + original[start:]


def _mutate_dataset(original: bytes, kind: str, rng: random.Random) -> bytes:
    ds = dcmread(BytesIO(original))
    if kind == "dimensions":
        keyword, value = rng.choice([("Rows", 0), ("Rows", 65535), ("Columns", 65535), ("Columns", 1),
                                     ("BitsAllocated", 64), ("BitsAllocated", 7), ("BitsStored", 40),
                                     ("SamplesPerPixel", 0), ("SamplesPerPixel", 4), ("NumberOfFrames", "-1"),
                                     ("NumberOfFrames", "999999999"), ("HighBit", 63), ("PixelRepresentation", 7),
                                     ("PlanarConfiguration", 5), ("PhotometricInterpretation", "NONSENSE")])
        setattr(ds, keyword, value)
    elif kind == "codestream" and "PixelData" in ds:
        pixels = bytearray(ds.PixelData)
        for _ in range(rng.randint(1, 32)):
            pixels[rng.randrange(len(pixels))] = rng.randrange(256)
        ds.PixelData = bytes(pixels)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=False)
    return out.getvalue()


@dataclass
class DatasetFuzzReport:
    tried: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    """Store status and final state: 'refused 0xC210', 'PREDICTED', 'SKIPPED', 'FAILED', ..."""
    not_terminal: list[str] = field(default_factory=list)
    without_reason: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    slowest_decode_s: float = 0.0
    peak_rss_mb: float = 0.0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"files_tried": sum(self.tried.values()), "by_mutation": dict(self.tried),
                "outcomes": dict(self.outcomes), "not_terminal": len(self.not_terminal),
                "without_reason": len(self.without_reason), "crashes": len(self.crashes),
                "slowest_decode_s": round(self.slowest_decode_s, 3), "peak_rss_mb": round(self.peak_rss_mb, 1),
                "seconds": round(self.seconds, 1)}


def run_dataset_fuzz(work: Path, sessions: sessionmaker[Session], *, count: int, seed: int,
                     batch: int = 32) -> DatasetFuzzReport:
    """``count`` mutated files through store and pipeline; the model scores what decodes."""
    from worker.pipeline import predict_and_record, preprocess_instance
    from worker.runtime import eligibility_policy, load_model
    from worker.settings import Settings

    rng = random.Random(seed)
    spool = Spool(work / "spool", quarantine_root=work / "quarantine")
    context = StoreContext.for_database(spool, sessions)
    # every modality, size and age screened, so that every seed's pixels reach the decoders
    policy = eligibility_policy(Settings(_env_file=None, eligible_modalities="CR,DX,CT,MR,OT,SC,NM,US,XA,MG",
                                         min_image_side=1, intended_population="any"))
    model = load_model()
    seeds = [(path, path.read_bytes()) for path in seed_files(work / "seeds")]
    staging = work / "incoming"
    staging.mkdir(parents=True, exist_ok=True)
    report = DatasetFuzzReport()
    started = time.monotonic()
    prepared: list[tuple[int, object]] = []
    for n in range(count):
        source, original = seeds[n % len(seeds)]
        kind = MUTATIONS[(n // len(seeds)) % len(MUTATIONS)]
        report.tried[kind] += 1
        name = f"{n:05d}-{kind}-{source.name}"
        try:
            mutated = mutate(renamed(original, n), kind, rng)
        except Exception:  # noqa: BLE001  (pydicom could not even re-read the seed: mutate its bytes instead)
            mutated = mutate(original, "flip_bytes", rng)
        received = staging / f"{name}.part"
        received.write_bytes(mutated)
        try:
            outcome = store_received(received, context, SOPInstanceUID=None, SOPClassUID="1.2.840.10008.5.1.4.1.1.1",
                                     TransferSyntaxUID="1.2.840.10008.1.2.1", calling_ae="FUZZER")
        except Exception as exc:  # noqa: BLE001  (the report counts it: the handler must never raise)
            report.crashes.append(f"{name}: store raised {type(exc).__name__}: {exc}")
            continue
        if not outcome.created:
            report.outcomes[f"store 0x{int(outcome.status):04X}"] += 1
            continue
        with sessions() as session:
            instance_id = session.scalar(select(Instance.id).where(Instance.SOPInstanceUID == outcome.SOPInstanceUID))
        began = time.monotonic()
        try:
            image = preprocess_instance(sessions, instance_id, policy=policy, spool=spool,
                                        size=model.card.input_size)
        except Exception as exc:  # noqa: BLE001
            report.crashes.append(f"{name}: preprocess raised {type(exc).__name__}: {exc}")
            continue
        report.slowest_decode_s = max(report.slowest_decode_s, time.monotonic() - began)
        if image is not None:
            prepared.append((instance_id, image))
        if len(prepared) >= batch or (n == count - 1 and prepared):
            predict_and_record(sessions, model, prepared)
            prepared = []
        report.peak_rss_mb = max(report.peak_rss_mb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if prepared:
        predict_and_record(sessions, model, prepared)
    with sessions() as session:
        for sop, state, reason in session.execute(select(Instance.SOPInstanceUID, Instance.state, Instance.reason)):
            report.outcomes[state.value] += 1
            if not state.is_terminal:
                report.not_terminal.append(sop)
            elif state.value != "PREDICTED" and not reason:
                report.without_reason.append(sop)
    report.seconds = time.monotonic() - started
    shutil.rmtree(staging, ignore_errors=True)
    return report
