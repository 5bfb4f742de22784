"""Zoomed crops for a promptable 2-D engine: a square window around a box, the image and the prompts mapped into
the engine's input, and its logits mapped back (pure functions over arrays).

Head-and-neck organs at ~4 mm are a few dozen pixels across and vanish in a whole-slice view, so every decode
works on a square of ``factor`` x the box's longer side (at least ``min_side`` native pixels) resized to the
engine's input; the issue measured true-box Dice 0.52 whole-slice against 0.59 on such crops. Propagation,
fine-tuning and the on-policy rounds all crop through these functions, so what the decoder is trained on is what it
sees. Arrays are (Y, X); boxes are (x0, y0, x1, y1) inclusive pixel indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "OUTSIDE", "CropWindow", "box_of", "crop_window", "crop_image", "box_to_input", "points_to_input",
    "logits_to_native", "normalise", "box_fill", "interior_points", "reusable_window",
]

OUTSIDE = -20.0  # logit written where a crop did not reach


@dataclass(frozen=True)
class CropWindow:
    """A square of ``side`` native pixels with top-left corner (y0, x0); it may reach past the image."""

    y0: int
    x0: int
    side: int


def box_of(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) inclusive bounds of a 2-D mask, None when empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def crop_window(box: tuple[int, int, int, int], factor: float = 2.0, min_side: int = 24, snap: int = 1) -> CropWindow:
    """The square of ``factor`` x the box's longer side (at least ``min_side``), centred on the box."""
    x0, y0, x1, y1 = box
    side = max(int(np.ceil(factor * max(x1 - x0 + 1, y1 - y0 + 1))), min_side)
    side = -(-side // snap) * snap
    cx, cy = (x0 + x1 + 1) / 2.0, (y0 + y1 + 1) / 2.0  # centre in pixel-edge coordinates
    return CropWindow(y0=int(round((cy - side / 2) / snap)) * snap, x0=int(round((cx - side / 2) / snap)) * snap,
                      side=side)


def crop_image(image: np.ndarray, window: CropWindow, size: int, fill: float = 0.0) -> np.ndarray:
    """The window of a 2-D image (``fill`` outside it) resized to ``size`` x ``size``, float32."""
    out = np.full((window.side, window.side), fill, np.float32)
    h, w = image.shape
    ys, xs = max(window.y0, 0), max(window.x0, 0)
    ye, xe = min(window.y0 + window.side, h), min(window.x0 + window.side, w)
    if ye > ys and xe > xs:
        out[ys - window.y0:ye - window.y0, xs - window.x0:xe - window.x0] = image[ys:ye, xs:xe]
    interpolation = cv2.INTER_AREA if window.side > size else cv2.INTER_LINEAR
    return cv2.resize(out, (size, size), interpolation=interpolation)


def box_to_input(box: tuple[int, int, int, int], window: CropWindow, size: int) -> tuple[float, float, float, float]:
    """A native box in the engine input's pixel indices (each native pixel covers ``size/side`` input pixels)."""
    s = size / window.side
    x0, y0, x1, y1 = box
    return ((x0 - window.x0) * s, (y0 - window.y0) * s, (x1 + 1 - window.x0) * s - 1, (y1 + 1 - window.y0) * s - 1)


def points_to_input(points_yx: np.ndarray, window: CropWindow, size: int) -> np.ndarray:
    """(K, 2) native (y, x) pixel indices -> (K, 2) input (x, y) at the pixels' centres."""
    s = size / window.side
    pts = np.asarray(points_yx, float).reshape(-1, 2)
    return np.stack([(pts[:, 1] + 0.5 - window.x0) * s - 0.5, (pts[:, 0] + 0.5 - window.y0) * s - 0.5], axis=1)


def logits_to_native(logits: np.ndarray, window: CropWindow, shape: tuple[int, int]) -> np.ndarray:
    """Engine logits on a crop -> a full native slice of logits (``OUTSIDE`` where the crop did not reach)."""
    resized = cv2.resize(logits.astype(np.float32), (window.side, window.side), interpolation=cv2.INTER_LINEAR)
    out = np.full(shape, OUTSIDE, np.float32)
    h, w = shape
    ys, xs = max(window.y0, 0), max(window.x0, 0)
    ye, xe = min(window.y0 + window.side, h), min(window.x0 + window.side, w)
    if ye > ys and xe > xs:
        out[ys:ye, xs:xe] = resized[ys - window.y0:ye - window.y0, xs - window.x0:xe - window.x0]
    return out


def normalise(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def box_fill(mask: np.ndarray) -> float:
    """The fraction of its bounding box a 2-D mask covers (0 when empty): below ~0.45 one box describes the shape
    badly (OpenKBP train slices: a mandible's median 0.18, the other six organs' 0.65-0.83, 2 % of parotid slices
    below 0.45)."""
    box = box_of(mask)
    if box is None:
        return 0.0
    x0, y0, x1, y1 = box
    return float(mask.sum()) / float((x1 - x0 + 1) * (y1 - y0 + 1))


def interior_points(mask: np.ndarray, max_points: int = 3, poor_fill: float = 0.45) -> np.ndarray:
    """(K, 2) (y, x) clicks deep inside a 2-D mask: the deepest pixel, plus farthest-apart deep pixels when the
    mask fills less than ``poor_fill`` of its box (one box describes such a shape badly)."""
    if not mask.any():
        return np.zeros((0, 2), int)
    depth = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    chosen = [np.unravel_index(int(np.argmax(depth)), mask.shape)]
    if box_fill(mask) < poor_fill and max_points > 1:
        deep = np.argwhere(depth >= max(1.0, 0.5 * depth.max()))
        for _ in range(max_points - 1):
            gap = np.min(np.linalg.norm(deep[:, None, :] - np.asarray(chosen)[None], axis=2), axis=1)
            if gap.max() < 2:
                break
            chosen.append(tuple(deep[int(np.argmax(gap))]))
    return np.asarray(chosen, int)


def reusable_window(windows: Sequence[CropWindow], box: tuple[int, int, int, int], ideal: CropWindow,
                    tolerance: float, margin: int = 2) -> CropWindow | None:
    """Of ``windows``, one holding ``box`` (plus ``margin``) whose side is within ``tolerance`` x the ``ideal``
    window's, the closest in size; None when ``tolerance`` is 1 or none fits."""
    if tolerance <= 1:
        return None
    x0, y0, x1, y1 = box
    fits = [w for w in windows if ideal.side / tolerance <= w.side <= ideal.side * tolerance
            and w.x0 <= x0 - margin and w.y0 <= y0 - margin
            and x1 + margin < w.x0 + w.side and y1 + margin < w.y0 + w.side]
    return min(fits, key=lambda w: abs(np.log(w.side / ideal.side)), default=None)
