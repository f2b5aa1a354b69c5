"""DICOM ingest: every transfer syntax, photometric interpretation, bit depth
and LUT case decodes to the expected pixels; real files from pydicom-data;
malformed files end in a terminal state with a reason, over real TCP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pynetdicom import AE, _config

from dicom_io.pixels import display_image
from dicom_io.status import StoreStatus
from tests.helpers.corpus import ORIGINAL, build_malformed, build_pixel_corpus
from tests.helpers.dicom_factory import (
    PLANTED_BIRTH_DATE,
    PLANTED_PATIENT_ID,
    PLANTED_PATIENT_NAME,
    PNEUMONIA_JPEG,
    chest_dataset,
)
from tests.helpers.processes import Process, cli_env, cli_json, free_port, storescu, wait_for_port, wait_until
from worker.runtime import eligibility_policy
from worker.settings import Settings

TERMINAL = {"PREDICTED", "SKIPPED", "FAILED"}


def real_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"pydicom-data's {name} is not available (pip install pydicom-data)")
    return Path(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_pixel_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def malformed(tmp_path_factory):
    return build_malformed(tmp_path_factory.mktemp("malformed"))


def test_every_corpus_case_decodes_to_the_expected_pixels(corpus):
    syntaxes = {case.transfer_syntax for case in corpus}
    assert len(syntaxes) >= 11, syntaxes
    wrong = []
    for case in corpus:
        ds = dcmread(case.path)
        assert ds.file_meta.TransferSyntaxUID == case.transfer_syntax, case.name
        diff = np.abs(display_image(ds).astype(int) - ORIGINAL.astype(int))
        if diff.mean() > case.tolerance or diff.max() > case.max_error:
            wrong.append(f"{case.name}: mean {diff.mean():.3f} (allowed {case.tolerance}), "
                         f"max {diff.max()} (allowed {case.max_error})")
    assert not wrong, "\n".join(wrong)


def test_real_chest_cr_in_three_encodings_decodes_alike():
    """RG1: a real 15-bit MONOCHROME1 chest CR; *_UNCR is the source of the lossless
    JPEG 2000 file, *_UNCI the decompressed lossy one."""
    original = display_image(dcmread(real_file("RG1_UNCR.dcm")))
    assert original.shape == (1955, 1841) and original.std() > 20
    assert np.array_equal(display_image(dcmread(real_file("RG1_J2KR.dcm"))), original)
    lossy = display_image(dcmread(real_file("RG1_J2KI.dcm")))
    assert np.abs(lossy.astype(int) - display_image(dcmread(real_file("RG1_UNCI.dcm"))).astype(int)).max() <= 1
    assert np.abs(lossy.astype(int) - original.astype(int)).mean() < 2.0


def test_real_files_are_judged_by_the_eligibility_policy():
    policy = eligibility_policy(Settings(_env_file=None))
    adult = dcmread(real_file("RG1_UNCI.dcm"))  # a chest PA of a patient born in 1940, studied in 2004
    verdict = policy.judge(adult)
    assert not verdict.eligible and "outside the model's intended population: patient aged 64 years" in verdict.reason
    verdict = eligibility_policy(Settings(_env_file=None, intended_population="any")).judge(adult)
    assert verdict.eligible and verdict.note == ("outside the intended population: patient aged 64 years "
                                                 "(trained on ages 1-5)")
    verdict = policy.judge(dcmread(real_file("RG3_UNCI.dcm")))
    assert not verdict.eligible and "EXTREMITY" in verdict.reason
    verdict = policy.judge(dcmread(real_file("JPEG-LL.dcm")))
    assert not verdict.eligible and "modality NM" in verdict.reason


@pytest.mark.parametrize("name", ["vlut_04.dcm", "mlut_18.dcm", "OBXXXX1A_rle_2frame.dcm", "SC_rgb_expb_16bit.dcm",
                                  "emri_small_jpeg_ls_lossless.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm",
                                  "SC_ybr_full_uncompressed.dcm", "emri_small_big_endian.dcm"])
def test_real_files_with_luts_and_odd_encodings_decode(name):
    out = display_image(dcmread(real_file(name)))
    assert out.ndim == 2 and out.dtype == np.uint8 and out.std() > 1


def _send_files(port: int, paths: list[Path], *, raw: bool = False) -> dict[str, int]:
    """C-STORE each file over one association (``raw``: the bytes as they are, unparsed)."""
    metas = [dcmread(p, stop_before_pixels=True, force=True).file_meta for p in paths]
    ae = AE(ae_title="CORPUSSCU")
    for pair in sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}):
        ae.add_requested_context(*pair)
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCREEN")
    assert assoc.is_established
    statuses = {}
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = raw
    try:
        for path, meta in zip(paths, metas):
            status = assoc.send_c_store(path)
            statuses[str(meta.MediaStorageSOPInstanceUID)] = int(status.Status) if "Status" in status else -1
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()
    return statuses


def _header_truncated(folder: Path) -> Path:
    """Valid file meta, then a dataset cut in the middle of its header."""
    ds = chest_dataset(PNEUMONIA_JPEG)
    full = folder / "full.dcm"
    ds.save_as(full, enforce_file_format=True)
    raw = full.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")  # preamble, DICM, (0002,0000), group
    cut = folder / "header_truncated.dcm"
    cut.write_bytes(raw[: meta_end + 30])
    return cut


@pytest.mark.slow
def test_corpus_real_files_and_malformed_inputs_over_tcp_each_end_terminal_with_a_reason(
        tmp_path, corpus, malformed, processes):
    port = free_port()
    data_dir = tmp_path / "data"
    # RG1 is an adult's chest film: screened, with its note, only when every age is
    runner = Process(["--log-level", "DEBUG", "run", "--data-dir", str(data_dir), "--port", str(port)],
                     cli_env(study_quiet_seconds=1, intended_population="any"), tmp_path / "run.log")
    processes.append(runner)
    wait_for_port(port, runner.proc)

    real = [real_file("RG1_J2KR.dcm"), real_file("RG3_J2KR.dcm")]
    statuses = _send_files(port, [c.path for c in corpus] + real)
    statuses |= _send_files(port, [p for p in malformed.values()], raw=True)
    truncated_header = _header_truncated(tmp_path)
    statuses |= _send_files(port, [truncated_header], raw=True)
    # dcmtk's storescu with the uncompressed one too (a second sender, same listener)
    assert storescu(port, corpus[0].path).returncode == 0

    refused = {uid for uid, status in statuses.items() if status != StoreStatus.SUCCESS}
    header_uid = str(dcmread(truncated_header, stop_before_pixels=True, force=True).file_meta.MediaStorageSOPInstanceUID)
    assert refused == {header_uid}, statuses
    assert statuses[header_uid] in (StoreStatus.CANNOT_UNDERSTAND, StoreStatus.MISSING_UIDS)

    env = cli_env(data_dir=data_dir)
    expected = len(corpus) + len(real) + len(malformed) + 1

    def all_terminal():
        rows = cli_json("instances", env=env)
        return rows if len(rows) == expected and all(r["state"] in TERMINAL for r in rows) else None

    rows = {r["sop_instance_uid"]: r for r in wait_until(all_terminal, timeout=150, what="all terminal")}

    def row_of(path: Path) -> dict:
        return rows[str(dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)]

    not_predicted = {c.name: row_of(c.path) for c in corpus if row_of(c.path)["state"] != "PREDICTED"}
    assert not not_predicted, json.dumps(not_predicted, indent=1)
    assert row_of(real[0])["state"] == "PREDICTED"
    assert row_of(real[0])["population_note"].startswith("outside the intended population: patient aged 64 years")
    assert row_of(real[1])["state"] == "SKIPPED" and "EXTREMITY" in row_of(real[1])["reason"]

    verdicts = {name: row_of(path) for name, path in malformed.items()}
    assert verdicts["no_pixel_data"]["state"] == "SKIPPED" and "no pixel data" in verdicts["no_pixel_data"]["reason"]
    for name in ("truncated_pixels", "bad_codestream", "wrong_vr_rows", "huge_dimensions"):
        assert verdicts[name]["state"] == "FAILED" and verdicts[name]["reason"], (name, verdicts[name])
    assert "exceeds" in verdicts["huge_dimensions"]["reason"]
    assert rows[header_uid]["state"] == "FAILED" and rows[header_uid]["study_instance_uid"] is None
    assert "parsed" in rows[header_uid]["reason"] or "UID" in rows[header_uid]["reason"]

    quarantine = data_dir / "quarantine"
    reasons = list(quarantine.rglob("*.reason.txt"))
    assert len(reasons) == 5  # four FAILED at decode + the unparseable one
    assert all(p.with_suffix("").with_suffix(".dcm").is_file() for p in reasons)

    log = runner.log()
    for secret in (PLANTED_PATIENT_NAME.split("^")[0], PLANTED_PATIENT_ID, PLANTED_BIRTH_DATE):
        assert secret not in log
    assert "DEBUG" in log  # the scan ran over debug-level output


@pytest.mark.slow
def test_late_instances_and_an_aborted_association_lose_nothing(tmp_path, processes):
    port = free_port()
    data_dir = tmp_path / "data"
    runner = Process(["run", "--data-dir", str(data_dir), "--port", str(port)], cli_env(study_quiet_seconds=1),
                     tmp_path / "run.log")
    processes.append(runner)
    wait_for_port(port, runner.proc)
    env = cli_env(data_dir=data_dir)
    first = chest_dataset(PNEUMONIA_JPEG)
    study = first.StudyInstanceUID

    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(first.SOPClassUID, first.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCREEN")
    assert assoc.is_established
    second = chest_dataset(PNEUMONIA_JPEG, study_uid=study, series_uid=first.SeriesInstanceUID)
    assert assoc.send_c_store(first).Status == 0 and assoc.send_c_store(second).Status == 0
    assoc.abort()  # the sender dies before releasing: what it completed stays

    def states():
        return {r["sop_instance_uid"]: r["state"] for r in cli_json("instances", env=env)}

    wait_until(lambda: set(states().values()) == {"PREDICTED"} and len(states()) == 2, timeout=60,
               what="both instances of the aborted association PREDICTED")

    # an instance arriving after its study was screened is screened too
    late = chest_dataset(PNEUMONIA_JPEG, study_uid=study)
    late_path = tmp_path / "late.dcm"
    late.save_as(late_path, enforce_file_format=True)
    assert storescu(port, late_path).returncode == 0
    wait_until(lambda: states().get(str(late.SOPInstanceUID)) == "PREDICTED", timeout=60, what="late instance")
    [row] = [r for r in cli_json("worklist", env=env) if r["study_instance_uid"] == study]
    assert row["state"] == "SCREENED"
    assert len(states()) == 3


@pytest.mark.slow
def test_orthanc_sends_studies_through_its_rest_api(tmp_path, processes):
    from tests.helpers.orthanc import Orthanc

    port = free_port()
    data_dir = tmp_path / "data"
    runner = Process(["run", "--data-dir", str(data_dir), "--port", str(port)],
                     cli_env(study_quiet_seconds=1, allowed_aes="ORTHANC", intended_population="any"),
                     tmp_path / "run.log")  # RG1 is an adult's chest film
    processes.append(runner)
    wait_for_port(port, runner.proc)
    orthanc = Orthanc(tmp_path / "orthanc", modalities={"pneumoscreen": ("PNEUMOSCREEN", "127.0.0.1", port)})
    try:
        generated = tmp_path / "generated.dcm"
        chest_dataset(PNEUMONIA_JPEG).save_as(generated, enforce_file_format=True)
        ids = [orthanc.upload(p) for p in (generated, real_file("RG1_J2KR.dcm"), real_file("RG3_UNCR.dcm"))]
        echo = orthanc.post("/modalities/pneumoscreen/echo", {})
        assert echo == {} or echo is None
        orthanc.post("/modalities/pneumoscreen/store", {"Resources": ids, "Synchronous": True})
    finally:
        orthanc.stop()
    env = cli_env(data_dir=data_dir)
    rows = wait_until(lambda: (r := cli_json("instances", env=env)) and len(r) == 3
                      and all(x["state"] in TERMINAL for x in r) and r, timeout=90, what="Orthanc's instances")
    assert sorted(r["state"] for r in rows) == ["PREDICTED", "PREDICTED", "SKIPPED"]
    assert runner.log().count("from ORTHANC") >= 3
