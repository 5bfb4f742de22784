"""SAM2 / MedSAM2 as a volume engine: Meta's ``sam2`` video predictor tracks seed contours through the slice stack.

SAM2 is built to follow an object through a video with a memory of the frames it has seen, so the slices of a
series are handed to it as frames: each seeded ROI is one object, its seed slices are mask prompts (clicks when a
slice only has clicks), and the predictor runs from the lowest seed up and from each structure's lowest seed down.
The stop criteria of :mod:`models.propagate` (vanished, collapsed, jumped, extent) end each direction, as for the
slice-by-slice engines; between two seeds the slices are tracked upward with both seeds in SAM2's memory. Whole
slices are used, as MedSAM2 does: SAM2 sees context through its memory rather than through zoomed crops.

The engine also answers the per-slice :class:`~models.prompting.PromptEngine` calls (``encode``/``decode`` of
crops through SAM2's image path, as ``SAM2ImagePredictor`` does), so the evaluation's true-box upper bound
(:func:`models.propagate.segment_slices`) runs on it too.

Weights are the user's: ``checkpoint`` is the path of a ``.pt`` file (Meta's SAM2 / SAM2.1 or MedSAM2), its model
config found as :mod:`models.sam2_checkpoint` says; nothing is downloaded. Without weights there is no engine:
quality is the checkpoint's.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from models.crops import normalise
from models.errors import EngineError, ModelInputError
from models.prompting import Prompt
from models.propagate import PropagationSettings, Seed, StructureResult, keep_connected, stop_reason
from models.sam2_checkpoint import package_dir, read_config, resolve_checkpoint

__all__ = ["Sam2Engine", "build_predictor", "ARCHITECTURE"]

log = logging.getLogger(__name__)

ARCHITECTURE = "sam2"
# What sam2's build_sam2_video_predictor sets on top of a config, except fill_hole_area: hole filling needs the
# package's CUDA extension (on CPU it warns and skips), and propagate's stop criteria already drop stray blobs.
VIDEO_OVERRIDES = {
    "_target_": "models.sam2_predictor.Sam2VolumePredictor",  # SAM2VideoPredictor adapted (see that module)
    "sam_mask_decoder_extra_args.dynamic_multimask_via_stability": True,
    "sam_mask_decoder_extra_args.dynamic_multimask_stability_delta": 0.05,
    "sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh": 0.98,
    "binarize_mask_from_pts_for_mem_enc": True,
    "fill_hole_area": 0,
}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # SAM2's frame normalisation
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# --- building the predictor ---------------------------------------------------------------------------------


def build_predictor(config: str | Path, state: Mapping[str, torch.Tensor] | None = None,
                    device: str = "cpu") -> Any:
    """A ``SAM2VideoPredictor`` from a config (a YAML path, or a name the sam2 package ships such as
    ``configs/sam2.1/sam2.1_hiera_t.yaml``) with ``state`` loaded strictly; random weights when ``state`` is None
    (tests: the code path without any checkpoint)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = Path(config)
    if not path.is_file():
        path = package_dir() / str(config)
    read_config(path)  # the checks: a 'model' mapping, sam2.* targets only
    cfg = OmegaConf.load(path)  # OmegaConf's own YAML reading: PyYAML would read 1e-6 as a string
    for key, value in VIDEO_OVERRIDES.items():
        OmegaConf.update(cfg, f"model.{key}", value, force_add=True)
    OmegaConf.resolve(cfg)
    model = instantiate(cfg.model, _recursive_=True)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise EngineError(f"sam2 weights do not fit the config {path.name}: {exc}") from exc
    return model.to(device).eval()


