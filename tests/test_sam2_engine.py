"""The sam2 engine (SAM2's video predictor over the slice stack) on real OpenKBP CT, with a small randomly
initialised SAM2.1 tiny built from the sam2 package's own config: the code path, checkpoint loading, rules-time
checks and failures. No SAM2 weights exist here, so nothing in this file says anything about segmentation quality.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("sam2", reason="the optional sam2 extra is not installed (pip install -e '.[sam2]')")

import torch  # noqa: E402

from factories import ct_series, load_openkbp  # noqa: E402
from models.errors import EngineError  # noqa: E402
from models.prompting import Prompt, PromptEngine, VolumePropagator, load_engine  # noqa: E402
from models.propagate import PropagationSettings, Seed, propagate, segment_slices  # noqa: E402
from models.sam2_checkpoint import package_dir  # noqa: E402
from models.sam2_engine import Sam2Engine, _SliceFrames, build_predictor  # noqa: E402
from models.types import RoiType, Structure, StructureSet  # noqa: E402
from pipeline.base import PipelineInput, load_pipeline, validate_params  # noqa: E402
from pipeline.errors import PipelineParamsError  # noqa: E402
from pipeline.rtstruct import build_rtstruct  # noqa: E402
from pipeline.volume import load_volume  # noqa: E402

TINY = "configs/sam2.1/sam2.1_hiera_t.yaml"
SIZE = 256  # the tiny config at 256^2 instead of 1024^2: ~16x less encoder work on this CPU
# Stop criteria that never fire: a random model's masks are noise, and these tests follow every slice.
FOLLOW_ALL = PropagationSettings(min_area_fraction=0.0, max_growth=1e9, min_overlap=0.0, min_pixels=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; the numbers in README are per thread
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised (seeded) SAM2.1 tiny saved as Meta's checkpoints are ({"model": state}), with its
    config beside it: the package's tiny config at 256^2."""
    folder = tmp_path_factory.mktemp("sam2")
    config = (package_dir() / TINY).read_text().replace("image_size: 1024", f"image_size: {SIZE}")
    assert f"image_size: {SIZE}" in config
    (folder / "tiny256.yaml").write_text(config)
    torch.manual_seed(0)
    predictor = build_predictor(folder / "tiny256.yaml")
    torch.save({"model": predictor.state_dict()}, folder / "tiny256.pt")
    return folder / "tiny256.pt"


