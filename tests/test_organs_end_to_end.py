"""The shipped organ model through the whole node: rule -> `organs` -> RTSTRUCT back at the planning system.

Three OpenKBP validation patients are written as DICOM CT (real pixels, our geometry), pushed with storescu, and
the RTSTRUCTs that arrive at a storescp are rasterised by plastimatch (an independent reader) and scored against
the clinical contours. The node's Dice must be within 0.02 of what `evaluate` computes for the same patients on
the NPZ arrays: the DICOM chain (series loading, contour writing, reading back) loses nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread

from factories import OPENKBP_ORGANS, ct_series, load_openkbp, write_series
from models.evaluate import score_case
from models.organs import segment
from models.package import find_package
from netutil import complete_files, storescp, storescu, wait_until
from pipeline_checks import dciodvfy_errors, dice, plastimatch_masks

PATIENTS = (0, 1, 2)


def _rules(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(
        "rules:\n"
        "  - name: head-and-neck organs\n"
        "    match: {Modality: CT, calling_ae: TPS}\n"
        "    run: [{pipeline: organs, params: {model: hn-oar}}]\n"
        "    output: [rtstruct]\n"
        "    send: [reply]\n")
    return path


@pytest.mark.slow
def test_shipped_model_through_the_node_matches_evaluate(make_node, tmp_path):
    package = find_package("hn-oar")
    cases, folders = [], {}
    for index in PATIENTS:
        case = load_openkbp("validation", index)
        datasets = ct_series(case.ct, case.spacing_zyx, patient_id=case.name)
        folders[datasets[0].SeriesInstanceUID] = (case, tmp_path / case.name)
        write_series(datasets, tmp_path / case.name)
        cases.append(case)

    out = tmp_path / "tps"
    with storescp(out) as port:
        node = make_node(destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": port}},
                         stable=1.0, rules=str(_rules(tmp_path)))
        for case in cases:
            assert storescu(node.port, sorted((tmp_path / case.name).iterdir())).returncode == 0
        wait_until(lambda: complete_files(out, len(cases)), 300, what="one RTSTRUCT per patient")

    for path in sorted(out.iterdir()):
        assert dciodvfy_errors(path) == [], path
        rtstruct = dcmread(path)
        series_uid = (rtstruct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
                      .RTReferencedSeriesSequence[0].SeriesInstanceUID)
        case, folder = folders[series_uid]
        node_masks = plastimatch_masks(path, folder, tmp_path / f"plastimatch-{case.name}")
        truth = {OPENKBP_ORGANS[k]: m > 0 for k, m in case.masks.items() if k in OPENKBP_ORGANS and m.any()}

        spacing_xyz = case.spacing_zyx[::-1]
        evaluated = score_case(segment(case.ct, spacing_xyz, package), truth, spacing_xyz, case.name)
        for score in evaluated:
            node_mask = node_masks.get(score.structure, np.zeros_like(truth[score.structure]))
            assert abs(dice(node_mask, truth[score.structure]) - score.dice) <= 0.02, (case.name, score)
        node_mean = np.mean([dice(node_masks.get(n, np.zeros_like(t)), t) for n, t in truth.items()])
        assert abs(node_mean - np.mean([s.dice for s in evaluated])) <= 0.02
        assert node_mean > 0.25, f"{case.name}: the shipped model should segment these organs (mean Dice {node_mean:.3f})"
    jobs = node.store.job_rows()
    assert [j["state"] for j in jobs] == ["done"] * len(cases)
