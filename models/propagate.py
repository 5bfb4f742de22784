"""Slice-by-slice propagation of seed contours with a promptable engine (pure functions over arrays).

From each seeded slice outward, the next slice is prompted from the current mask: its bounding box, an interior
click (several when the box describes the shape badly, e.g. a horseshoe mandible) and optionally the mask itself.
The box of a long structure (learned reach >= ``follow_anatomy``) is first moved by the anatomy's motion between
the two slices (:func:`anatomy_shift`): the decoder follows its box more than the image, so a cord front prompted
with the last mask's box lagged behind the spine's curve and left the canal within ten slices.
Every decode works on a **zoomed crop**: a square of ``crop_factor`` x the box (at least ``min_crop`` native
pixels) resized to the engine's input. Head-and-neck organs at ~4 mm are a few dozen pixels across and vanish in a
whole-slice view; the issue measured true-box Dice 0.52 whole-slice against 0.59 on such crops.

A front stops when the mask vanishes, collapses (area below ``min_area_fraction`` of its seed's), jumps (grows
from one slice to the next more than ``max_growth`` x, or than the package learned the structure grows where that
is more, :func:`growth_for`; or no longer overlaps the previous slice), or reaches the
extent bound (prior mode) or, beyond the outermost seeds, its *reach* (:func:`reach`: ``max_travel`` x the seed's
equivalent diameter; for a structure the engine's package learned, ``reach_fraction`` x its learned reach instead,
:func:`travel_for`: a spinal cord runs ~7.5 seed diameters each way from its middle, a larynx ~0.5; a package that
saw enough cases learned a :class:`ReachLaw`, the half-length in mm as a power of the seed's diameter). The reach is a
size prior, and it is needed: past an organ's end SAM keeps segmenting something of the same size in the previous
slice's box (OpenKBP train patients 95-97: areas within ~20 % and no drop in the logits for 10 slices past the
end), so without it fronts ran on to the volume's end (fine-tuned seed-mode Dice on those patients: 0.23
unbounded, 0.54 with ``max_travel`` 1.0, 0.52-0.45 for 0.6 and 1.2-2.0; bench/propagate_reach.py). Where a
package learned that a structure ends beside another (:class:`Abutment`: a spinal cord ends below the brainstem)
and both are seeded, that end comes from the neighbour's extent instead (:func:`abut`). Between two seeds each
slice is propagated from the nearer one, so seeds constrain each other. With ``refine``, a structure whose seed
fills its box badly (a horseshoe mandible) has each new slice decoded twice: first with the neighbour's box, then
with the box of that first mask, on the same crop (off by default: it helped on train patients, not on
validation). Fronts decode every
``slice_step``-th slice (long structures every ``long_slice_step``-th) and interpolate the slices between: the
encoder is nearly all of the time. Crops of all structures and directions are encoded in batches, and encodings
are cached by (slice, window), so seeds and evaluations that visit the same crop pay once.

Arrays are (Z, Y, X) as in :class:`models.types.Volume`; boxes are (x0, y0, x1, y1) inclusive pixel indices.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi

from models.crops import (OUTSIDE, CropWindow, box_fill, box_of, box_to_input, crop_image, crop_window,
                          interior_points, logits_to_native, normalise, points_to_input, reusable_window)
from models.errors import ModelInputError
from models.extent import Abutment, ReachLaw, reach
from models.prompting import Prompt, PromptEngine, VolumePropagator

__all__ = [
    "PropagationSettings", "Seed", "StructureResult", "Decode", "EncodingCache", "propagate", "segment_slices",
    "anatomy_shift", "stop_reason", "keep_connected", "abut", "abutments_for", "travel_for", "growth_for",
    "follows_anatomy", "within_reach", "plan_fronts", "region_from_clicks", "interpolate_masks", "neighbour_prompt",
    "FOLLOW_ANATOMY", "REACH_FRACTION",
]

log = logging.getLogger(__name__)
FOLLOW_ANATOMY = 2.0  # learned reach (seed diameters) from which a front follows the anatomy; chosen on OpenKBP
# train patients 95-97 (bench/propagate_reach.py --follow-anatomy): it gave the cord 0.24 -> 0.54 and the esophagus
# 0.34 -> 0.41, and cost the compact organs (reach <= 1.2: brainstem, parotids, larynx, mandible) 0.03-0.07
REACH_FRACTION = 1.0  # of a structure's learned reach; chosen on OpenKBP train patients (bench/propagate_reach.py)


@dataclass(frozen=True)
class PropagationSettings:
    """Knobs of propagation; the defaults were chosen on OpenKBP *train* patients (bench/propagate.py)."""

    crop_factor: float = 2.0  # crop side / longer box side
    min_crop: int = 24  # native pixels
    window: tuple[float, float] = (-160.0, 240.0)  # HU mapped to [0, 1] (soft-tissue W400 L40)
    threshold: float = 0.0  # logit
    box_margin: int = 1  # native pixels added around the neighbour's box: a tight box makes masks shrink
    min_area_fraction: float = 0.1  # stop below this fraction of the seed's area
    max_growth: float = 2.0  # stop when the area grows more than this from one slice to the next
    use_learned_growth: bool = True  # with an engine that learned how much its structures grow from one slice to
    # the next (a fine-tuned package's ``growth``), a known structure stops only beyond the larger of that and
    # max_growth: a horseshoe mandible's area doubles where the rami meet the body (a quarter of OpenKBP's train
    # mandibles), and a decoder that drew it stopped there (growth_for)
    max_travel: float | None = 1.0  # outward fronts go at most this x the seed's equivalent diameter (see reach)
    reach_fraction: float | None = REACH_FRACTION  # with an engine that learned its structures' reach (a fine-
    # tuned package): a known structure's front goes this x its learned reach instead of max_travel; None: never
    min_overlap: float = 0.3  # stop when overlap with the previous slice / the smaller area falls below
    min_pixels: int = 2
    points: bool = False  # interior clicks besides the box (measured: they hurt LiteMedSAM on compact organs)
    poor_only: bool = True  # with points: click only when the mask fills its box badly (fill < poor_fill)
    max_points: int = 3  # clicks when the mask fills its box badly (fill < poor_fill)
    poor_fill: float = 0.45
    mask_prompt: bool | None = None  # also give the neighbour's logits as a mask prompt; None: when the engine
    # was trained with them (a package's ``mask_prompt``), as zero-shot LiteMedSAM was not
    follow_anatomy: float | None = FOLLOW_ANATOMY  # structures whose learned reach is at least this (long, tube-like
    # ones) have the neighbour's box shifted by the image's motion between the slices (anatomy_shift); 0: every
    # structure; None: none
    batch: int = 8  # crops encoded per engine call
    # Speed: encoding a crop costs ~1 s on a 2-core CPU and is 85 % of a case's time, so fronts decode every
    # slice_step-th slice and interpolate between (a failed jump retries one slice, so fronts end where they would
    # have); long structures take longer steps. Chosen on OpenKBP train patients 95-97 (bench/propagate.py
    # --split train --patients 165 166 167 --checkpoint hn-litemedsam, 1.0.0): every slice 0.610 mean Dice in 197 s per
    # case; steps 2/6 0.620 in 84 s; 3/6 0.619 in 67 s; 4/8 0.613 in 57 s; 3/9 0.591 (cord and esophagus lost).
    slice_step: int = 4
    long_slice_step: int | None = 4  # the slice_step of long structures (those that follow the anatomy, e.g. a
    # spinal cord of 80 slices); None: slice_step. A multiple of slice_step keeps all fronts on one grid of slices.
    # 8 until 1.3.0: with 1.3.0 on OpenKBP train patients 47, 130 and five more (sorted indices 120 30 10 50 70 100
    # 140) 4 took the cord from 0.605 to 0.694 and the esophagus (two) from 0.547 to 0.613; validation: README
    crop_reuse: float = 1.5  # decode on a crop already encoded on that slice (another structure's) when it holds
    # the box and its side is within this factor of the ideal crop's; 1: never (2.5 cost the parotids 0.1)
    abut: bool = True  # structures a package learned to end beside another (Abutment) end where its extent says
    refine: int = 0  # fronts from a seed that fills its box badly (fill < poor_fill: a horseshoe mandible) decode
    # each new slice again this many times, prompted with that mask's own box (same crop: decodes only). 1.3.0 on
    # OpenKBP train patients 47, 130 and five more (as long_slice_step), every new slice refined: 0.730 -> 0.742
    # (mandible 0.696 -> 0.786, n = 3; cord +0.006, the others within 0.005; 2: 0.743) but 4-14 s more per
    # validation case; gated by the new slice's own fill the mandible kept only 0.729, so the seed decides. On the
    # 33 validation patients (1.4.0) the mandible went 0.708 -> 0.704 and two cases took over 60 s: off by default
    snap: int = 2  # crop origin and side snapped to this many pixels so nearby visits share a cached encoding

    def __post_init__(self) -> None:
        if self.crop_factor < 1:
            raise ValueError(f"crop_factor must be >= 1, got {self.crop_factor}")
        if not 0 <= self.min_area_fraction < 1:
            raise ValueError(f"min_area_fraction must be >= 0 and < 1, got {self.min_area_fraction}")
        if self.max_growth <= 1:
            raise ValueError(f"max_growth must be > 1, got {self.max_growth}")
        if self.max_travel is not None and self.max_travel <= 0:
            raise ValueError(f"max_travel must be > 0 or None, got {self.max_travel}")
        if self.reach_fraction is not None and self.reach_fraction <= 0:
            raise ValueError(f"reach_fraction must be > 0 or None, got {self.reach_fraction}")
        if self.follow_anatomy is not None and self.follow_anatomy < 0:
            raise ValueError(f"follow_anatomy must be >= 0 or None, got {self.follow_anatomy}")
        if self.crop_reuse < 1:
            raise ValueError(f"crop_reuse must be >= 1, got {self.crop_reuse}")
        if self.refine < 0:
            raise ValueError(f"refine must be >= 0, got {self.refine}")
        if self.slice_step < 1:
            raise ValueError(f"slice_step must be >= 1, got {self.slice_step}")
        if self.long_slice_step is not None and self.long_slice_step < 1:
            raise ValueError(f"long_slice_step must be >= 1 or None, got {self.long_slice_step}")
        if self.window[1] <= self.window[0]:
            raise ValueError(f"window must be (lower, upper) with upper > lower, got {self.window}")


# --- prompts and stop criteria ------------------------------------------------------------------------------


def keep_connected(mask: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """The components of ``mask`` that touch ``previous`` (dilated by one pixel): stray blobs are dropped."""
    labels, n = ndi.label(mask)
    if n == 0:
        return mask
    touching = np.unique(labels[ndi.binary_dilation(previous) & mask])
    touching = touching[touching > 0]
    return np.isin(labels, touching)


def anatomy_shift(image: np.ndarray, z_from: int, z_to: int, window: CropWindow,
                  hu_window: tuple[float, float] = (-160.0, 240.0)) -> tuple[float, float]:
    """(dx, dy) native pixels the anatomy in ``window`` moves from slice ``z_from`` to ``z_to`` (phase correlation
    of the two crops, sub-pixel). A spinal cord follows the spine's curve a third of a pixel per slice; a front
    prompted only with the previous mask's box lags behind it and leaves the canal within ten slices."""
    a = crop_image(normalise(image[z_from], hu_window), window, window.side).astype(np.float64)
    b = crop_image(normalise(image[z_to], hu_window), window, window.side).astype(np.float64)
    (dx, dy), response = cv2.phaseCorrelate(a, b, cv2.createHanningWindow((window.side, window.side), cv2.CV_64F))
    limit = window.side / 4  # a larger "motion" is a mismatch, not anatomy
    if response < 0.1 or abs(dx) > limit or abs(dy) > limit:
        return 0.0, 0.0
    return float(dx), float(dy)


