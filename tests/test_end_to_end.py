"""A real CT through the whole node: rule -> `body` pipeline -> RTSTRUCT and SEG back at the sender.

Checked independently: dciodvfy (zero errors), plastimatch rasterising our RTSTRUCT, highdicom reading our SEG,
each against the mask the pipeline computes on the same series.
"""

from __future__ import annotations

import io
import time

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from dicomutil import sop_uid
from netutil import complete_files, storescp, storescu, wait_until
from orthanc import orthanc
from pipeline.base import load_pipeline, run_pipeline
from pipeline_checks import dciodvfy_errors, dice, plastimatch_masks


def _rules_file(tmp_path, output="[both]", send="[reply]", pipeline="body"):
    path = tmp_path / "rules.yaml"
    path.write_text(
        "rules:\n"
        "  - name: head-and-neck external\n"
        "    match: {Modality: CT, BodyPartExamined: {in: [HEADNECK, HEAD]}, SeriesDescription: {regex: '(?i)plan'}}\n"
        f"    run: [{{pipeline: {pipeline}}}]\n"
        f"    output: {output}\n"
        f"    send: {send}\n")
    return path


@pytest.fixture
def expected_body(openkbp_series):
    datasets = [dcmread(p) for p in openkbp_series]
    result = run_pipeline(load_pipeline("body"), datasets, {})
    return result.structures[0].mask


def test_storescu_to_node_to_storescp_rtstruct_and_seg(make_node, openkbp_series, tmp_path, expected_body):
    out = tmp_path / "tps"
    with storescp(out) as port:
        node = make_node(destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": port}},
                         stable=1.0, rules=str(_rules_file(tmp_path)))
        assert storescu(node.port, openkbp_series).returncode == 0
        wait_until(lambda: complete_files(out, 2), 120, what="RTSTRUCT and SEG at the TPS")
        time.sleep(0.5)
    received = {dcmread(p, stop_before_pixels=True).Modality: p for p in out.iterdir()}
    assert set(received) == {"RTSTRUCT", "SEG"}
    for path in received.values():
        assert dciodvfy_errors(path) == [], path
    rtstruct = dcmread(received["RTSTRUCT"])
    assert rtstruct.SeriesDescription.startswith("AUTO: body")
    assert rtstruct.Manufacturer == "dicom-node"
    referenced = {i.ReferencedSOPInstanceUID for i in rtstruct.ReferencedFrameOfReferenceSequence[0]
                  .RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].ContourImageSequence}
    assert referenced == {sop_uid(p) for p in openkbp_series}
    masks = plastimatch_masks(received["RTSTRUCT"], openkbp_series[0].parent, tmp_path / "plastimatch")
    assert dice(masks["External"], expected_body) >= 0.98
    seg = hd.seg.segread(io.BytesIO(received["SEG"].read_bytes()))
    pixels = seg.get_pixels_by_source_instance(  # (Z, Y, X, segments) in the source slice order
        source_sop_instance_uids=[sop_uid(p) for p in openkbp_series], assert_missing_frames_are_empty=True)
    assert dice(pixels[..., 0].astype(bool), expected_body) >= 0.98
    (job,) = node.store.job_rows()
    assert job["state"] == "done" and job["rule"] == "head-and-neck external"
    events = [r["event"] for r in node.store.audit_records()]
    for expected in ("job.queued", "job.started", "job.done", "send.success"):
        assert expected in events
    # a resend of the identical series creates no second job
    assert storescu(node.port, openkbp_series[:3]).returncode == 0
    time.sleep(2.5)
    assert len(node.store.job_rows()) == 1


def _broken(openkbp_series, tmp_path, kind):
    """Real slices made into a series that cannot be a volume."""
    from pydicom.uid import generate_uid

    folder = tmp_path / kind
    folder.mkdir()
    files = openkbp_series[:20]
    if kind == "missing-slice":
        files = files[:10] + files[11:]
    series_uid = generate_uid()
    out = []
    for i, path in enumerate(files):
        ds = dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if kind == "mixed-sizes" and i == 5:
            ds.Rows, ds.Columns = 64, 64
            ds.PixelData = np.zeros((64, 64), "<i2").tobytes()
        if kind == "gantry-tilt":
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [f"{x:.4f}", f"{y + i * 1.5:.4f}", f"{z:.4f}"]
        out.append(folder / path.name)
        ds.save_as(out[-1], enforce_file_format=True)
    return out


@pytest.mark.parametrize("kind", ["missing-slice", "mixed-sizes", "gantry-tilt"])
def test_bad_series_fail_their_job_clearly_and_the_node_keeps_serving(make_node, openkbp_series, tmp_path, kind):
    node = make_node(destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": 1}}, stable=0.5,
                     rules=str(_rules_file(tmp_path)))
    assert storescu(node.port, _broken(openkbp_series, tmp_path, kind)).returncode == 0
    wait_until(lambda: [j["state"] for j in node.store.job_rows()] == ["rejected"], 30, what="rejected job")
    (job,) = node.store.job_rows()
    assert job["error"].startswith("SeriesError: ") and job["attempts"] == 1
    (audit,) = node.store.audit_records(event="job.rejected")
    assert audit["outcome"] == "failed" and "SeriesError" in audit["detail"]
    assert node.store.status()["outbox"] == []  # nothing is sent for a rejected job
    assert storescu(node.port, openkbp_series[:2]).returncode == 0  # still serving


