"""Model packages: manifest + hash-checked weights; a damaged package is refused with a clear message."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dicom_node.cli import app
from models.errors import ModelInputError, ModelPackageError
from models.networks import build_network
from models.organs import canonical_axes, main_components, segment_volume
from models.package import load_package, write_package
from models.types import Volume

LABELS = [{"name": "Parotid_R", "mirror": "Parotid_L"}, {"name": "Parotid_L", "mirror": "Parotid_R"},
          {"name": "Brainstem"}]
ARCH = {"name": "slices.UNet", "params": {"in_channels": 1, "out_channels": 3, "context": 1,
                                          "channels": [4, 8], "strides": [2], "norm": "BATCH"}}


def _fields(**over):
    fields = {"name": "toy", "version": "0.1", "architecture": ARCH, "target_spacing": [4.0, 4.0, 3.0],
              "intensity": {"lower": -1000, "upper": 1000, "std": 500}, "patch": {"size": [4, 32, 32]},
              "threshold": 0.5, "labels": LABELS}
    return fields | over


@pytest.fixture
def package(tmp_path):
    torch.manual_seed(0)
    net = build_network(ARCH["name"], ARCH["params"])
    with torch.no_grad():  # a positive bias on channel 0 so the toy network segments something
        net.net.model[-1].conv.bias.add_(torch.tensor([0.3, -5.0, -5.0]))
    return write_package(tmp_path / "toy", _fields(), net.state_dict())


def test_package_round_trip(package):
    loaded = load_package(package.path)
    assert loaded.manifest.label_names == ["Parotid_R", "Parotid_L", "Brainstem"]
    assert loaded.manifest.mirror_permutation() == [1, 0, 2]
    net = loaded.build_network()
    assert not net.training


def test_replaced_weights_are_refused(package):
    weights = package.weights_path
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match="corrupted or replaced: SHA-256"):
        load_package(package.path)


@pytest.mark.parametrize("damage", ["no-manifest", "no-weights", "bad-manifest", "unknown-architecture"])
def test_incomplete_or_invalid_packages_are_refused(package, damage):
    if damage == "no-manifest":
        (package.path / "manifest.yaml").unlink()
        match = "manifest.yaml is missing"
    elif damage == "no-weights":
        package.weights_path.unlink()
        match = "weights file 'weights.pt' is missing"
    elif damage == "bad-manifest":
        text = (package.path / "manifest.yaml").read_text().replace("target_spacing:", "target_spacin:")
        (package.path / "manifest.yaml").write_text(text)
        match = "invalid manifest: target_spacing: Field required"
    else:
        text = (package.path / "manifest.yaml").read_text().replace("slices.UNet", "resnet")
        (package.path / "manifest.yaml").write_text(text)
        with pytest.raises(ModelPackageError, match="unknown architecture 'resnet'"):
            load_package(package.path).build_network()
        return
    with pytest.raises(ModelPackageError, match=match):
        load_package(package.path)


def test_models_list_shows_broken_packages_and_fails(package, tmp_path):
    shutil.copytree(package.path, tmp_path / "zoo" / "good")
    shutil.copytree(package.path, tmp_path / "zoo" / "bad")
    weights = tmp_path / "zoo" / "bad" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-1])
    result = CliRunner().invoke(app, ["models", "list", "--path", str(tmp_path / "zoo")])
    assert result.exit_code == 1
    assert "BROKEN" in result.output and "corrupted or replaced" in result.output
    assert "Parotid_R, Parotid_L, Brainstem" in result.output


def test_canonical_axes_for_feet_first_and_sagittal_grids():
    assert canonical_axes((1, 0, 0, 0, 1, 0, 0, 0, 1)) == ((0, 1, 2), (False, False, False))
    assert canonical_axes((1, 0, 0, 0, 1, 0, 0, 0, -1)) == ((0, 1, 2), (True, False, False))
    sagittal = np.zeros((3, 3))
    sagittal[1, 0], sagittal[2, 1], sagittal[0, 2] = 1, -1, 1  # columns: P, rows: inferior, slices: L
    transpose, flips = canonical_axes(tuple(sagittal.ravel()))
    zyx = np.stack(np.meshgrid(*[np.arange(n) for n in (4, 5, 6)], indexing="ij"), -1)  # (Z, Y, X, 3) indices
    patient = zyx[..., ::-1] @ sagittal.T  # patient (x, y, z) of every voxel
    canonical = np.flip(np.transpose(patient, (*transpose, 3)), [a for a in range(3) if flips[a]])
    for axis, patient_axis in ((2, 0), (1, 1), (0, 2)):  # numpy axis -> the patient axis it must increase
        step = np.diff(canonical, axis=axis)[..., patient_axis]
        assert (step > 0).all()
    with pytest.raises(ModelInputError, match="too oblique"):
        c, s = np.cos(np.radians(45)), np.sin(np.radians(45))
        canonical_axes((c, -s, 0, s, c, 0, 0, 0, 1))


def test_post_processing_keeps_an_organ_split_by_a_gap_and_drops_distant_specks():
    mask = np.zeros((20, 20, 20), bool)
    mask[2:9, 5:9, 5:9] = True  # an organ the network split in two by a one-voxel gap ...
    mask[10:16, 5:9, 5:9] = True
    mask[5:12, 14:17, 14:17] = True  # ... a second large piece further away (kept: >= 20% of the main one)
    speck = (18, 1, 1)
    mask[speck] = True  # a distant single voxel (dropped)
    kept = main_components(mask)
    expected = mask.copy()
    expected[speck] = False
    assert np.array_equal(kept, expected)
    # with plain largest-component filtering (no grouping, keep only the biggest) one half of the organ is lost
    assert main_components(mask, gap=0, keep_fraction=1.0).sum() == 7 * 16


def test_segment_volume_is_independent_of_slice_order(package):
    """A feet-first copy of a series (slices reversed, z axis pointing to the feet) gets the same contours."""
    from factories import load_openkbp

    case = load_openkbp("validation", 0)
    image = case.ct[40:56].astype(np.float32)
    spacing = (case.spacing_zyx[2], case.spacing_zyx[1], case.spacing_zyx[0])
    head_first = Volume(image, spacing, (0.0, 0.0, 0.0))
    feet_first = Volume(np.ascontiguousarray(image[::-1]), spacing, (0.0, 0.0, 15 * spacing[2]),
                        direction=(1, 0, 0, 0, 1, 0, 0, 0, -1))
    a = {s.name: s.mask for s in segment_volume(head_first, package)}
    b = {s.name: s.mask for s in segment_volume(feet_first, package)}
    assert a and set(a) == set(b)
    for name in a:
        assert np.array_equal(a[name], b[name][::-1])


def test_a_labels_own_threshold_overrides_the_manifests(package, tmp_path):
    """labels[].threshold cuts that label's probabilities; the others keep the manifest's threshold."""
    from models.organs import segment

    image = np.random.default_rng(0).normal(0, 300, (8, 24, 24)).astype(np.float32)
    spacing = (4.0, 4.0, 3.0)
    base = segment(image, spacing, package)
    labels = [dict(LABELS[0], threshold=0.95), *LABELS[1:]]
    state = torch.load(package.weights_path, weights_only=True)
    strict = write_package(tmp_path / "strict", _fields(labels=labels), state)
    assert strict.manifest.label_thresholds() == [0.95, 0.5, 0.5]
    cut = segment(image, spacing, strict)
    assert base["Parotid_R"].sum() > cut["Parotid_R"].sum()
    assert all(np.array_equal(base[n], cut[n]) for n in ("Parotid_L", "Brainstem"))
    # a threshold on another label leaves the (non-empty) Parotid_R exactly as the manifest's threshold cuts it
    other = write_package(tmp_path / "other", _fields(labels=[*LABELS[:2], dict(LABELS[2], threshold=0.95)]), state)
    assert base["Parotid_R"].any() and np.array_equal(segment(image, spacing, other)["Parotid_R"], base["Parotid_R"])


def test_rules_naming_an_unknown_model_are_refused():
    from pipeline.base import load_pipeline, validate_params
    from pipeline.errors import PipelineParamsError

    with pytest.raises(PipelineParamsError, match="model: .*no model package named 'nope'"):
        validate_params(load_pipeline("organs"), {"model": "nope"})
    # the shipped fine-tuned LiteMedSAM is a prompt engine for `propagate`, not an organ network
    with pytest.raises(PipelineParamsError, match="'hn-litemedsam' is a 'litemedsam' model, not an organ"):
        validate_params(load_pipeline("organs"), {"model": "hn-litemedsam"})
    assert validate_params(load_pipeline("organs"), {"model": "hn-oar"}).model == "hn-oar"


def test_a_package_damaged_while_the_node_runs_fails_its_job_clearly(make_node, package, openkbp_series, tmp_path,
                                                                      monkeypatch):
    from netutil import storescu, wait_until

    monkeypatch.setenv("DICOM_NODE_MODEL_PATH", str(package.path.parent))
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: [{name: toy organs, match: {Modality: CT},"
                     " run: [{pipeline: organs, params: {model: toy}}], send: [tps]}]\n")
    node = make_node(stable=0.5, rules=str(rules), workers={"max_attempts": 2, "retry_seconds": 0.2},
                     destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": 1}})
    weights = package.weights_path  # the rules loaded with a sound package; now the file is damaged on disk
    weights.write_bytes(weights.read_bytes()[:-100])
    assert storescu(node.port, openkbp_series[:6]).returncode == 0
    wait_until(lambda: [j["state"] for j in node.store.job_rows()] == ["failed"], 60, what="failed job")
    (job,) = node.store.job_rows()
    assert "model package 'toy' is unusable" in job["error"] and "corrupted or replaced" in job["error"]
    (audit,) = node.store.audit_records(event="job.failed")
    assert "corrupted or replaced" in audit["detail"]
    assert node.store.status()["outbox"] == []
    assert storescu(node.port, openkbp_series[6:8]).returncode == 0  # the node keeps serving


def test_on_cpu_the_shipped_slice_network_runs_in_onnx_runtime_with_torchs_results(tmp_path, monkeypatch):
    """cached_network swaps the 2-D part of hn-oar for an ONNX Runtime session (cached on disk); on a real CT slab
    its probabilities equal torch eager's, and a second build reads the cached graph."""
    from factories import load_openkbp
    from models import onnx_cpu
    from models.organs import normalise, onnx_slices, predict_probabilities
    from models.package import find_package

    monkeypatch.setenv("DICOM_NODE_CACHE", str(tmp_path / "cache"))
    package = find_package("hn-oar")
    case = load_openkbp("validation", 1)  # 3.906 mm pixels: the model grid itself
    z = case.ct.shape[0] // 2
    slab = normalise(case.ct[z - 6:z + 6].astype(np.float32), package.manifest.intensity)
    eager = predict_probabilities(package.build_network("cpu"), slab, package.manifest)
    fast = onnx_slices(package.build_network("cpu"))
    assert isinstance(fast.net, onnx_cpu.OnnxModule)
    assert len(list((tmp_path / "cache" / "onnx").glob("slices-*.onnx"))) == 1
    np.testing.assert_allclose(predict_probabilities(fast, slab, package.manifest), eager, atol=1e-4)
    assert eager.max() > 0.5  # organs were found: the comparison is not between two empty outputs
    again = onnx_slices(package.build_network("cpu"))  # from the cached graph
    np.testing.assert_allclose(predict_probabilities(again, slab, package.manifest), eager, atol=1e-4)