def stop_reason(new: np.ndarray, previous: np.ndarray, seed_area: float, s: PropagationSettings,
                max_growth: float | None = None) -> str | None:
    """Why a front should stop at ``new`` (vanished, collapsed, jumped), or None to go on. ``max_growth``: the
    structure's own limit (:func:`growth_for`) instead of the settings'."""
    area, prev_area = int(new.sum()), int(previous.sum())
    if area < s.min_pixels:
        return "vanished"
    if area < s.min_area_fraction * seed_area:
        return "collapsed"
    if area > (max_growth or s.max_growth) * max(prev_area, 4):
        return "jumped: area grew %.1fx" % (area / max(prev_area, 1))
    if (new & previous).sum() < s.min_overlap * min(area, prev_area):
        return "jumped: left the previous slice's mask"
    return None


# --- fronts -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    """One structure's prompts: seed masks by slice, optional positive clicks by slice, an optional z extent."""

    masks: Mapping[int, np.ndarray]  # z -> bool (Y, X)
    points: Mapping[int, np.ndarray] = field(default_factory=dict)  # z -> (K, 2) (y, x) clicks
    extent: tuple[int, int] | None = None  # inclusive z bounds fronts may not pass (prior mode)


@dataclass(frozen=True)
class Decode:
    """One decode of a front, as :func:`propagate` ran it (for ``on_decode``: e.g. on-policy training items)."""

    key: str
    z: int  # the slice decoded
    window: CropWindow
    embedding: Any  # the engine's encoding of that crop
    prompt: Prompt
    logits: np.ndarray  # (size, size) decoder output on the crop
    neighbour_logits: np.ndarray | None = None  # (size, size) the front's last logits on this crop, moved with the
    # anatomy: the mask prompt it offers, given to the decoder only with mask_prompt (on-policy training records it)