def _load_state(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a checkpoint
        raise EngineError(f"sam2 checkpoint {str(path)!r} cannot be read: {exc}") from exc
    state = state.get("model", state) if isinstance(state, dict) else state  # Meta's files wrap it in "model"
    if not isinstance(state, dict):
        raise EngineError(f"sam2 checkpoint {str(path)!r} holds no state dict")
    return state, f"{path.stem[:40]} sha256:{digest.hexdigest()[:12]}"


# --- the slice stack as SAM2 frames -------------------------------------------------------------------------


class _SliceFrames(Sequence[torch.Tensor]):
    """Slices made into SAM2 frames on demand (windowed, resized, normalised): a 1024^2 frame is 12 MB, so the
    stack is not materialised. The predictor reads ``frames[z]`` when it encodes slice z."""

    def __init__(self, image: np.ndarray, window: tuple[float, float], size: int):
        self.image, self.window, self.size = image, window, size

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def __getitem__(self, z: int) -> torch.Tensor:  # type: ignore[override]
        grey = cv2.resize(normalise(self.image[z], self.window), (self.size, self.size),
                          interpolation=cv2.INTER_LINEAR)
        rgb = (grey[..., None] - IMAGENET_MEAN) / IMAGENET_STD
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32))


# --- fronts over the tracked frames -------------------------------------------------------------------------


@dataclass
class _Track:
    """One structure followed in one direction: restarted at each of its seed slices, stopped by the criteria."""

    obj: int
    seeds: dict[int, np.ndarray]  # z -> seed mask (clicks already decoded)
    lo: int
    hi: int
    step: int
    mask: np.ndarray | None = None
    seed_area: float = 0.0
    origin: int = -1
    stops: list[str] = field(default_factory=list)

    def done(self, z: int) -> bool:
        ahead = [s for s in self.seeds if (s - z) * self.step > 0]
        return self.mask is None and not ahead or not self.lo <= z + self.step <= self.hi

    def visit(self, z: int, logits: np.ndarray, s: PropagationSettings, out: np.ndarray) -> None:
        if z in self.seeds:  # a running front that reaches the next seed restarts there
            self.mask, self.origin = self.seeds[z], z
            self.seed_area = float(self.mask.sum())
            out[z] |= self.mask
            return
        if self.mask is None or not self.lo <= z <= self.hi:
            return
        new = keep_connected(logits > s.threshold, self.mask)
        reason = stop_reason(new, self.mask, self.seed_area, s)
        if reason is not None:
            self._end(f"{reason} at slice {z}")
            return
        out[z] |= new
        self.mask = new
        if z == (self.hi if self.step > 0 else self.lo):
            self._end(f"reached slice {z}")

    def _end(self, why: str) -> None:
        self.stops.append(f"{'up' if self.step > 0 else 'down'} from {self.origin}: {why}")
        self.mask = None


