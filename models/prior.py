"""Prior-study mode of propagation: contours registered from an earlier scan prompt the engine on the new one.

Given the prior's masks already mapped onto the new grid (:func:`models.registration.map_masks`), each structure
is seeded with its mapped mask on a few key slices (1/4, 1/2, 3/4 of its z extent) and propagated slice by slice,
never past the mapped mask's z extent. The result is then **fused** with the mapped mask slice by slice: a
propagated slice is kept where it agrees with the registered one (Dice >= ``min_agreement``); where it does not,
or where propagation stopped early, the registered slice is used. Propagation alone was measured worse than
registration alone on simulated OpenKBP follow-ups (README, "Prior mode": on a parotid slab Dice 0.63 against
0.97), so registration is the fallback and a propagated slice must agree with it to be kept
(:data:`MIN_AGREEMENT`: by default 1, as no propagated slice has yet been measured better than the registered one
on average). ``min_agreement=1`` returns the registration; ``0`` keeps every propagated slice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from models.prompting import PromptEngine
from models.propagate import EncodingCache, PropagationSettings, Seed, propagate
from models.registration import key_slices

# Chosen on simulated follow-ups of OpenKBP *train* patients (bench/prior.py --split train, 1.2.0): 1, 10 and 100
# (--patients 0 1 2): fused mean Dice 0.799 at 0.5, 0.838 at 0.7, 0.904 at 0.9, 0.9106 at 0.95, registration alone
# 0.9111; 101, 103 and 104 with a local change registration cannot follow (--patients 3 4 5 --local-change): the
# propagated slices were worse than the registered ones at every level of agreement, even >= 0.95. So by default
# no propagated slice is kept, and the node does not run the engine (pipeline.prior).
MIN_AGREEMENT = 1.0

__all__ = ["PriorResult", "prior_seeds", "fuse", "propagate_from_prior", "follow_up_case"]


@dataclass
class PriorResult:
    mask: np.ndarray  # bool (Z, Y, X): the fused result
    propagated: np.ndarray  # bool (Z, Y, X): propagation alone (seed slices included)
    registered_slices: list[int] = field(default_factory=list)  # slices where the registered contour was used
    stops: list[str] = field(default_factory=list)


def prior_seeds(mapped: Mapping[str, np.ndarray], count: int = 3) -> dict[str, Seed]:
    """One :class:`Seed` per non-empty mapped mask: its key slices, bounded by its z extent."""
    seeds = {}
    for name, mask in mapped.items():
        zs = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
        if zs.size:
            seeds[name] = Seed(masks={z: mask[z] for z in key_slices(mask, count)}, extent=(int(zs[0]), int(zs[-1])))
    return seeds


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def fuse(propagated: np.ndarray, registered: np.ndarray, min_agreement: float) -> tuple[np.ndarray, list[int]]:
    """Slice by slice: the propagated slice where its Dice with the registered slice is >= ``min_agreement``,
    the registered slice otherwise; returns the mask and the slices taken from registration."""
    if not 0 <= min_agreement <= 1:
        raise ValueError(f"min_agreement must be >= 0 and <= 1, got {min_agreement}")
    out = propagated.copy()
    fallback = []
    for z in np.flatnonzero((propagated | registered).reshape(propagated.shape[0], -1).any(axis=1)):
        if _dice(propagated[z], registered[z]) < min_agreement or not propagated[z].any():
            out[z] = registered[z]
            fallback.append(int(z))
    return out, fallback


def propagate_from_prior(engine: PromptEngine, image: np.ndarray, mapped: Mapping[str, np.ndarray], *,
                         key_count: int = 3, min_agreement: float = MIN_AGREEMENT,
                         settings: PropagationSettings | None = None, cache: EncodingCache | None = None,
                         ) -> dict[str, PriorResult]:
    """Propagate every non-empty mapped mask from its key slices through ``image`` (Z, Y, X, HU) and fuse the
    result with the mapped mask. Empty mapped masks (the structure left the new field of view) are left out."""
    seeds = prior_seeds(mapped, key_count)
    found = propagate(engine, image, seeds, settings, cache)
    out = {}
    for name, result in found.items():
        mask, fallback = fuse(result.mask, mapped[name], min_agreement)
        out[name] = PriorResult(mask, result.mask, fallback, result.stops)
    return out


def follow_up_case(engine: PromptEngine, image: np.ndarray, truth: Mapping[str, np.ndarray],
                   spacing_xyz: tuple[float, float, float], seed: int, *, deformable: bool = True, key_count: int = 3,
                   min_agreement: float = MIN_AGREEMENT, settings: PropagationSettings | None = None,
                   ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """Prior mode on a simulated follow-up of one case (the evaluation): the follow-up's masks, and by method
    (``fused``: the node's output, ``propagated``: propagation alone, ``registered``: registration alone) the
    masks found on it from the undeformed ``image`` and ``truth``."""
    from models.registration import map_masks, register, simulate_follow_up
    from models.types import Volume

    follow = simulate_follow_up(image, truth, spacing_xyz[::-1], seed)  # type: ignore[arg-type]
    prior = Volume(image, spacing_xyz, (0.0, 0.0, 0.0))
    new = Volume(follow.image, spacing_xyz, (0.0, 0.0, 0.0))
    mapped = map_masks(truth, prior, new, register(new, prior, deformable=deformable).transform)
    # A fresh cache: encodings of the prior image must not answer for the follow-up's slices.
    found = propagate_from_prior(engine, follow.image.astype(np.float32), mapped, key_count=key_count,
                                 min_agreement=min_agreement, settings=settings, cache=EncodingCache())
    empty = {k: np.zeros(m.shape, bool) for k, m in truth.items()}
    return follow.masks, {
        "fused": {k: found[k].mask if k in found else empty[k] for k in truth},
        "propagated": {k: found[k].propagated if k in found else empty[k] for k in truth},
        "registered": mapped}