@dataclass
class StructureResult:
    mask: np.ndarray  # bool (Z, Y, X)
    stops: list[str] = field(default_factory=list)  # why each front ended, for the job record


@dataclass
class _Front:
    key: str
    start: int
    step: int  # +1 or -1
    last: int  # last slice this front may write (inclusive)
    seed_area: float
    mask: np.ndarray
    logits: np.ndarray  # native logits of ``mask``
    stride: int = 1  # slices per decode (slice_step, or long_slice_step for a long structure)
    refine: bool = False  # decode each new slice again with its own mask's box (a seed that fills its box badly)
    max_growth: float | None = None  # the structure's growth limit (growth_for); None: the settings'
    z: int = 0
    stop: str | None = None

    def __post_init__(self) -> None:
        self.z = self.start


def _seed_logits(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, 8.0, -8.0).astype(np.float32)


def growth_for(name: str, engine: object, settings: PropagationSettings) -> float:
    """The growth from one slice to the next that stops structure ``name``'s fronts: the larger of ``max_growth``
    and what the engine learned of it (``structure_growth``, by lower-cased name) when ``use_learned_growth``. Only
    ever looser than max_growth: a structure that grows less keeps the leak guard it had."""
    learned = (getattr(engine, "structure_growth", None) or {}).get(name.lower()) if settings.use_learned_growth \
        else None
    return settings.max_growth if learned is None else max(settings.max_growth, learned)


