"""How far a structure runs from its seed, learned from training contours (pure functions over masks).

A fine-tuned package records, per structure: its median reach from the middle slice in diameters of that slice
(:func:`learned_reach`) and, with enough cases, a :class:`ReachLaw` (the half-length in mm as a power of the seed's
diameter); the largest slice-to-slice growth of its area (:func:`learned_growth`); and the structures it ends beside
in nearly every case (:class:`Abutment`). ``models.propagate`` turns these into bounds on its fronts; ``dicom-node
finetune`` and ``bench/propagate_reach.py`` fit them. Masks are (Z, Y, X); spacings (x, y, z) in mm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ReachLaw", "equivalent_diameter_mm", "reach", "middle_slice_extent", "learned_reach", "MIN_LAW_CASES",
    "fit_reach_law", "learn_reach", "learned_growth", "learn_growth", "Abutment", "ABUTMENT_TOLERANCE_MM",
    "facing_gap_mm", "pair_gaps", "fit_abutments",
]

@dataclass(frozen=True)
class ReachLaw:
    """How far a known structure reaches from its middle slice, given that slice's size: ``half_mm`` x (seed
    diameter / ``diameter_mm``) ** ``exponent`` mm each way, fitted over a training set (:func:`fit_reach_law`).

    One ratio to the seed's diameter (exponent 1, ``max_travel``) describes long and compact structures badly: on
    the OpenKBP train split the half-length of a brainstem, cord or mandible varies less in mm than in seed
    diameters (log-sd 0.27 vs 0.30, 0.23 vs 0.28, 0.24 vs 0.47; a horseshoe's middle-slice area says little about
    its height) while a larynx's grows faster than its diameter (fitted exponents: mandible -0.55, cord 0.07,
    brainstem 0.21, parotids 0.46-0.55, larynx 1.47)."""

    half_mm: float  # half the z extent of a structure whose middle slice has the reference diameter
    diameter_mm: float  # the reference: the median middle-slice equivalent diameter of the training set
    exponent: float

    def half_extent_mm(self, diameter_mm: float) -> float:
        return self.half_mm * (max(diameter_mm, 1e-3) / self.diameter_mm) ** self.exponent

    def scaled(self, fraction: float) -> ReachLaw:
        return ReachLaw(self.half_mm * fraction, self.diameter_mm, self.exponent)


def equivalent_diameter_mm(mask: np.ndarray, spacing_xyz: Sequence[float]) -> float:
    """The diameter of a disc of a 2-D mask's area, in mm."""
    sx, sy = float(spacing_xyz[0]), float(spacing_xyz[1])
    return float(2.0 * np.sqrt(float(mask.sum()) * sx * sy / np.pi))


def reach(mask: np.ndarray, spacing_xyz: Sequence[float], max_travel: float | ReachLaw) -> int:
    """Slices an outward front may travel from a seed ``mask`` (2-D): ``max_travel`` x the diameter of a disc of
    the mask's area, in mm (or what a :class:`ReachLaw` gives for that diameter), over the slice spacing; at least
    one slice."""
    diameter_mm = equivalent_diameter_mm(mask, spacing_xyz)
    mm = max_travel.half_extent_mm(diameter_mm) if isinstance(max_travel, ReachLaw) else max_travel * diameter_mm
    return max(1, int(round(mm / float(spacing_xyz[2]))))


def middle_slice_extent(mask: np.ndarray, spacing_xyz: Sequence[float]) -> tuple[float, float] | None:
    """(equivalent diameter of the middle slice, half the z extent), both in mm, of a 3-D mask; None when empty.
    The middle slice is the contoured slice nearest the middle of the extent, as a seed-mode seed is chosen."""
    zs = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    if zs.size == 0:
        return None
    middle = int(zs[np.argmin(np.abs(zs - (zs[0] + zs[-1]) / 2.0))])
    return equivalent_diameter_mm(mask[middle], spacing_xyz), float((zs[-1] - zs[0]) / 2.0 * float(spacing_xyz[2]))


def learned_reach(mask: np.ndarray, spacing_xyz: Sequence[float]) -> float | None:
    """How far a structure (3-D mask) reaches from its middle slice, in equivalent diameters of that slice: the
    mean of its extents above and below, in mm, over the diameter of a disc of the middle slice's area (the unit of
    ``max_travel``). None when empty. Its median over a training set is what a fine-tuned package learns."""
    extent = middle_slice_extent(mask, spacing_xyz)
    return None if extent is None else extent[1] / extent[0]


MIN_LAW_CASES = 10  # fewer training cases: no ReachLaw, the median learned_reach bounds the structure


def fit_reach_law(extents: Sequence[tuple[float, float]], exponent_bounds: tuple[float, float] = (-1.0, 2.0)
                  ) -> ReachLaw | None:
    """The :class:`ReachLaw` of (middle-slice diameter, half extent) pairs in mm (:func:`middle_slice_extent` over
    a training set): least squares of log half extent on log diameter, the exponent clipped to
    ``exponent_bounds``. None below :data:`MIN_LAW_CASES` usable pairs (single-slice structures have no extent)."""
    pairs = np.asarray([(d, h) for d, h in extents if d > 0 and h > 0], float).reshape(-1, 2)
    if len(pairs) < MIN_LAW_CASES:
        return None
    log_d, log_h = np.log(pairs[:, 0]), np.log(pairs[:, 1])
    reference = float(np.median(pairs[:, 0]))
    exponent = float(np.polyfit(log_d, log_h, 1)[0]) if np.ptp(log_d) > 0 else 0.0
    exponent = float(np.clip(exponent, *exponent_bounds))
    # the line through the means with the (clipped) slope, read at the reference diameter
    half = float(np.exp(log_h.mean() + exponent * (np.log(reference) - log_d.mean())))
    return ReachLaw(round(half, 2), round(reference, 2), round(exponent, 3))