class Sam2Engine:
    """SAM2's video predictor over a slice stack: ``propagate_volume`` is what :func:`models.propagate.propagate`
    calls for it. It is a :class:`~models.prompting.PromptEngine` too (``encode``/``decode`` on crops, the image
    path), so per-slice callers work. The predictor is injected, so tests can give a randomly initialised one."""

    name = ARCHITECTURE

    def __init__(self, predictor: Any, version: str):
        self.predictor = predictor
        self.version = version
        self.input_size = int(predictor.image_size)
        self._lock = threading.Lock()  # an inference state is per call, but the model's caches are not

    @classmethod
    def load(cls, checkpoint: str | None, device: str = "cpu") -> Sam2Engine:
        spec = resolve_checkpoint(checkpoint)
        state, version = _load_state(spec.checkpoint)
        predictor = build_predictor(spec.config, state, device)
        log.info("loaded sam2 weights %s with config %s", version, spec.config.name)
        return cls(predictor, version)

    # --- the image path (as sam2's SAM2ImagePredictor): one crop at a time, for PromptEngine callers such as the
    # evaluation's true-box upper bound (models.propagate.segment_slices) -------------------------------------

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> list[dict[str, Any]]:
        """Features of (N, S, S) crops in [0, 1]: the image embedding and the two high-resolution feature maps
        SAM2's decoder also reads, in half precision (at S = 1024 a crop's features are 8 MB instead of 16)."""
        images = np.asarray(images, dtype=np.float32)
        size = self.input_size
        if images.ndim != 3 or images.shape[1:] != (size, size):
            raise ValueError(f"encode takes (N, {size}, {size}) images, got {images.shape}")
        model = self.predictor
        x = torch.from_numpy(np.ascontiguousarray(((images[..., None] - IMAGENET_MEAN) / IMAGENET_STD)
                                                  .transpose(0, 3, 1, 2), dtype=np.float32)).to(model.device)
        _, feats, _, sizes = model._prepare_backbone_features(model.forward_image(x))
        if model.directly_add_no_mem_embed:  # what a frame without memory gets, as in SAM2ImagePredictor
            feats[-1] = feats[-1] + model.no_mem_embed
        maps = [f.permute(1, 2, 0).reshape(len(images), -1, h, w).half() for f, (h, w) in zip(feats, sizes)]
        return [{"image_embed": maps[-1][i], "high_res_feats": [m[i] for m in maps[:-1]]} for i in range(len(images))]

    @torch.inference_mode()
    def decode(self, embeddings: Sequence[Any], prompts: Sequence[Prompt]) -> np.ndarray:
        if len(embeddings) != len(prompts):
            raise ValueError(f"one embedding per prompt: {len(embeddings)} embeddings, {len(prompts)} prompts")
        return np.stack([self._decode_one(e, p) for e, p in zip(embeddings, prompts)]) if prompts else \
            np.zeros((0, self.input_size, self.input_size), np.float32)

    def _decode_one(self, embedding: dict[str, Any], prompt: Prompt) -> np.ndarray:
        model, size = self.predictor, self.input_size
        coords, labels = [], []
        if prompt.box is not None:  # SAM2 takes a box as two corner points labelled 2 and 3
            coords += [prompt.box[:2], prompt.box[2:]]
            labels += [2, 3]
        if prompt.points is not None:
            coords += [tuple(xy) for xy in np.asarray(prompt.points, np.float32)]
            labels += [int(v) for v in prompt.labels]  # type: ignore[union-attr]
        dev = model.device
        points = (torch.tensor([coords], dtype=torch.float32, device=dev),
                  torch.tensor([labels], dtype=torch.int32, device=dev))
        masks = None
        if prompt.mask_logits is not None:  # the decoder takes mask prompts at a quarter of the input size
            full = torch.as_tensor(prompt.mask_logits, dtype=torch.float32, device=dev)[None, None]
            masks = F.interpolate(full, size=(size // 4, size // 4), mode="bilinear", align_corners=False)
        sparse, dense = model.sam_prompt_encoder(points=points, boxes=None, masks=masks)
        low, _, _, _ = model.sam_mask_decoder(
            image_embeddings=embedding["image_embed"].float()[None], image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            repeat_image=False, high_res_features=[f.float()[None] for f in embedding["high_res_feats"]])
        logits = F.interpolate(low.float(), size=(size, size), mode="bilinear", align_corners=False)
        return logits[0, 0].cpu().numpy()

    # --- the video path ---------------------------------------------------------------------------------------

    def propagate_volume(self, image: np.ndarray, seeds: Mapping[str, Seed],
                         settings: PropagationSettings | None = None) -> dict[str, StructureResult]:
        """Every structure's seeds tracked through ``image`` (Z, Y, X, HU); seed slices come back as given."""
        s = settings or PropagationSettings()
        if image.ndim != 3:
            raise ModelInputError(f"image must be 3-D (Z, Y, X), got shape {image.shape}")
        depth = image.shape[0]
        results = {key: StructureResult(mask=np.zeros(image.shape, bool)) for key in seeds}
        for key, seed in seeds.items():
            for z, m in seed.masks.items():
                if m.shape != image.shape[1:]:
                    raise ModelInputError(f"seed {key!r} slice {z}: mask shape {m.shape}, "
                                          f"slices are {image.shape[1:]}")
                if not 0 <= z < depth:
                    raise ModelInputError(f"seed {key!r}: slice {z} is outside the volume (0..{depth - 1})")
                results[key].mask[z] |= m.astype(bool)
        with self._lock, torch.inference_mode():
            state = self.predictor.init_volume_state(_SliceFrames(image, s.window, self.input_size),
                                                     image.shape[1], image.shape[2])
            notes: dict[str, list[str]] = {}
            starts = self._prompt(state, seeds, s, notes)
            for key, lines in notes.items():
                results[key].stops.extend(lines)
            if not starts:
                return results
            for step in (+1, -1):
                tracks = [_Track(obj, masks, *_bounds(seeds[key], depth), step)
                          for key, (obj, masks) in starts.items()]
                self._run(state, tracks, step, s, [results[key].mask for key in starts])
                for key, track in zip(starts, tracks):
                    results[key].stops.extend(track.stops)
        return results

    def _prompt(self, state: dict[str, Any], seeds: Mapping[str, Seed], s: PropagationSettings,
                notes: dict[str, list[str]]) -> dict[str, tuple[int, dict[int, np.ndarray]]]:
        """Seed masks as mask prompts; slices with clicks only as point prompts, decoded into seed masks."""
        starts: dict[str, tuple[int, dict[int, np.ndarray]]] = {}
        obj = -1
        for key, seed in seeds.items():
            masks = {z: m.astype(bool) for z, m in seed.masks.items() if m.any()}
            clicks = {z: np.asarray(p, int).reshape(-1, 2) for z, p in seed.points.items()
                      if len(p) and z not in masks}  # a slice with a contour needs no click
            if not masks and not clicks:
                continue
            obj += 1
            for z, m in masks.items():
                self.predictor.add_new_mask(state, frame_idx=z, obj_id=obj, mask=m)
            for z, yx in clicks.items():
                _, ids, logits = self.predictor.add_new_points_or_box(
                    state, frame_idx=z, obj_id=obj, points=yx[:, ::-1].astype(np.float32),
                    labels=np.ones(len(yx), np.int32))
                found = logits[list(ids).index(obj), 0].cpu().numpy() > s.threshold
                clicked = np.zeros_like(found)
                clicked[tuple(yx.T)] = True
                found = keep_connected(found, clicked)
                if found.any():
                    masks[z] = found
                else:
                    notes.setdefault(key, []).append(f"clicks on slice {z} gave no mask")
            if masks:
                starts[key] = (obj, masks)
        return starts

    def _run(self, state: dict[str, Any], tracks: list[_Track], step: int, s: PropagationSettings,
             outs: list[np.ndarray]) -> None:
        # Up from the lowest seed of all; down from the highest of the structures' lowest seeds.
        firsts = [min(t.seeds) for t in tracks]
        start = min(firsts) if step > 0 else max(firsts)
        end = max(t.hi for t in tracks) if step > 0 else min(t.lo for t in tracks)
        if (end - start) * step <= 0:
            return
        frames = self.predictor.propagate_in_video(state, start_frame_idx=start,
                                                   max_frame_num_to_track=abs(end - start), reverse=step < 0)
        for z, _, logits in frames:
            scores = logits[:, 0].float().cpu().numpy()
            for obj_track, out in zip(tracks, outs):
                if step < 0 and z > min(obj_track.seeds):
                    continue  # above its lowest seed this structure was tracked on the way up
                obj_track.visit(z, scores[obj_track.obj], s, out)
            if all(t.done(z) for t in tracks):
                break
        frames.close()


def _bounds(seed: Seed, depth: int) -> tuple[int, int]:
    lo, hi = seed.extent if seed.extent is not None else (0, depth - 1)
    return max(lo, 0), min(hi, depth - 1)