def abut(seeds: Mapping[str, Seed], abutments: Mapping[str, Abutment], slice_mm: float,
         depth: int) -> dict[str, Seed]:
    """``seeds`` (their extents set by :func:`within_reach`) with each structure that has an abutment (both keyed by
    seed key) to another seeded structure ending where that one's extent says: its end facing the other moves to the
    other's facing end less the gap. A structure seeded on one slice takes the same half-length on its other side,
    as reach laws assume the seed is the middle. An end that would cut into the structure's own seeds is left alone
    (the seeds disagree with the convention)."""
    out = dict(seeds)
    for key, rule in abutments.items():
        seed, other = seeds.get(key), seeds.get(rule.other)
        if seed is None or other is None or seed.extent is None or other.extent is None:
            continue
        zs = sorted(z for z, m in seed.masks.items() if m.any())
        zo = sorted(z for z, m in other.masks.items() if m.any())
        if not zs or not zo:
            continue
        gap = int(round(rule.gap_mm / slice_mm))
        lo, hi = seed.extent
        if np.mean(zo) > np.mean(zs):
            hi = other.extent[0] - gap
            if len(zs) == 1:
                lo = zs[0] - (hi - zs[0])
        else:
            lo = other.extent[1] + gap
            if len(zs) == 1:
                hi = zs[0] + (zs[0] - lo)
        if lo > zs[0] or hi < zs[-1]:
            continue
        out[key] = Seed(masks=seed.masks, points=seed.points, extent=(max(lo, 0), min(hi, depth - 1)))
    return out


def abutments_for(keys: Sequence[str], engine: object) -> dict[str, Abutment]:
    """The engine's learned abutments (``structure_abutment``, by lower-cased name; ``other`` a structure's first
    name, to which ``structure_names`` maps its other names) among the structures ``keys``, keyed and pointing by
    key: a seed named 'Spinal_Cord' finds its rule and its 'BrainStem' as the package's 'Brainstem'."""
    learned = getattr(engine, "structure_abutment", None) or {}
    names = getattr(engine, "structure_names", None) or {}
    by_name = {names.get(key.lower(), key.lower()): key for key in keys}
    return {key: Abutment(by_name[rule.other], rule.gap_mm) for key in keys
            if (rule := learned.get(key.lower())) is not None and rule.other in by_name}


def travel_for(name: str, engine: object, settings: PropagationSettings) -> float | ReachLaw | None:
    """The ``max_travel`` of structure ``name``: ``reach_fraction`` x what the engine learned of it (by lower-cased
    name: its ``structure_reach_law``, else its median ``structure_reach``), else the settings' ``max_travel``."""
    if settings.reach_fraction is None or settings.max_travel is None:
        return settings.max_travel
    law = (getattr(engine, "structure_reach_law", None) or {}).get(name.lower())
    if law is not None:
        return law.scaled(settings.reach_fraction)
    r = (getattr(engine, "structure_reach", None) or {}).get(name.lower())
    return settings.max_travel if r is None else settings.reach_fraction * r


def follows_anatomy(name: str, engine: object, settings: PropagationSettings) -> bool:
    """Whether structure ``name``'s fronts shift their boxes by the anatomy's motion: ``follow_anatomy`` 0 means
    every structure, otherwise those the engine learned to reach at least that far (long, tube-like ones; compact
    organs change shape between slices rather than move)."""
    if settings.follow_anatomy is None:
        return False
    if settings.follow_anatomy == 0:
        return True
    learned = (getattr(engine, "structure_reach", None) or {}).get(name.lower())
    return learned is not None and learned >= settings.follow_anatomy