def learn_reach(extents: Sequence[tuple[float, float]]) -> tuple[float, ReachLaw | None]:
    """What a package learns of one structure from its training cases' :func:`middle_slice_extent` pairs (a
    non-empty list): the median :func:`learned_reach` (in middle-slice diameters, rounded as stored) and, with
    enough cases, its :class:`ReachLaw`."""
    return round(float(np.median([h / d for d, h in extents])), 3), fit_reach_law(extents)


def learned_growth(mask: np.ndarray) -> float | None:
    """The largest factor by which a structure's (3-D mask) area grows from one slice to the next going outward
    from its middle slice, as a seeded front meets it (the previous area at least 4 pixels, as in
    :func:`stop_reason`); None when it spans fewer than two slices."""
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1).astype(float)
    zs = np.flatnonzero(areas)
    if zs.size == 0 or zs[-1] == zs[0]:
        return None
    areas = areas[zs[0]:zs[-1] + 1]
    middle = int(np.argmin(np.abs(np.arange(len(areas)) - (len(areas) - 1) / 2.0)))
    up = areas[middle + 1:] / np.maximum(areas[middle:-1], 4)
    down = areas[:middle][::-1] / np.maximum(areas[1:middle + 1][::-1], 4)
    return float(np.concatenate([up, down]).max())


def learn_growth(values: Sequence[float]) -> float:
    """What a package learns of one structure's growth from its training cases' :func:`learned_growth` values (a
    non-empty list): the largest, rounded as stored. Not a percentile: decoded masks grow more unevenly than
    contours, and on 30 OpenKBP train mandibles (1.5.0, none of its on-policy cases) a limit of 2 (max_growth) gave
    0.719 mean Dice, the 95th percentile (2.61) 0.742, 3.0 0.758, 4.0 0.770 (the largest is 4.46); on
    bench/propagate.py's seven train patients the largest changed nothing else."""
    return round(float(max(values)), 2)


@dataclass(frozen=True)
class Abutment:
    """Where a known structure ends beside another: its end facing ``other`` lies ``gap_mm`` (slice to slice: one
    slice apart is the slice spacing) short of ``other``'s end facing it. A convention of contouring, learned from
    training contours where it holds (:func:`fit_abutments`): in the 155 OpenKBP train patients with both, the
    spinal cord's cranial end is the slice below the brainstem's caudal end (median 2.5 mm, 90 % within 2.5 mm of
    it), which no reach law knows (a cord's half-length varies by a quarter)."""

    other: str  # the other structure: its name (lower-cased) in a package, its seed key in abut()
    gap_mm: float


ABUTMENT_TOLERANCE_MM = 5.0  # 90 % of a pair's training gaps within this of their median, or no abutment


def facing_gap_mm(a: np.ndarray, b: np.ndarray, slice_mm: float) -> float | None:
    """mm from 3-D mask ``a``'s end slice facing ``b`` to ``b``'s end slice facing ``a`` (which ends face each other
    is decided by the middles of their z extents); negative where they overlap, None when either is empty."""
    za, zb = (np.flatnonzero(m.reshape(m.shape[0], -1).any(axis=1)) for m in (a, b))
    if za.size == 0 or zb.size == 0:
        return None
    gap = zb[0] - za[-1] if zb[0] + zb[-1] > za[0] + za[-1] else za[0] - zb[-1]
    return float(gap * slice_mm)


def pair_gaps(masks: Mapping[str, np.ndarray], slice_mm: float) -> dict[tuple[str, str], float]:
    """:func:`facing_gap_mm` of every pair of one case's 3-D masks (by name, in the mapping's order), skipping
    empty ones: a case's measurements for :func:`fit_abutments`."""
    names = list(masks)
    return {(a, b): g for i, a in enumerate(names) for b in names[i + 1:]
            if (g := facing_gap_mm(masks[a], masks[b], slice_mm)) is not None}


def fit_abutments(gaps: Mapping[tuple[str, str], Sequence[float]], half_mm: Mapping[str, float],
                  tolerance_mm: float = ABUTMENT_TOLERANCE_MM) -> dict[str, Abutment]:
    """Abutments of structure pairs whose training gaps (:func:`facing_gap_mm` by (name, name); at least
    :data:`MIN_LAW_CASES` cases) keep within ``tolerance_mm`` of their median in 90 % of cases. Of a pair, the
    structure that runs further from its middle (``half_mm``, e.g. the reach law's) is bounded by the other: end
    errors grow with length, so the shorter structure's predicted end is the better anchor."""
    out: dict[str, Abutment] = {}
    for (a, b), values in sorted(gaps.items()):
        g = np.asarray(values, float)
        if len(g) < MIN_LAW_CASES or a == b:
            continue
        median = float(np.median(g))
        if np.percentile(np.abs(g - median), 90) > tolerance_mm:
            continue
        longer, shorter = (a, b) if half_mm.get(a, 0.0) >= half_mm.get(b, 0.0) else (b, a)
        out.setdefault(longer, Abutment(shorter.lower(), round(median, 2)))
    return out
