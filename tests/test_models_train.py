"""Training on a handful of real OpenKBP cases: the loss goes down, the run resumes, the result is a package."""

from __future__ import annotations

import numpy as np
import yaml
from typer.testing import CliRunner

from dicom_node.cli import app
from factories import OPENKBP
from models.organs import segment
from models.package import load_package


def _config(tmp_path, epochs):
    cfg = {
        "data": {"train_dirs": [str(OPENKBP / "train")], "val_dirs": [str(OPENKBP / "validation")],
                 "max_train_cases": 4, "max_val_cases": 1},
        "labels": [{"name": "Parotid_R", "source_names": ["RightParotid"], "mirror": "Parotid_L"},
                   {"name": "Parotid_L", "source_names": ["LeftParotid"], "mirror": "Parotid_R"},
                   {"name": "Bone_Mandible", "source_names": ["Mandible"]}],
        "network": {"name": "tiny", "architecture": "slices.UNet",
                    "params": {"context": 1, "channels": [8, 16, 32], "strides": [2, 2], "norm": "BATCH"},
                    "target_spacing": [4.0, 4.0, 2.5], "patch_size": [6, 64, 64]},
        "augment": {"tilt_deg": 0},
        "optim": {"lr": 0.003, "warmup_iterations": 5},
        "output_dir": str(tmp_path / "run"),
        "epochs": epochs, "iterations_per_epoch": 12, "batch_size": 4, "seed": 1, "threads": 2,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_training_lowers_the_loss_resumes_and_writes_a_usable_package(tmp_path):
    result = CliRunner().invoke(app, ["train", "--config", str(_config(tmp_path, 3)), "--no-progress"])
    assert result.exit_code == 0, result.output
    history = yaml.safe_load((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[-1]["loss"] < history[0]["loss"] - 0.05
    assert all(0 <= h["val_mean_dice"] <= 1 for h in history)
    assert (tmp_path / "run" / "curve.png").stat().st_size > 1000

    # resume: two more epochs continue the same run rather than starting over
    result = CliRunner().invoke(app, ["train", "--config", str(_config(tmp_path, 5)), "--no-progress"])
    assert result.exit_code == 0, result.output
    history = yaml.safe_load((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4]

    package = load_package(tmp_path / "run" / "package" / "tiny")  # hash-checked
    manifest = package.manifest
    assert manifest.label_names == ["Parotid_R", "Parotid_L", "Bone_Mandible"]
    assert manifest.training["train_cases"] == 4 and manifest.training["epochs_run"] == 5
    assert 0 <= manifest.metrics["validation_mean_dice_model_grid"] <= 1
    with np.load(OPENKBP / "validation" / "validation_pt_201.npz") as case:
        ct, spacing = case["ct"], tuple(float(s) for s in case["spacing"][::-1])
    masks = segment(ct, spacing, package)
    assert set(masks) == {"Parotid_R", "Parotid_L", "Bone_Mandible"}

    # a new run started from that package's weights begins where the first one ended, not from scratch
    tuned = _config(tmp_path, 1)
    cfg = yaml.safe_load(tuned.read_text())
    tuned.write_text(yaml.safe_dump({**cfg, "output_dir": str(tmp_path / "tuned"), "init_from": "run/package/tiny"}))
    result = CliRunner().invoke(app, ["train", "--config", str(tuned), "--no-progress"])
    assert result.exit_code == 0, result.output
    first = yaml.safe_load((tmp_path / "tuned" / "history.json").read_text())[0]
    assert first["loss"] < history[0]["loss"] - 0.05

    # ... so does one whose network adds far slices to the package's (their inputs start at zero weight)
    grown = {**cfg["network"], "params": {**cfg["network"]["params"], "far": [3]}, "patch_size": [10, 64, 64]}
    tuned.write_text(yaml.safe_dump({**cfg, "network": grown, "output_dir": str(tmp_path / "grown"),
                                     "init_from": "run/package/tiny"}))
    result = CliRunner().invoke(app, ["train", "--config", str(tuned), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "grown" / "history.json").read_text())[0]["loss"] < history[0]["loss"] - 0.05
    assert load_package(tmp_path / "grown" / "package" / "tiny").manifest.architecture.params["far"] == [3]

    # ... and a package whose labels differ is refused with the reason
    tuned.write_text(yaml.safe_dump({**cfg, "labels": cfg["labels"][:2], "output_dir": str(tmp_path / "other"),
                                     "init_from": "run/package/tiny"}))
    result = CliRunner().invoke(app, ["train", "--config", str(tuned), "--no-progress"])
    assert result.exit_code == 1
    assert "init_from" in result.output and "labels" in result.output
    assert all(m.shape == ct.shape for m in masks.values())


def test_a_bad_training_config_names_the_key(tmp_path):
    path = _config(tmp_path, 1)
    path.write_text(path.read_text().replace("batch_size: 4", "batch_size: 0"))
    result = CliRunner().invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 1
    assert "batch_size" in result.output


def test_predicting_nothing_is_not_rewarded_for_structures_outside_the_patch():
    """Two structures present in the case; only the first has voxels in the patch. A network that predicts nothing
    must score Dice 0 on the first and nothing at all on the second (it once scored a smoothed Dice of 1 there,
    and training collapsed to empty masks)."""
    import torch

    from models.train import masked_loss

    target = torch.zeros(1, 2, 4, 16, 16)
    target[0, 0, 1:3, 4:8, 4:8] = 1
    nothing = torch.full_like(target, -20.0)
    present = torch.tensor([[True, True]])
    assert masked_loss(nothing, target, present, dice_weight=1.0) > 0.99
    perfect = torch.where(target > 0, 20.0, -20.0)
    assert masked_loss(perfect, target, present, dice_weight=1.0) < 0.01


def test_sample_weight_centres_more_patches_on_a_structure(tmp_path):
    import torch

    from config.training import TrainingConfig
    from models.train import _batch, _Resident

    masks = torch.zeros(2, 8, 32, 32, dtype=torch.uint8)
    masks[0, :, :4, :4] = 1  # structure A in one corner, B in the opposite one
    masks[1, :, -4:, -4:] = 1
    case = _Resident(torch.zeros(8, 32, 32), masks, torch.tensor([True, True]),
                     (np.argwhere(masks[0].numpy()), np.argwhere(masks[1].numpy())), 0.0)
    raw = yaml.safe_load(_config(tmp_path, 1).read_text())

    def share_of_b(weight_b: float) -> float:
        raw["labels"] = [{"name": "A"}, {"name": "B", "sample_weight": weight_b}]
        cfg = TrainingConfig.model_validate({**raw, "foreground_fraction": 1.0, "batch_size": 64,
                                             "network": {**raw["network"], "patch_size": [8, 8, 8]}})
        rng = np.random.default_rng(0)
        patches = torch.cat([_batch([case], [[0], [0]], cfg, rng)[1] for _ in range(6)])
        return float((patches[:, 1].sum(dim=(1, 2, 3)) > 0).float().mean())

    assert 0.4 < share_of_b(1.0) < 0.6
    assert 0.7 < share_of_b(4.0) < 0.9


def test_npz_with_a_direction_is_read_in_the_models_orientation(tmp_path):
    """`dicom-node convert` keeps a feet-first series as stored (slice 0 = most superior); training sees it
    head-first, like inference does, with masks and spacing following."""
    from models.data import LabelSource, read_npz

    rng = np.random.default_rng(0)
    image = rng.integers(-1000, 1000, (5, 4, 3)).astype(np.int16)
    mask = np.zeros((5, 4, 3), np.uint8)
    mask[0, 1, 2] = 1
    np.savez(tmp_path / "ff.npz", image=image, mask_Brainstem=mask, spacing=np.array([3.0, 1.0, 2.0]),
             direction=np.diag([1.0, 1.0, -1.0]))
    case = read_npz(tmp_path / "ff.npz", [LabelSource("Brainstem")])
    assert np.array_equal(case.image, image[::-1])
    assert case.masks[0, 4, 1, 2] == 1 and case.masks.sum() == 1
    assert case.spacing_xyz == (2.0, 1.0, 3.0)


def test_the_example_configs_rebuild_the_shipped_model_and_fine_tune_it():
    """The shipped hn-oar is built in four stages: config/train.example.yaml trains 2.0.0,
    config/train.context.example.yaml grows that package's network by far slices and trains on (2.1.0),
    config/train.continue.example.yaml trains 2.1.0 on (2.2.0), and config/train.continue2.example.yaml trains
    2.2.0 on (its manifest describes the shipped package). The
    fine-tuning example starts from the shipped package's weights (its network and labels are checked against the
    package)."""
    from pathlib import Path

    import torch

    from config.training import load_training_config
    from models.package import find_package
    from models.train import _grows_far_context, _initial_weights, manifest_fields

    config_dir = Path(__file__).resolve().parents[1] / "config"
    shipped = find_package("hn-oar").manifest
    stage1 = load_training_config(config_dir / "train.example.yaml")
    stage2 = load_training_config(config_dir / "train.context.example.yaml")
    assert Path(stage2.init_from) == Path(stage1.output_dir) / "package" / stage1.network.name
    first, second = (manifest_fields(c, {}, {})["architecture"] for c in (stage1, stage2))
    assert first["name"] == second["name"] and _grows_far_context(first["params"], second["params"])
    stage3 = load_training_config(config_dir / "train.continue.example.yaml")
    assert Path(stage3.init_from) == Path(stage2.output_dir) / "package" / stage2.network.name
    stage4 = load_training_config(config_dir / "train.continue2.example.yaml")
    assert Path(stage4.init_from) == Path(stage3.output_dir) / "package" / stage3.network.name
    assert (stage4.network.name, stage4.network.version) == (shipped.name, shipped.version)
    assert manifest_fields(stage4, {}, {})["architecture"] == second == shipped.architecture.model_dump(mode="json")
    assert manifest_fields(stage3, {}, {})["architecture"] == second
    assert [lab.name for lab in stage4.labels] == shipped.label_names == [lab.name for lab in stage1.labels]
    assert [lab.name for lab in stage2.labels] == [lab.name for lab in stage3.labels] == shipped.label_names
    finetune = load_training_config(config_dir / "train.finetune.example.yaml")
    assert finetune.init_from == "hn-oar"
    assert manifest_fields(finetune, {}, {})["architecture"] == second
    shipped_weights = torch.load(find_package("hn-oar").weights_path, weights_only=True)
    assert set(_initial_weights(finetune)) == set(shipped_weights)


def test_far_context_slices_grow_a_slice_network_without_changing_what_it_computes():
    """A slice network given far slices (hn-oar 2.1.0: 4, 8, 16, 24 slices away) and started from a smaller one's
    weights computes exactly what the smaller one did; far offsets inside the near context are refused."""
    import pytest
    import torch

    from models.errors import ModelPackageError
    from models.networks import build_network, expand_input_weights

    params = {"context": 1, "channels": [8, 16, 32], "strides": [1, 2], "norm": "BATCH", "in_channels": 1,
              "out_channels": 2}
    torch.manual_seed(0)
    near = build_network("slices.UNet", params).eval()
    grown = build_network("slices.UNet", {**params, "far": [3, 5]}).eval()
    assert grown.offsets == (-1, 0, 1, -3, 3, -5, 5) and grown.z_context == 5 and grown.slice_channels == 7
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    grown.load_state_dict(expand_input_weights(near.state_dict(), grown.state_dict()))
    assert any(not torch.equal(before[k], v) for k, v in grown.state_dict().items())
    x = torch.randn(1, 1, 12, 16, 16)
    with torch.no_grad():
        assert torch.allclose(near(x), grown(x), atol=1e-5)
        # the far slices do reach the output once their weights are not zero
        first = next(k for k, v in grown.state_dict().items() if v.ndim == 4 and v.shape[1] == 7)
        grown.state_dict()[first][:, 3:] = 1.0
        assert not torch.allclose(near(x), grown(x), atol=1e-3)
    with pytest.raises(ModelPackageError, match="far offsets"):
        build_network("slices.UNet", {**params, "far": [1]})


def test_patches_reach_past_the_volume_ends_with_repeated_end_slices():
    """With a z margin (a slice network's context), a patch may hang over either end of the volume: the image
    repeats its end slices as inference pads them, labels are empty there, and every real slice can be trained."""
    import torch

    from models.train import _Resident, _sample_patch

    image = torch.arange(6, dtype=torch.float32)[:, None, None].expand(6, 4, 4).contiguous()
    masks = torch.ones(1, 6, 4, 4, dtype=torch.uint8)
    case = _Resident(image, masks, torch.tensor([True]), (np.argwhere(masks[0].numpy()),), -1.0)
    img, msk = _sample_patch(case, (5, 4, 4), np.random.default_rng(0), np.array([0, 2, 2]), z_margin=2)
    assert img[:, 0, 0].tolist() == [0, 0, 0, 1, 2]  # centred on slice 0: two repeated slices before it
    assert msk[0, :, 0, 0].tolist() == [0, 0, 1, 1, 1]
    img, _ = _sample_patch(case, (5, 4, 4), np.random.default_rng(0), np.array([5, 2, 2]), z_margin=2)
    assert img[:, 0, 0].tolist() == [3, 4, 5, 5, 5]
    rng = np.random.default_rng(1)
    centres = {int(_sample_patch(case, (5, 4, 4), rng, None, z_margin=2)[0][2, 0, 0]) for _ in range(200)}
    assert centres == set(range(6))
    img, _ = _sample_patch(case, (5, 4, 4), np.random.default_rng(0), np.array([0, 2, 2]))  # no margin: inside
    assert img[:, 0, 0].tolist() == [0, 1, 2, 3, 4]


def test_a_time_limit_stops_before_an_epoch_that_would_pass_it():
    import time

    from models.train import out_of_time

    started = time.monotonic() - 50  # 50 s into a 1-minute run, epochs of up to 20 s
    assert out_of_time(1, started, [12.0, 20.0], epoch=1, epochs=5)
    assert not out_of_time(2, started, [12.0, 20.0], epoch=1, epochs=5)
    assert not out_of_time(1, started, [12.0, 20.0], epoch=4, epochs=5)  # the last epoch: nothing left to stop
    assert not out_of_time(None, started, [12.0, 20.0], epoch=1, epochs=5)