def within_reach(seed: Seed, depth: int, spacing_xyz: Sequence[float] | None,
                 max_travel: float | ReachLaw | None) -> Seed:
    """``seed`` with an extent ending :func:`reach` slices beyond its outermost seed slices, unless it has an extent
    already (prior mode: the better bound) or ``max_travel`` is None. Spacing None means isotropic voxels."""
    zs = sorted(z for z, m in seed.masks.items() if m.any())
    if seed.extent is not None or max_travel is None or not zs:
        return seed
    spacing = spacing_xyz if spacing_xyz is not None else (1.0, 1.0, 1.0)
    lo = max(0, zs[0] - reach(seed.masks[zs[0]], spacing, max_travel))
    hi = min(depth - 1, zs[-1] + reach(seed.masks[zs[-1]], spacing, max_travel))
    return Seed(masks=seed.masks, points=seed.points, extent=(lo, hi))


def plan_fronts(key: str, seed: Seed, depth: int) -> list[tuple[int, int, int]]:
    """(start slice, step, last slice) of every front of one structure: outward from the outermost seeds to the
    extent (or the volume's end), and from both ends of each gap between seeds to its middle."""
    zs = sorted(z for z, m in seed.masks.items() if m.any())
    if not zs:
        return []
    lo, hi = seed.extent if seed.extent is not None else (0, depth - 1)
    lo, hi = max(lo, 0), min(hi, depth - 1)
    fronts = []
    if zs[0] > lo:
        fronts.append((zs[0], -1, lo))
    if zs[-1] < hi:
        fronts.append((zs[-1], +1, hi))
    for a, b in zip(zs, zs[1:]):
        gap = b - a - 1
        if gap <= 0:
            continue
        up = (gap + 1) // 2
        fronts.append((a, +1, a + up))
        if gap - up > 0:
            fronts.append((b, -1, b - 1 - (gap - up) + 1))
    return fronts


