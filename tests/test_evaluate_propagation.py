"""evaluate-propagation: seed choice, modes and the report on a synthetic case with a toy engine (no weights), then
the command on a slab of a real OpenKBP case with the real LiteMedSAM engine."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from models.evaluate_propagation import (
    HN_ORGANS, Run, comparison_markdown, evaluate_case, evaluate_propagation, seed_slices,
)
from models.propagate import EncodingCache, PropagationSettings


class ThresholdEngine:
    """A toy promptable engine: the 'embedding' is the crop itself; a box decodes to the bright pixels inside it
    (a perfect segmenter of bright objects). ``blind`` makes it find nothing."""

    name, version, input_size = "toy", "1", 256

    def __init__(self, blind: bool = False):
        self.blind = blind
        self.encoded = 0

    def encode(self, images):
        self.encoded += len(images)
        return list(np.asarray(images, np.float32))

    def decode(self, embeddings, prompts):
        out = np.full((len(prompts), 256, 256), -10.0, np.float32)
        for m, (image, prompt) in enumerate(zip(embeddings, prompts)):
            if self.blind:
                continue
            x0, y0, x1, y1 = (int(round(v)) for v in prompt.box)
            inside = np.zeros((256, 256), bool)
            inside[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
            out[m][inside & (image > 0.5)] = 10.0
        return out


def _cylinder(depth: int = 12, radius: int = 5):
    """CT (Z, Y, X) HU with a bright cylinder on slices 2 .. depth-3, and its mask."""
    yy, xx = np.mgrid[:48, :48]
    disc = (yy - 24) ** 2 + (xx - 20) ** 2 <= radius ** 2
    mask = np.zeros((depth, 48, 48), bool)
    mask[2:depth - 2] = disc
    ct = np.where(mask, 200, -500).astype(np.int16)
    return ct, mask


def test_seed_slices_are_the_middle_or_the_quartiles_and_hold_the_structure():
    mask = np.zeros((20, 4, 4), bool)
    mask[4:13, 1, 1] = True  # slices 4 .. 12
    assert seed_slices(mask, 1) == [8]
    assert seed_slices(mask, 3) == [6, 8, 10]
    mask[7:10] = False  # a gap over the middle: the nearest contoured slice
    assert seed_slices(mask, 1) in ([6], [10])
    assert seed_slices(np.zeros((5, 4, 4), bool), 1) == []
    with pytest.raises(ValueError, match="count must be >= 1, got 0"):
        seed_slices(mask, 0)


def test_seed_mode_recovers_a_cylinder_and_a_blind_engine_keeps_only_the_seed():
    ct, mask = _cylinder()
    settings = PropagationSettings()
    (good,) = evaluate_case(Run("toy seed", ThresholdEngine(), "seed"), ct, {"Tube": mask}, (1, 1, 2), "c1", settings)
    assert good.dice == pytest.approx(1.0) and good.hd95_mm == pytest.approx(0.0)
    assert good.run == "toy seed" and good.structure == "Tube" and good.seconds > 0
    (blind,) = evaluate_case(Run("blind", ThresholdEngine(blind=True), "seed"), ct, {"Tube": mask}, (1, 1, 2), "c1",
                             settings)
    assert blind.dice == pytest.approx(2 * 1 / (1 + 8))  # only the seed slice of 8 comes back


def test_truebox_reuses_the_seed_runs_crops():
    ct, mask = _cylinder()
    engine, cache = ThresholdEngine(), EncodingCache()
    settings = PropagationSettings()
    evaluate_case(Run("seed", engine, "seed"), ct, {"Tube": mask}, (1, 1, 2), "c1", settings, cache=cache)
    after_seed = engine.encoded
    (upper,) = evaluate_case(Run("truebox", engine, "truebox"), ct, {"Tube": mask}, (1, 1, 2), "c1", settings,
                             cache=cache)
    assert upper.dice == pytest.approx(1.0)
    assert engine.encoded - after_seed < 8  # fewer new encodings than slices: propagation's crops were reused


def test_runs_refuse_an_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of prior, seed, truebox, got 'guess'"):
        Run("x", ThresholdEngine(), "guess")


def test_the_report_has_every_run_case_and_structure(tmp_path):
    ct, mask = _cylinder()
    for name in ("a", "b"):
        np.savez_compressed(tmp_path / f"{name}.npz", ct=ct, spacing=np.array([2.0, 1.0, 1.0]),
                            mask_BrainStem=mask.astype(np.uint8))
    engine = ThresholdEngine()
    runs = [Run("zero-shot seed", engine, "seed"), Run("blind seed", ThresholdEngine(blind=True), "seed"),
            Run("zero-shot truebox", engine, "truebox")]
    summaries = evaluate_propagation(runs, [tmp_path], tmp_path / "out", labels=HN_ORGANS)
    with open(tmp_path / "out" / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["run"], r["case"], r["structure"]) for r in rows} == {
        (run.label, case, "Brainstem") for run in runs for case in ("a", "b")}  # TG-263 name from BrainStem
    assert summaries["zero-shot seed"]["Brainstem"]["dice_mean"] == pytest.approx(1.0)
    assert summaries["blind seed"]["mean"]["dice_mean"] == pytest.approx(2 / 9)
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| Brainstem | 2 | 1.000 (0.0) | 0.222 (" in table and "zero-shot truebox: Dice (HD95 mm)" in table


def test_prior_mode_scores_a_simulated_follow_up_beside_registration_alone(tmp_path):
    """A bright block and a bright rod in soft tissue: the toy engine segments bright pixels perfectly, so
    propagation alone must match the moved mask closely; the fused result (default min_agreement 1) is the
    registration's."""
    ct = np.full((24, 64, 64), -100, np.int16)
    block = np.zeros(ct.shape, bool)
    block[6:18, 20:34, 16:28] = True
    ct[block] = 300
    ct[4:20, 44:48, 40:44] = 900  # a second, asymmetric landmark for the registration
    np.savez_compressed(tmp_path / "case.npz", ct=ct, spacing=np.array([2.0, 1.5, 1.5]),
                        mask_Larynx=block.astype(np.uint8))
    summaries = evaluate_propagation([Run("toy prior", ThresholdEngine(), "prior")], [tmp_path], tmp_path / "out",
                                     labels=HN_ORGANS)
    assert set(summaries) == {"toy prior", "toy prior: propagation alone", "toy prior: registration alone"}
    fused = summaries["toy prior"]["Larynx"]["dice_mean"]
    assert fused == summaries["toy prior: registration alone"]["Larynx"]["dice_mean"] > 0.8
    assert summaries["toy prior: propagation alone"]["Larynx"]["dice_mean"] > 0.9