@pytest.fixture(scope="module")
def slab():
    """Nine real CT slices through the brainstem of an OpenKBP validation patient, and its mask there."""
    case = load_openkbp("validation", 0)
    truth = case.masks["Brainstem"].astype(bool)
    zs = np.flatnonzero(truth.reshape(truth.shape[0], -1).any(axis=1))
    mid = int(zs[len(zs) // 2])
    return case.ct[mid - 4:mid + 5].astype(np.float32), truth[mid - 4:mid + 5], case.spacing_zyx


def test_tracks_a_real_ct_slab_from_one_seed_slice(tiny_checkpoint, slab):
    image, truth, _ = slab
    engine = load_engine("sam2", str(tiny_checkpoint))
    assert isinstance(engine, Sam2Engine) and isinstance(engine, VolumePropagator)
    assert engine.input_size == SIZE and engine.version.startswith("tiny256 sha256:")
    seeds = {"Brainstem": Seed(masks={4: truth[4]})}
    first = propagate(engine, image, seeds, FOLLOW_ALL)  # through models.propagate's hook
    result = first["Brainstem"]
    assert result.mask.shape == image.shape and result.mask.dtype == bool
    assert np.array_equal(result.mask[4], truth[4])  # the seed slice exactly as drawn
    assert result.stops == ["up from 4: reached slice 8", "down from 4: reached slice 0"]
    again = propagate(engine, image, seeds, FOLLOW_ALL)["Brainstem"]  # a fresh inference state each call
    assert np.array_equal(again.mask, result.mask)


def test_weights_loaded_from_the_checkpoint_are_the_saved_ones(tiny_checkpoint, slab):
    image, truth, _ = slab
    torch.manual_seed(0)
    rebuilt = Sam2Engine(build_predictor(tiny_checkpoint.with_suffix(".yaml")), "same seed")
    torch.manual_seed(1)
    other = Sam2Engine(build_predictor(tiny_checkpoint.with_suffix(".yaml")), "other seed")
    loaded = load_engine("sam2", str(tiny_checkpoint))
    seeds = {"Brainstem": Seed(masks={4: truth[4]}, extent=(3, 5))}
    masks = [e.propagate_volume(image[:6], seeds, FOLLOW_ALL)["Brainstem"].mask for e in (loaded, rebuilt, other)]
    assert np.array_equal(masks[0], masks[1])  # deterministic: same seed, same weights, same masks
    sd_loaded, sd_other = loaded.predictor.state_dict(), other.predictor.state_dict()
    assert any(not torch.equal(sd_loaded[k], sd_other[k]) for k in sd_loaded)


def test_two_structures_several_seeds_clicks_and_an_extent(tiny_checkpoint, slab):
    image, truth, _ = slab
    engine = load_engine("sam2", str(tiny_checkpoint))
    click = np.argwhere(truth[3])[:1]  # (y, x) inside the brainstem
    seeds = {
        "A": Seed(masks={2: truth[2], 6: truth[6]}, extent=(1, 7)),
        "B": Seed(masks={}, points={3: click}),
        "Empty": Seed(masks={5: np.zeros_like(truth[5])}),
    }
    results = engine.propagate_volume(image, seeds, FOLLOW_ALL)
    a, b = results["A"], results["B"]
    assert np.array_equal(a.mask[2], truth[2]) and np.array_equal(a.mask[6], truth[6])
    assert not a.mask[0].any() and not a.mask[8].any()  # outside the extent
    assert a.stops == ["up from 6: reached slice 7", "down from 2: reached slice 1"]
    if b.mask[3].any():  # the random decoder may or may not put a mask under the click
        assert b.mask[3][tuple(click[0])]
        assert b.stops == ["up from 3: reached slice 8", "down from 3: reached slice 0"]
    else:
        assert b.stops == ["clicks on slice 3 gave no mask"] and not b.mask.any()
    assert not results["Empty"].mask.any() and results["Empty"].stops == []


def test_the_image_path_encodes_crops_and_decodes_box_point_and_mask_prompts(tiny_checkpoint, slab):
    image, truth, _ = slab
    engine = load_engine("sam2", str(tiny_checkpoint))
    assert isinstance(engine, PromptEngine)
    crops = np.clip((image[3:5, :SIZE // 2, :SIZE // 2].repeat(2, 1).repeat(2, 2) + 160) / 400, 0, 1)
    embeddings = engine.encode(crops)
    assert len(embeddings) == 2 and embeddings[0]["image_embed"].shape == (256, SIZE // 16, SIZE // 16)
    prompts = [Prompt(box=(40.0, 50.0, 120.0, 130.0)),
               Prompt(points=np.array([[80.0, 90.0]]), labels=np.array([1])),
               Prompt(box=(40.0, 50.0, 120.0, 130.0), mask_logits=np.full((SIZE, SIZE), -8.0, np.float32))]
    logits = engine.decode([embeddings[0], embeddings[1], embeddings[0]], prompts)
    assert logits.shape == (3, SIZE, SIZE) and logits.dtype == np.float32 and np.isfinite(logits).all()
    assert not np.array_equal(logits[0], logits[2])  # the mask prompt reaches the decoder
    assert np.array_equal(logits, engine.decode([embeddings[0], embeddings[1], embeddings[0]], prompts))
    with pytest.raises(ValueError, match=f"encode takes \\(N, {SIZE}, {SIZE}\\) images"):
        engine.encode(crops[:, :10])
    upper = segment_slices(engine, image[3:6], truth[3:6])  # the evaluation's true-box bound, one crop per slice
    assert upper.shape == truth[3:6].shape and upper.dtype == bool


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # sam2's image transforms
def test_the_image_path_gives_what_sam2s_image_predictor_gives(tiny_checkpoint):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    engine = load_engine("sam2", str(tiny_checkpoint))
    crop = np.random.default_rng(0).random((SIZE, SIZE), dtype=np.float32)
    box, click = (40.0, 50.0, 120.0, 130.0), np.array([[80.0, 90.0]])
    ours = engine.decode(engine.encode(crop[None]), [Prompt(box=box, points=click, labels=np.array([1]))])[0]
    reference = SAM2ImagePredictor(engine.predictor)
    reference._bb_feat_sizes = [(SIZE // 4,) * 2, (SIZE // 8,) * 2, (SIZE // 16,) * 2]  # it assumes 1024^2 inputs
    reference.set_image(np.repeat(crop[..., None], 3, axis=2))
    theirs, _, _ = reference.predict(point_coords=click, point_labels=np.array([1]), box=np.array(box),
                                     multimask_output=False, return_logits=True)
    assert np.abs(ours - theirs[0]).max() < 1e-3 * max(1.0, np.abs(theirs).max())  # our features are kept in fp16


def test_inference_state_has_the_layout_sam2_builds(tmp_path, tiny_checkpoint, slab):
    """Our in-memory state mirrors SAM2VideoPredictor.init_state, which reads only JPEG folders and MP4s."""
    from PIL import Image

    image = slab[0][:2]
    for z, s in enumerate(image):
        Image.fromarray(np.uint8(np.clip((s + 160) / 400, 0, 1) * 255)).convert("RGB").save(tmp_path / f"{z}.jpg")
    predictor = load_engine("sam2", str(tiny_checkpoint)).predictor
    theirs = predictor.init_state(str(tmp_path))
    ours = predictor.init_volume_state(_SliceFrames(image, (-160.0, 240.0), SIZE), *image.shape[1:])
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        if key not in ("images", "cached_features"):  # frames (ours on demand) and init_state's warm-up encoding
            assert type(ours[key]) is type(theirs[key]) and ours[key] == theirs[key], key
    assert ours["images"][0].shape == theirs["images"][0].shape == (3, SIZE, SIZE)


def test_a_missing_checkpoint_is_an_engine_error_naming_it(tmp_path):
    missing = tmp_path / "gone" / "MedSAM2_latest.pt"
    with pytest.raises(EngineError, match=f"sam2 checkpoint '{missing}' does not exist"):
        load_engine("sam2", str(missing))
    with pytest.raises(EngineError, match="no default weights"):
        load_engine("sam2", None)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint.with_suffix(".yaml"), tmp_path / "odd.yaml")
    torch.save({"model": {"not_a_sam2_key": torch.zeros(1)}}, tmp_path / "odd.pt")
    with pytest.raises(EngineError, match="sam2 weights do not fit the config odd.yaml"):
        load_engine("sam2", str(tmp_path / "odd.pt"))


@pytest.mark.parametrize("name, config, message", [
    ("MedSAM2_latest.pt", None, "no model config; put the model's YAML config beside it as 'MedSAM2_latest.yaml'"),
    ("mine.pt", "model: {_target_: os.system}", r"only sam2.\* classes may be instantiated, got \['os.system'\]"),
    ("mine.pt", "model: {image_encoder: {_target_: builtins.eval}}", r"got \['builtins.eval'\]"),
    ("mine.pt", "trunk: 1", "has no 'model' mapping"),
])
def test_rules_check_refuses_a_checkpoint_without_a_usable_config(tmp_path, name, config, message):
    (tmp_path / name).write_bytes(b"")
    if config is not None:
        (tmp_path / name).with_suffix(".yaml").write_text(config)
    with pytest.raises(PipelineParamsError, match=message):
        validate_params(load_pipeline("propagate"), {"engine": "sam2", "checkpoint": str(tmp_path / name)})


def test_rules_check_refuses_sam2_without_an_existing_checkpoint(tmp_path):
    pipeline = load_pipeline("propagate")
    missing = tmp_path / "sam2.1_hiera_tiny.pt"
    with pytest.raises(PipelineParamsError, match=f"checkpoint: .*sam2 checkpoint '{missing}' does not exist"):
        validate_params(pipeline, {"engine": "sam2", "checkpoint": str(missing)})
    with pytest.raises(PipelineParamsError, match="checkpoint: .*the sam2 engine has no default weights"):
        validate_params(pipeline, {"engine": "sam2"})
    missing.write_bytes(b"")  # Meta's file name: the config the sam2 package ships is used; weights load later
    assert validate_params(pipeline, {"engine": "sam2", "checkpoint": str(missing)}).checkpoint == str(missing)


def _seeded_input(slab, params):
    image, truth, spacing = slab
    datasets = ct_series(image.astype(np.int16), spacing)
    mask = np.zeros_like(truth)
    mask[4] = truth[4]
    seed = build_rtstruct(datasets, StructureSet((Structure("GTVp", mask, roi_type=RoiType.GTV, color=(1, 2, 3)),)))
    return PipelineInput(volume=load_volume(datasets), datasets=tuple(datasets), params=params,
                         structure_sets=(seed,))


def test_propagate_pipeline_runs_the_sam2_engine(tiny_checkpoint, slab):
    pipeline = load_pipeline("propagate")
    params = validate_params(pipeline, {"engine": "sam2", "checkpoint": str(tiny_checkpoint)})
    result = pipeline.run(_seeded_input(slab, params))
    (gtv,) = result.structures
    assert gtv.name == "GTVp" and gtv.algorithm == "sam2" and gtv.algorithm_version.startswith("tiny256 sha256:")
    assert gtv.mask.shape == slab[0].shape and gtv.mask[4].any()
    assert "up from 4:" in result.notes["GTVp"] and "down from 4:" in result.notes["GTVp"]


def test_a_checkpoint_gone_at_job_time_fails_the_job_naming_it(tmp_path, slab):
    pipeline = load_pipeline("propagate")
    checkpoint = tmp_path / "sam2.1_hiera_tiny.pt"
    checkpoint.write_bytes(b"")
    params = validate_params(pipeline, {"engine": "sam2", "checkpoint": str(checkpoint)})
    checkpoint.unlink()  # after the rules loaded, before the job ran
    with pytest.raises(EngineError, match=f"sam2 checkpoint '{checkpoint}' does not exist"):
        pipeline.run(_seeded_input(slab, params))