def test_rules_reload_keeps_old_rules_when_the_new_file_is_bad(make_node, tmp_path, openkbp_series):
    node = make_node(destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": 1}}, stable=30,
                     rules=str(_rules_file(tmp_path)))
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text("rules: [{name: broken, run: [{pipeline: does-not-exist}]}]\n")
    wait_until(lambda: node.store.audit_records(event="rules.rejected"), 10, what="refused reload")
    assert [r.name for r in node.rules.rules] == ["head-and-neck external"]
    assert "unknown pipeline 'does-not-exist'" in node.store.audit_records(event="rules.rejected")[0]["detail"]
    rules_path.write_text("rules: [{name: lungs only, match: {Modality: CT}, run: [{pipeline: lungs}]}]\n")
    wait_until(lambda: node.rules.rules[0].name == "lungs only", 10, what="accepted reload")
    assert storescu(node.port, openkbp_series[:1]).returncode == 0  # associations unaffected


def test_unrouted_series_is_audited(make_node, tmp_path, openkbp_series):
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: [{name: mr, match: {Modality: MR}, run: [{pipeline: body}]}]\n")
    node = make_node(stable=0.5, rules=str(rules))
    assert storescu(node.port, openkbp_series[:3]).returncode == 0
    wait_until(lambda: node.store.audit_records(event="series.unrouted"), 10, what="unrouted")
    assert node.store.job_rows() == []


@pytest.mark.orthanc
def test_orthanc_pushes_ct_and_gets_a_valid_rtstruct_back(make_node, openkbp_series, tmp_path, expected_body):
    with orthanc(tmp_path / "pacs", "ORTHANC", {}) as pacs:
        node = make_node(accept=[{"ae_title": "ORTHANC"}], stable=1.0,
                         destinations={"orthanc": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                                                   "port": pacs.dicom_port}},
                         rules=str(_rules_file(tmp_path, output="[rtstruct]")))
        pacs.put("/modalities/node", {"AET": "DICOMNODE", "Host": "127.0.0.1", "Port": node.port})
        pacs.upload(openkbp_series)
        pacs.post("/modalities/node/store", {"Resources": pacs.get("/studies"), "Synchronous": True}, timeout=300)
        wait_until(lambda: any(pacs.get(f"/series/{s}")["MainDicomTags"].get("Modality") == "RTSTRUCT"
                               for s in pacs.get("/series")), 120, what="RTSTRUCT in Orthanc")
        (rt_series,) = [s for s in pacs.get("/series")
                        if pacs.get(f"/series/{s}")["MainDicomTags"].get("Modality") == "RTSTRUCT"]
        (instance,) = pacs.get(f"/series/{rt_series}")["Instances"]
        rt_path = tmp_path / "from-orthanc.dcm"
        rt_path.write_bytes(pacs.download(f"/instances/{instance}/file"))
    assert dciodvfy_errors(rt_path) == []
    masks = plastimatch_masks(rt_path, openkbp_series[0].parent, tmp_path / "pm")
    assert dice(masks["External"], expected_body) >= 0.98


def test_a_failing_pipeline_is_retried_then_failed_and_audited(make_node, openkbp_series, tmp_path, monkeypatch):
    """The worker's error policy, with a stand-in pipeline that raises (a model error, not an input error)."""
    import dicom_node.worker
    import pipeline.routing
    from pipeline.base import PipelineParams

    class Exploding:
        name, version, Params = "explode", "0", PipelineParams

        def run(self, data):
            raise RuntimeError("weights file is corrupted")

    real = load_pipeline
    fake = lambda name: Exploding() if name == "explode" else real(name)  # noqa: E731
    monkeypatch.setattr(pipeline.routing, "load_pipeline", fake)
    monkeypatch.setattr(dicom_node.worker, "load_pipeline", fake)
    node = make_node(stable=0.5, rules=str(_rules_file(tmp_path, pipeline="explode")),
                     workers={"max_attempts": 2, "retry_seconds": 0.2},
                     destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": 1}})
    assert storescu(node.port, openkbp_series[:5]).returncode == 0
    wait_until(lambda: [j["state"] for j in node.store.job_rows()] == ["failed"], 30, what="failed job")
    (job,) = node.store.job_rows()
    assert job["attempts"] == 2 and "RuntimeError: weights file is corrupted" in job["error"]
    assert [r["outcome"] for r in node.store.audit_records(event="job.*") if r["event"] != "job.queued"] == [
        "ok", "retry", "ok", "failed"]
    assert storescu(node.port, openkbp_series[5:7]).returncode == 0  # the node keeps serving