class EncodingCache:
    """Least-recently-used encodings keyed by (slice, window); an encoding is ~2 MB."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Any) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        return None

    def windows_on(self, z: int) -> list[CropWindow]:
        """The windows of slice ``z`` held now (keys are (slice, window))."""
        return [k[1] for k in self._items if isinstance(k, tuple) and k[0] == z]

    def put(self, key: Any, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


def _encode(engine: PromptEngine, image: np.ndarray, jobs: Sequence[tuple[int, CropWindow]],
            s: PropagationSettings, cache: EncodingCache) -> list[Any]:
    """Encodings of (slice, window) crops, from the cache where possible, the rest in batches."""
    found = [cache.get((z, w)) for z, w in jobs]
    missing = sorted({(z, w) for (z, w), e in zip(jobs, found) if e is None}, key=lambda j: (j[0], j[1].y0, j[1].x0))
    for i in range(0, len(missing), s.batch):
        chunk = missing[i:i + s.batch]
        crops = np.stack([crop_image(normalise(image[z], s.window), w, engine.input_size) for z, w in chunk])
        for job, embedding in zip(chunk, engine.encode(crops)):
            cache.put(job, embedding)
    return [e if e is not None else cache.get(job) for job, e in zip(jobs, found)]


def neighbour_prompt(logits: np.ndarray, window: CropWindow, size: int,
                     shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """A front's last native logits as a mask prompt on the next slice's crop, moved by the anatomy's motion as its
    box is (``shift``: (dx, dy) native pixels)."""
    if shift != (0.0, 0.0):
        logits = ndi.shift(logits, (shift[1], shift[0]), order=1, mode="constant", cval=OUTSIDE)
    return np.clip(crop_image(logits, window, size, fill=OUTSIDE), OUTSIDE, -OUTSIDE)  # as trained


def _prompt(mask: np.ndarray, logits: np.ndarray | None, clicks: np.ndarray | None, window: CropWindow,
            size: int, s: PropagationSettings, shift: tuple[float, float] = (0.0, 0.0)) -> Prompt:
    box = box_of(mask)
    assert box is not None
    dx, dy = shift
    box = (box[0] - s.box_margin + dx, box[1] - s.box_margin + dy, box[2] + s.box_margin + dx,
           box[3] + s.box_margin + dy)
    points = labels = None
    yx = np.zeros((0, 2), int)
    if s.points:
        yx = interior_points(mask, s.max_points, s.poor_fill)
        if s.poor_only and len(yx) == 1:
            yx = yx[:0]
    if clicks is not None and len(clicks):
        yx = np.concatenate([yx, np.asarray(clicks, int).reshape(-1, 2)])
    if len(yx):
        points, labels = points_to_input(yx, window, size), np.ones(len(yx), np.int64)
    mask_logits = neighbour_prompt(logits, window, size, shift) if s.mask_prompt and logits is not None else None
    return Prompt(box=box_to_input(box, window, size), points=points, labels=labels, mask_logits=mask_logits)


def _decode_step(engine: PromptEngine, image: np.ndarray, fronts: list[_Front], jumps: Sequence[int],
                 seeds: Mapping[str, Seed], s: PropagationSettings,
                 cache: EncodingCache, follow: frozenset[str] = frozenset(),
                 on_decode: Callable[[Decode], None] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each front's mask on the slice ``jump`` slices ahead, prompted with its current mask's box."""
    size, shape = engine.input_size, image.shape[1:]
    targets = [f.z + f.step * k for f, k in zip(fronts, jumps)]
    boxes = [box_of(f.mask) for f in fronts]
    windows = [crop_window(b, s.crop_factor, s.min_crop, s.snap) for b in boxes]  # type: ignore[arg-type]
    if s.crop_reuse > 1:  # larger crops first: a small structure's box may lie in a neighbour's crop
        for i in sorted(range(len(fronts)), key=lambda i: -windows[i].side):
            z = targets[i]
            held = cache.windows_on(z) + [w for j, w in enumerate(windows) if j != i and targets[j] == z]
            windows[i] = reusable_window(held, boxes[i], windows[i], s.crop_reuse) or windows[i]  # type: ignore
    embeddings = _encode(engine, image, list(zip(targets, windows)), s, cache)
    shifts = [anatomy_shift(image, f.z, z, crop_window(b, s.crop_factor, s.min_crop), s.window) if f.key in follow
              else (0.0, 0.0) for f, z, b in zip(fronts, targets, boxes)]  # type: ignore[arg-type]
    prompts = [_prompt(f.mask, f.logits, seeds[f.key].points.get(z), w, size, s, sh)
               for f, z, w, sh in zip(fronts, targets, windows, shifts)]
    logits = engine.decode(embeddings, prompts)
    if on_decode is not None:
        for f, z, w, e, p, lg, sh in zip(fronts, targets, windows, embeddings, prompts, logits, shifts):
            offered = p.mask_logits if p.mask_logits is not None else neighbour_prompt(f.logits, w, size, sh)
            on_decode(Decode(f.key, z, w, e, p, lg, offered))
    out = []
    for f, w, lg in zip(fronts, windows, logits):
        native = logits_to_native(lg, w, shape)
        out.append((keep_connected(native > s.threshold, f.mask), native))
    for _ in range(s.refine):
        redo = [i for i, (m, _) in enumerate(out) if m.any() and fronts[i].refine]
        if not redo:
            break
        again = engine.decode([embeddings[i] for i in redo],
                              [_prompt(out[i][0], None, None, windows[i], size, s) for i in redo])
        for i, lg in zip(redo, again):
            native = logits_to_native(lg, windows[i], shape)
            out[i] = (keep_connected(native > s.threshold, fronts[i].mask), native)
    return out


# Tissue classes (HU) a click's region may not leave: air, fat, soft tissue, bone. Partial volume at ~4 mm spreads
# bone over 200-1500 HU, so a tolerance around the clicked value finds only a few pixels of a mandible.
TISSUE_EDGES_HU = (-400.0, -30.0, 150.0)


def region_from_clicks(hu: np.ndarray, clicks_yx: np.ndarray, max_radius: int = 32) -> np.ndarray:
    """The pixels of a 2-D HU slice in the clicked pixels' tissue class (:data:`TISSUE_EDGES_HU`), connected to a
    click and at most ``max_radius`` pixels from one: a rough extent that turns clicks into a box prompt.

    LiteMedSAM was trained on boxes; a points-only decode on the mandible's deepest pixel gave no mask near the
    click (tests/test_propagate.py), a box around the bone the click lies in does. In soft tissue the region
    is bounded mostly by ``max_radius``."""
    yx = np.asarray(clicks_yx, int).reshape(-1, 2)
    h, w = hu.shape
    yx = yx[(yx[:, 0] >= 0) & (yx[:, 0] < h) & (yx[:, 1] >= 0) & (yx[:, 1] < w)]
    if not len(yx):
        return np.zeros(hu.shape, bool)
    tissue = np.digitize(hu, TISSUE_EDGES_HU)
    clicked = np.zeros(hu.shape, bool)
    clicked[tuple(yx.T)] = True
    near = ndi.distance_transform_edt(~clicked) <= max_radius
    region = np.zeros(hu.shape, bool)
    for cls in np.unique(tissue[tuple(yx.T)]):
        labels, _ = ndi.label((tissue == cls) & near)
        picked = np.unique(labels[clicked & (tissue == cls)])
        region |= np.isin(labels, picked[picked > 0])
    return region