def test_comparison_table_puts_runs_side_by_side():
    row = {"cases": 1, "dice_mean": 0.5, "hd95_mean_mm": 3.0}
    text = comparison_markdown({"A": {"X": row, "mean": row}, "B": {"mean": row}})
    lines = text.splitlines()
    assert lines[0] == "| structure | A: Dice (HD95 mm) | B: Dice (HD95 mm) |"
    assert lines[2] == "| X | 0.500 (3.0) | - |" and lines[3].startswith("| **mean** | **0.500 (3.0)**")


@pytest.mark.slow
def test_command_on_a_slab_of_a_real_case(tmp_path):
    """Seven slices around the larynx of OpenKBP validation patient 0 (~1 minute on a busy 2-core CPU)."""
    from typer.testing import CliRunner

    from dicom_node.cli import app
    from factories import load_openkbp

    case = load_openkbp("validation", 0)
    larynx = case.masks["Larynx"].astype(bool)
    zs = np.flatnonzero(larynx.any(axis=(1, 2)))
    z = int(zs[len(zs) // 2])
    np.savez_compressed(tmp_path / "slab.npz", ct=case.ct[z - 3:z + 4], spacing=np.asarray(case.spacing_zyx),
                        mask_Larynx=larynx[z - 3:z + 4].astype(np.uint8))
    result = CliRunner().invoke(app, ["evaluate-propagation", str(tmp_path), "--structure", "Larynx", "--limit", "1",
                                      "--threads", "1", "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "report" / "scores.csv") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"zero-shot seed", "zero-shot truebox"}
    # Measured on this slab: seed 0.55, truebox 0.55 (zero-shot LiteMedSAM); a broken chain gives ~0.25 (the seed
    # slice alone) or an empty prediction.
    assert float(rows["zero-shot seed"]["dice"]) >= 0.4 and float(rows["zero-shot truebox"]["dice"]) >= 0.4
    assert "| Larynx | 1 |" in (tmp_path / "report" / "summary.md").read_text()


@pytest.mark.parametrize("option, value, message", [
    ("--reach-fraction", "-1", "reach_fraction must be > 0 or None, got -1.0"),
    ("--long-slice-step", "-2", "long_slice_step must be >= 1 or None, got -2"),
    ("--crop-reuse", "0.5", "crop_reuse must be >= 1, got 0.5"),
])
def test_a_nonsensical_propagation_option_is_refused_before_anything_loads(tmp_path, option, value, message):
    from typer.testing import CliRunner

    from dicom_node.cli import app

    result = CliRunner().invoke(app, ["evaluate-propagation", str(tmp_path), option, value,
                                      "--out", str(tmp_path / "report")])
    assert result.exit_code == 2 and f"propagation settings: {message}" in result.output, result.output
