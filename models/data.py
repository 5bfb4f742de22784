"""Training cases from NPZ files, whichever key names they use.

Accepted layouts (first match wins), all arrays (Z, Y, X):

- image: the first of ``image_keys`` present (``image`` from ``dicom-node convert``, ``ct`` from OpenKBP), in HU;
- structures: ``<mask_prefix><name>`` binary masks, where name is the TG-263 name or any of its ``source_names``;
  or an integer label map under ``label_map_key`` with a name table under ``label_names_key`` (entry ``v`` names
  the voxels equal to ``v``);
- spacing under ``spacing_key`` in ``spacing_order`` (OpenKBP: (sz, sy, sx));
- optionally ``direction`` (row-major 3x3, columns = array x, y, z axes in patient LPS, as ``dicom-node convert``
  writes it): the case is then transposed/flipped to the models' orientation (axial, LPS), as inference does.

A structure absent from a case is *unknown* for that case (``present`` is False), not empty: losses and metrics skip
it, because clinics contour only the organs a plan needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import TrainingError

__all__ = ["KeyMap", "LabelSource", "NpzCase", "find_cases", "read_npz"]


@dataclass(frozen=True)
class KeyMap:
    image_keys: tuple[str, ...] = ("image", "ct")
    spacing_key: str = "spacing"
    spacing_order: str = "zyx"
    mask_prefix: str = "mask_"
    label_map_key: str = "labels"
    label_names_key: str = "label_names"


@dataclass(frozen=True)
class LabelSource:
    name: str
    source_names: tuple[str, ...] = ()

    @property
    def all_names(self) -> tuple[str, ...]:
        return (self.name, *self.source_names)


@dataclass(frozen=True)
class NpzCase:
    case_id: str
    image: np.ndarray  # (Z, Y, X) HU
    spacing_xyz: tuple[float, float, float]
    masks: np.ndarray  # (C, Z, Y, X) uint8
    present: np.ndarray  # (C,) bool


def find_cases(dirs: Sequence[Path]) -> list[Path]:
    """All ``*.npz`` files in ``dirs``, sorted by name within each folder."""
    paths: list[Path] = []
    for d in dirs:
        if not Path(d).is_dir():
            raise TrainingError(f"data folder {d} does not exist")
        paths += sorted(Path(d).glob("*.npz"), key=lambda p: (len(p.stem), p.stem))
    return paths


def _mask_for(data: np.lib.npyio.NpzFile, label: LabelSource, keys: KeyMap, table: list[str] | None) -> np.ndarray | None:
    for n in label.all_names:
        key = keys.mask_prefix + n
        if key in data.files:
            return np.asarray(data[key]) > 0
    if table is not None:
        for n in label.all_names:
            if n in table:
                return np.asarray(data[keys.label_map_key]) == table.index(n)
    return None


def read_npz(path: Path, labels: Sequence[LabelSource], keys: KeyMap = KeyMap()) -> NpzCase:
    """One case; raises :class:`TrainingError` when the image or spacing is missing or shapes disagree."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{path}: not a readable NPZ file: {exc}") from exc
    with data:
        image_key = next((k for k in keys.image_keys if k in data.files), None)
        if image_key is None:
            raise TrainingError(f"{path}: no image; looked for keys {list(keys.image_keys)}, found {data.files}")
        if keys.spacing_key not in data.files:
            raise TrainingError(f"{path}: no spacing key {keys.spacing_key!r}")
        image = np.asarray(data[image_key])
        spacing = np.asarray(data[keys.spacing_key], dtype=float).reshape(3)
        spacing_xyz = tuple(float(s) for s in (spacing[::-1] if keys.spacing_order == "zyx" else spacing))
        direction = np.asarray(data["direction"], float).reshape(3, 3) if "direction" in data.files else None
        table = None
        if keys.label_map_key in data.files and keys.label_names_key in data.files:
            table = [str(n) for n in data[keys.label_names_key]]
        masks = np.zeros((len(labels), *image.shape), dtype=np.uint8)
        present = np.zeros(len(labels), dtype=bool)
        for c, label in enumerate(labels):
            m = _mask_for(data, label, keys, table)
            if m is None:
                continue
            if m.shape != image.shape:
                raise TrainingError(f"{path}: mask {label.name} has shape {m.shape}, image {image.shape}")
            masks[c], present[c] = m, bool(m.any())
    if image.ndim != 3:
        raise TrainingError(f"{path}: image must be 3-D (Z, Y, X), got shape {image.shape}")
    if direction is not None:  # `dicom-node convert` keeps the series' own orientation: bring it to the models'
        image, masks, spacing_xyz = _canonical(path, image, masks, spacing_xyz, direction)
    return NpzCase(path.stem, image, spacing_xyz, masks, present)  # type: ignore[arg-type]


def _canonical(path: Path, image: np.ndarray, masks: np.ndarray, spacing_xyz: tuple[float, float, float],
               direction: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    from models.errors import ModelInputError
    from models.organs import canonical_axes

    try:
        transpose, flips = canonical_axes(tuple(direction.ravel()))
    except ModelInputError as exc:
        raise TrainingError(f"{path}: {exc}") from exc
    if transpose == (0, 1, 2) and not any(flips):
        return image, masks, spacing_xyz
    axes = [a for a in range(3) if flips[a]]
    image = np.ascontiguousarray(np.flip(np.transpose(image, transpose), axes))
    masks = np.ascontiguousarray(np.flip(np.transpose(masks, (0, *[t + 1 for t in transpose])), [a + 1 for a in axes]))
    zyx = np.asarray(spacing_xyz, float)[::-1][list(transpose)]
    return image, masks, (float(zyx[2]), float(zyx[1]), float(zyx[0]))
