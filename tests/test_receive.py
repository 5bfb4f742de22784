"""Receiving over real associations: DCMTK storescu and pynetdicom send, the node stores bytes as received."""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import generate_uid
from pynetdicom import AE

from dicom_node.sender import echo, send_files
from dicom_node.status import Status
from config.node import AcceptEntry, Destination
from dicomutil import dataset_bytes, sop_uid, transfer_syntax
from factories import DICOM_DATA
from netutil import dcmtk, storescu, wait_until


def _stored(node) -> dict[str, Path]:
    """SOP Instance UID -> stored file, for every indexed instance."""
    out = {}
    for series_uid in node.store.series_states():
        for row in node.store.series_instances(series_uid):
            out[row["sop_instance_uid"]] = node.spool.absolute(row["path"])
    return out


def _events(node, event):
    return node.store.audit_records(event=event)


def test_storescu_real_ct_series_is_stored_byte_identical_and_completes(make_node, openkbp_series):
    node = make_node(stable=1.0)
    result = storescu(node.port, openkbp_series)
    assert result.returncode == 0, result.stderr
    stored = _stored(node)
    assert len(stored) == len(openkbp_series) == 128
    for path in openkbp_series:
        assert dataset_bytes(stored[sop_uid(path)]) == dataset_bytes(path)
    series_uid = str(dcmread(openkbp_series[0], stop_before_pixels=True).SeriesInstanceUID)
    wait_until(lambda: node.store.series_states()[series_uid] == "complete", 10, what="series completion")
    info = node.store.series_info(series_uid)
    assert info["instance_count"] == 128 and info["calling_ae"] == "TPS"
    assert len(_events(node, "instance.stored")) == 128
    assert len(_events(node, "series.complete")) == 1
    assert len(_events(node, "association.accepted")) == 1


TOTALSEG_CT = sorted((DICOM_DATA / "totalsegmentator" / "example_ct_dicom").glob("*"))


@pytest.fixture(scope="module")
def j2k_series(tmp_path_factory):
    """The real JPEG 2000 CT series. Its anonymiser blanked the SOP, Study, Series and Frame of Reference UIDs in
    the data set (only the file meta keeps the SOP ones), which the node rightly refuses; fill them in, pixel
    data untouched."""
    folder = tmp_path_factory.mktemp("j2k")
    study, series, frame = (generate_uid(entropy_srcs=["totalseg", k]) for k in ("study", "series", "for"))
    out = []
    for path in TOTALSEG_CT:
        ds = dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.save_as(folder / path.name, enforce_file_format=True)
        out.append(folder / path.name)
    return out


STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.90": "-xv",
}


def test_every_transfer_syntax_is_stored_as_received(make_node, j2k_series):
    """The MR slice in 9 transfer syntaxes and a JPEG 2000 CT series: stored with the same syntax and bytes."""
    node = make_node()
    files = sorted((DICOM_DATA / "dcm_qa_ts").glob("*.dcm")) + j2k_series
    # 7 distinct syntaxes: explicit/implicit/big-endian, RLE, JPEG lossless, JPEG-LS, JPEG 2000
    assert len({transfer_syntax(p) for p in files}) == 7
    for path in files:
        # storescu proposes the file's own syntax first, so nothing needs converting on the way
        result = storescu(node.port, [path], extra=["-R", STORESCU_PROPOSE[transfer_syntax(path)]])
        assert result.returncode == 0, (path, result.stderr)
        stored = _stored(node)[sop_uid(path)]
        assert transfer_syntax(stored) == transfer_syntax(path), path
        assert dataset_bytes(stored) == dataset_bytes(path), path


def test_real_file_with_blanked_uids_is_refused(make_node):
    node = make_node()
    peer = Destination(ae_title="DICOMNODE", host="127.0.0.1", port=node.port)
    (result,) = send_files(peer, TOTALSEG_CT[:1], calling_ae="TPS")
    assert result.status == Status.CANNOT_UNDERSTAND and "missing StudyInstanceUID" in result.error
    assert _stored(node) == {}
    assert len(list(node.spool.quarantine_dir.glob("*.dcm"))) == 1