def _with_click_masks(engine: PromptEngine, image: np.ndarray, seed: Seed, s: PropagationSettings,
                      cache: EncodingCache) -> Seed:
    """Slices seeded by clicks alone get a mask first: a box around the region the clicks grow into
    (:func:`region_from_clicks`) decoded on a zoomed crop, keeping what touches the clicks. The clicks are not
    passed as point prompts: box + click gave the mandible 6 pixels, the box alone 51 (truth 56)."""
    todo = [z for z, p in seed.points.items() if len(p) and not (z in seed.masks and seed.masks[z].any())]
    if not todo:
        return seed
    size, masks = engine.input_size, dict(seed.masks)
    regions, windows = [], []
    for z in todo:
        region = region_from_clicks(image[z], seed.points[z])
        box = box_of(region)
        if box is None:
            raise ModelInputError(f"clicks on slice {z} lie outside the image")
        regions.append(region)
        windows.append(crop_window(box, s.crop_factor, s.min_crop, s.snap))
    embeddings = _encode(engine, image, list(zip(todo, windows)), s, cache)
    prompts = [_prompt(r, None, None, w, size, s) for r, w in zip(regions, windows)]
    for z, w, lg in zip(todo, windows, engine.decode(embeddings, prompts)):
        found = logits_to_native(lg, w, image.shape[1:]) > s.threshold
        clicked = np.zeros_like(found)
        clicked[tuple(np.asarray(seed.points[z], int).reshape(-1, 2).T)] = True
        masks[z] = keep_connected(found, clicked)
    return Seed(masks=masks, points=seed.points, extent=seed.extent)