def test_pynetdicom_sender_and_echo(make_node, openkbp_series):
    node = make_node(accept=[{"ae_title": "DICOMNODE"}])
    peer = Destination(ae_title="DICOMNODE", host="127.0.0.1", port=node.port)
    assert echo(peer) == 0
    results = send_files(peer, openkbp_series[:10])
    assert [r.status for r in results] == [0] * 10
    assert set(_stored(node)) == {sop_uid(p) for p in openkbp_series[:10]}


def test_dcmtk_echoscu(make_node):
    node = make_node()
    ok = subprocess.run([dcmtk("echoscu"), "-aet", "TPS", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([dcmtk("echoscu"), "-aet", "NOBODY", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stderr


def test_resend_is_idempotent(make_node, openkbp_series):
    node = make_node(stable=30)
    assert storescu(node.port, openkbp_series[:20]).returncode == 0
    assert storescu(node.port, openkbp_series[:20]).returncode == 0
    series_uid = next(iter(node.store.series_states()))
    assert node.store.series_info(series_uid)["instance_count"] == 20
    assert len(_events(node, "instance.stored")) == 20
    assert len(_events(node, "instance.duplicate")) == 20


@pytest.mark.parametrize(
    ("calling", "called", "accept", "reason"),
    [
        ("STRANGER", "DICOMNODE", [{"ae_title": "TPS"}], "Calling AE Title Not Recognized"),
        ("TPS", "SOMEONE", [{"ae_title": "TPS"}], "Called AE Title Not Recognized"),
        ("TPS", "DICOMNODE", [{"ae_title": "TPS", "host": "127.0.0.2"}], "Calling AE Title Not Recognized"),
        ("TPS", "DICOMNODE", [], "Calling AE Title Not Recognized"),
    ],
    ids=["unknown-calling-ae", "wrong-called-ae", "wrong-host", "empty-accept-list"],
)
def test_association_policy_rejects_and_audits(make_node, openkbp_series, calling, called, accept, reason):
    node = make_node(accept=accept)
    result = storescu(node.port, openkbp_series[:1], calling=calling, called=called)
    assert result.returncode != 0
    assert "Association Rejected" in result.stderr and reason in result.stderr
    assert _stored(node) == {}
    rejected = _events(node, "association.rejected")
    assert len(rejected) == 1 and rejected[0]["actor"].startswith(f"{calling}@127.0.0.1")
    # the listener keeps serving: once TPS is allowed (as a config reload does), its echo succeeds
    node.receiver.accept = [AcceptEntry(ae_title="TPS")]
    assert echo(Destination(ae_title="DICOMNODE", host="127.0.0.1", port=node.port), calling_ae="TPS") == 0


def _raw_store(port: int, path: Path, calling: str = "TPS") -> int | None:
    """Send a file's bytes verbatim (pynetdicom chunked mode): lets tests deliver broken data sets."""
    meta = read_file_meta_info(path)
    ae = AE(ae_title=calling)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status) if status and "Status" in status else None
    finally:
        assoc.release()


def _broken_file(tmp_path: Path, template: Path, mutate) -> Path:
    ds = dcmread(template)
    with warnings.catch_warnings():  # pydicom rightly warns about the invalid values we are planting
        warnings.simplefilter("ignore")
        mutate(ds)
        out = tmp_path / "broken.dcm"
        ds.save_as(out, enforce_file_format=False)
    return out


@pytest.mark.parametrize(
    ("mutate", "status", "reason"),
    [
        (lambda ds: delattr(ds, "SeriesInstanceUID"), Status.CANNOT_UNDERSTAND, "missing SeriesInstanceUID"),
        (lambda ds: setattr(ds, "StudyInstanceUID", "1.2/../../../../tmp/evil"), Status.CANNOT_UNDERSTAND,
         "invalid StudyInstanceUID"),
        (lambda ds: setattr(ds, "SeriesInstanceUID", "../.."), Status.CANNOT_UNDERSTAND,
         "invalid SeriesInstanceUID"),
    ],
    ids=["missing-series-uid", "uid-with-path", "uid-dotdot"],
)
def test_bad_identifiers_are_refused_and_quarantined(make_node, openkbp_series, tmp_path, mutate, status, reason):
    node = make_node()
    broken = _broken_file(tmp_path, openkbp_series[0], mutate)
    assert _raw_store(node.port, broken) == status
    assert _stored(node) == {}
    quarantined = sorted(node.spool.quarantine_dir.glob("*.dcm"))
    assert len(quarantined) == 1 and dataset_bytes(quarantined[0]) == dataset_bytes(broken)
    assert reason in quarantined[0].with_suffix(".json").read_text()
    (audit,) = _events(node, "instance.quarantined")
    assert reason in audit["detail"] and audit["outcome"] == "rejected"
    # nothing was written outside the storage folder
    assert not Path("/tmp/evil").exists()
    assert [p for p in node.spool.root.rglob("*") if p.is_file() and "quarantine" not in p.parts] == []


def test_unparseable_dataset_is_refused_and_quarantined(make_node, openkbp_series, tmp_path):
    node = make_node()
    good = openkbp_series[0]
    raw = good.read_bytes()
    header_len = len(raw) - len(dataset_bytes(good))
    garbage = tmp_path / "garbage.dcm"
    # keep the file meta (so the sender can propose a context) and replace the data set with junk
    garbage.write_bytes(raw[:header_len] + b"\xde\xad\xbe\xef" * 64)
    assert _raw_store(node.port, garbage) == Status.CANNOT_UNDERSTAND
    assert _stored(node) == {}
    assert len(list(node.spool.quarantine_dir.glob("*.dcm"))) == 1
    # pydicom reads junk leniently (unknown tags) or refuses it; either way the reason is stated
    detail = _events(node, "instance.quarantined")[0]["detail"]
    assert "unparseable dataset" in detail or "missing StudyInstanceUID" in detail
    assert storescu(node.port, openkbp_series[:2]).returncode == 0  # still serving


def test_mismatched_sop_instance_uid_is_refused(make_node, openkbp_series, tmp_path):
    node = make_node()
    ds = dcmread(openkbp_series[0])
    ae = AE(ae_title="TPS")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")

    try:
        # pynetdicom takes the Affected SOP Instance UID from the data set; alter it after encoding instead
        import pynetdicom.dimse_primitives as prims

        original = prims.C_STORE.AffectedSOPInstanceUID.fset

        def fake(self, value):
            original(self, "1.2.3.4.5" if value == ds.SOPInstanceUID else value)

        prims.C_STORE.AffectedSOPInstanceUID = property(prims.C_STORE.AffectedSOPInstanceUID.fget, fake)
        try:
            status = assoc.send_c_store(ds)
        finally:
            prims.C_STORE.AffectedSOPInstanceUID = property(prims.C_STORE.AffectedSOPInstanceUID.fget, original)
    finally:
        assoc.release()
    assert int(status.Status) == Status.DATASET_MISMATCH
    assert _stored(node) == {}


def _mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)


def test_disk_full_answers_out_of_resources_and_loses_nothing(make_node, openkbp_series, tmp_path):
    storage = tmp_path / "small"
    _mount_tmpfs(storage, "1m")
    try:
        node = make_node(storage=storage)
        filler = storage / "filler"
        with open(filler, "wb", buffering=0) as fp:  # fill the file system until it refuses
            try:
                while True:
                    fp.write(b"\0" * 4096)
            except OSError:
                pass
        assert storescu(node.port, openkbp_series[:1]).returncode != 0
        peer = Destination(ae_title="DICOMNODE", host="127.0.0.1", port=node.port)
        (result,) = send_files(peer, openkbp_series[:1], calling_ae="TPS")
        assert result.status == Status.OUT_OF_RESOURCES
        assert _stored(node) == {}
        assert list(node.spool.tmp.iterdir()) == []  # no partial file left behind
        assert list(node.spool.instances.rglob("*.dcm")) == []
        failed = _events(node, "instance.failed")
        assert len(failed) == 2 and "No space left on device" in failed[0]["detail"]
        # space comes back: the sender's retry succeeds and the node never stopped serving
        filler.unlink()
        assert storescu(node.port, openkbp_series[:1]).returncode == 0
        assert set(_stored(node)) == {sop_uid(openkbp_series[0])}
    finally:
        subprocess.run(["umount", "-l", str(storage)], check=False)