def interpolate_masks(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """The 2-D mask a fraction ``t`` of the way from ``a`` to ``b``: both moved to the blended centroid, then their
    signed distances blended (blending alone shrinks a shape that moves between the slices)."""
    ca, cb = (np.argwhere(m).mean(axis=0) for m in (a, b))
    centre = (1 - t) * ca + t * cb

    def signed_at_centre(m: np.ndarray, c: np.ndarray) -> np.ndarray:
        d = ndi.distance_transform_edt(m) - ndi.distance_transform_edt(~m)
        return ndi.shift(d, centre - c, order=1, mode="nearest")

    return (1 - t) * signed_at_centre(a, ca) + t * signed_at_centre(b, cb) > 0


def _to_grid(z: int, step: int, n: int) -> int:
    """Slices from ``z`` to the next multiple of ``n`` in direction ``step``: all fronts land on the same slices, so
    neighbouring structures can share crops (``crop_reuse``)."""
    return n - z % n if step > 0 else (z % n or n)


def _advance(f: _Front, k: int, new: np.ndarray, native: np.ndarray, out: np.ndarray) -> None:
    """Move front ``f`` ``k`` slices on to ``new``, filling the slices jumped over by interpolation."""
    for j in range(1, k):
        out[f.z + f.step * j] |= interpolate_masks(f.mask, new, j / k)
    f.z += f.step * k
    f.mask, f.logits = new, native
    out[f.z] |= new


def propagate(engine: PromptEngine, image: np.ndarray, seeds: Mapping[str, Seed],
              settings: PropagationSettings | None = None, cache: EncodingCache | None = None,
              spacing_xyz: Sequence[float] | None = None,
              on_decode: Callable[[Decode], None] | None = None) -> dict[str, StructureResult]:
    """Propagate every structure's seeds through ``image`` (Z, Y, X, HU) of voxel size ``spacing_xyz`` (mm; None:
    isotropic); all fronts advance in lockstep so each step's crops are encoded as one batch. Seed slices are
    returned exactly as given. ``on_decode`` sees every front's decode (not the second decodes of ``refine``; a
    :class:`VolumePropagator` tracks by itself and shows none)."""
    s = settings or PropagationSettings()
    if s.mask_prompt is None:
        s = replace(s, mask_prompt=bool(getattr(engine, "mask_prompt", False)))
    if image.ndim != 3:
        raise ModelInputError(f"image must be 3-D (Z, Y, X), got shape {image.shape}")
    bounded = {key: within_reach(seed, image.shape[0], spacing_xyz, travel_for(key, engine, s))
               for key, seed in seeds.items()}
    if s.abut:  # prior-mode extents (registration's) are left alone
        rules = {k: r for k, r in abutments_for(list(seeds), engine).items() if seeds[k].extent is None}
        slice_mm = float(spacing_xyz[2]) if spacing_xyz is not None else 1.0
        bounded = abut(bounded, rules, slice_mm, image.shape[0])
    seeds = bounded
    if isinstance(engine, VolumePropagator):  # e.g. SAM2's video predictor: it tracks through the stack itself
        return engine.propagate_volume(image, seeds, s)
    cache = cache if cache is not None else EncodingCache()
    follow = frozenset(key for key in seeds if follows_anatomy(key, engine, s))
    growth = {key: growth_for(key, engine, s) for key in seeds}
    seeds = {key: _with_click_masks(engine, image, seed, s, cache) for key, seed in seeds.items()}
    results: dict[str, StructureResult] = {}
    fronts: list[_Front] = []
    for key, seed in seeds.items():
        mask = np.zeros(image.shape, bool)
        for z, m in seed.masks.items():
            if m.shape != image.shape[1:]:
                raise ModelInputError(f"seed {key!r} slice {z}: mask shape {m.shape}, slices are {image.shape[1:]}")
            if not 0 <= z < image.shape[0]:
                raise ModelInputError(f"seed {key!r}: slice {z} is outside the volume (0..{image.shape[0] - 1})")
            mask[z] |= m.astype(bool)
        results[key] = StructureResult(mask=mask)
        for start, step, last in plan_fronts(key, seed, image.shape[0]):
            m = mask[start]
            stride = s.long_slice_step if key in follow and s.long_slice_step is not None else s.slice_step
            fronts.append(_Front(key, start, step, last, float(m.sum()), m, _seed_logits(m), stride,
                                 refine=box_fill(m) < s.poor_fill, max_growth=growth[key]))
    active = [f for f in fronts if f.z != f.last]
    while active:
        jumps = [min(_to_grid(f.z, f.step, f.stride), abs(f.last - f.z)) for f in active]
        retry: list[_Front] = []
        decoded = _decode_step(engine, image, active, jumps, seeds, s, cache, follow, on_decode)
        for f, k, (new, native) in zip(active, jumps, decoded):
            reason = stop_reason(new, f.mask, f.seed_area, s, f.max_growth)
            if reason is None:
                _advance(f, k, new, native, results[f.key].mask)
            elif k > 1:  # the jump failed: the next slice alone decides whether the front ends here
                retry.append(f)
            else:
                f.stop = f"{reason} at slice {f.z + f.step}"
        retried = (_decode_step(engine, image, retry, [1] * len(retry), seeds, s, cache, follow, on_decode)
                   if retry else [])
        for f, (new, native) in zip(retry, retried):
            reason = stop_reason(new, f.mask, f.seed_area, s, f.max_growth)
            if reason is None:
                _advance(f, 1, new, native, results[f.key].mask)
            else:
                f.stop = f"{reason} at slice {f.z + f.step}"
        for f in active:
            if f.stop is None and f.z == f.last:
                f.stop = f"reached slice {f.last}"
        active = [f for f in active if f.stop is None]
    for f in fronts:
        results[f.key].stops.append(f"{'up' if f.step > 0 else 'down'} from {f.start}: {f.stop}")
    log.debug("propagation: %d encodings computed, %d reused", cache.misses, cache.hits)
    return results


def segment_slices(engine: PromptEngine, image: np.ndarray, truth: np.ndarray,
                   settings: PropagationSettings | None = None, cache: EncodingCache | None = None,
                   reuse: float = 1.0) -> np.ndarray:
    """The upper bound used by the evaluation: every slice of ``truth`` prompted with its own true box (and
    clicks), one decode each, no propagation. With ``reuse`` > 1 a slice whose cache already holds a crop around
    the true box, within ``reuse`` x the ideal crop's side (e.g. propagation's crop of the same slice), is
    decoded on that crop instead of encoding a new one: the evaluation's upper bound at about half the cost."""
    s = settings or PropagationSettings()
    cache = cache if cache is not None else EncodingCache()
    out = np.zeros(truth.shape, bool)
    zs = [int(z) for z in np.flatnonzero(truth.reshape(truth.shape[0], -1).any(axis=1))]
    for i in range(0, len(zs), s.batch):
        chunk = zs[i:i + s.batch]
        windows = []
        for z in chunk:
            box = box_of(truth[z])
            ideal = crop_window(box, s.crop_factor, s.min_crop, s.snap)  # type: ignore[arg-type]
            windows.append(reusable_window(cache.windows_on(z), box, ideal, reuse) or ideal)  # type: ignore[arg-type]
        embeddings = _encode(engine, image, list(zip(chunk, windows)), s, cache)
        prompts = [_prompt(truth[z], None, None, w, engine.input_size, s) for z, w in zip(chunk, windows)]
        for z, w, lg in zip(chunk, windows, engine.decode(embeddings, prompts)):
            out[z] = logits_to_native(lg, w, truth.shape[1:]) > s.threshold
    return out
