"""Organ segmentation with a packaged U-Net: resample → normalise → network → post-process → resample back.

The network is injected (``network=``): tests pass a seeded toy network and need no weights; without one, the
package's own weights are loaded. Arrays are (Z, Y, X) and spacings (x, y, z) as in :mod:`models.types`; the image is
assumed axial with rows/columns along patient axes (the grid of an axial CT series), which is how the model was
trained. Everything here takes values and returns values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from models import onnx_cpu
from models.errors import ModelInputError
from models.networks import SliceStack
from models.package import Intensity, LabelSpec, Manifest, ModelPackage, load_package
from models.types import Structure, Volume

__all__ = [
    "cached_network",
    "canonical_axes",
    "network_logits",
    "normalise",
    "main_components",
    "onnx_slices",
    "postprocess",
    "predict_probabilities",
    "resample",
    "resampled_shape",
    "resolve_device",
    "segment",
    "segment_volume",
]


def resolve_device(choice: str = "auto") -> str:
    """'auto' is CUDA when torch sees a GPU, else CPU; an explicit 'cuda' without one is an input error."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ModelInputError(f"device {choice!r} requested but CUDA is not available")
    return choice


@lru_cache(maxsize=4)
def _network_for(path: Path, sha256: str, device: str) -> torch.nn.Module:
    network = load_package(path).build_network(device)
    return onnx_slices(network) if device == "cpu" and onnx_cpu.available() else network


def cached_network(package: ModelPackage, device: str = "cpu") -> torch.nn.Module:
    """The package's network, built once per (folder, weights hash, device): a replaced package is rebuilt. On CPU
    a slice network's 2-D part runs in ONNX Runtime when installed (:func:`onnx_slices`)."""
    return _network_for(package.path, package.manifest.weights.sha256, device)


def onnx_slices(network: torch.nn.Module) -> torch.nn.Module:
    """``network`` with the 2-D part of a :class:`~models.networks.SliceStack` run by ONNX Runtime: hn-oar 2.0.0
    computes 32 slices of 176² in 0.83 s instead of 1.58 s in torch eager on this 2-core CPU, logits equal
    within 5e-5 (tests/test_models_package.py). Other networks are returned unchanged."""
    if not isinstance(network, SliceStack) or isinstance(network.net, onnx_cpu.OnnxModule):
        return network
    channels = network.slice_channels
    name = f"slices-{onnx_cpu.weights_key(network.net, str(channels))}"
    example = torch.zeros(2, channels, 64, 64)
    axes = {0: "batch", 2: "rows", 3: "columns"}
    network.net = onnx_cpu.OnnxModule(onnx_cpu.session(network.net, example, name, axes))
    return network


def canonical_axes(direction: Sequence[float]) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """How to bring a (Z, Y, X) array with ``direction`` to the models' orientation (columns toward patient left,
    rows toward posterior, slices toward the head: LPS identity): ``transpose`` axes, then flip where set.

    Raises :class:`ModelInputError` for a grid more than 30 degrees off every patient axis.
    """
    d = np.asarray(direction, float).reshape(3, 3)  # column i: patient direction of array axis i (x, y, z)
    patient_of = np.abs(d).argmax(axis=0)
    if sorted(patient_of) != [0, 1, 2] or np.abs(d).max(axis=0).min() < np.cos(np.radians(30)):
        raise ModelInputError(f"image orientation {tuple(np.round(d.T.ravel(), 3))} is too oblique for the model")
    # numpy axis a of the canonical array is patient axis 2 - a; it comes from array axis i = index of that patient axis
    source_xyz = [int(np.flatnonzero(patient_of == 2 - a)[0]) for a in range(3)]
    transpose = tuple(2 - i for i in source_xyz)
    flips = tuple(bool(d[patient_of[i], i] < 0) for i in source_xyz)
    return transpose, flips  # type: ignore[return-value]


def resampled_shape(shape_zyx: Sequence[int], spacing_xyz: Sequence[float], target_xyz: Sequence[float]) -> tuple[int, int, int]:
    """Shape (Z, Y, X) of the grid with spacing ``target_xyz`` covering the same extent."""
    zyx_sp = np.asarray(spacing_xyz, float)[::-1]
    zyx_tg = np.asarray(target_xyz, float)[::-1]
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape_zyx, zyx_sp, zyx_tg))  # type: ignore[return-value]


def resample(
    array: np.ndarray,
    spacing_xyz: Sequence[float],
    out_spacing_xyz: Sequence[float],
    out_shape_zyx: Sequence[int] | None = None,
    *,
    linear: bool = True,
) -> np.ndarray:
    """Resample (Z, Y, X) or (Z, Y, X, C) ``array`` onto a grid sharing voxel (0, 0, 0), as float32 (linear) or
    the input dtype (nearest). Points beyond the source extent take the nearest edge value."""
    if out_shape_zyx is None:
        out_shape_zyx = resampled_shape(array.shape[:3], spacing_xyz, out_spacing_xyz)
    if tuple(out_shape_zyx) == array.shape[:3] and np.allclose(spacing_xyz, out_spacing_xyz, rtol=0, atol=1e-3):
        return array.astype(np.float32) if linear else array.copy()
    import SimpleITK as sitk  # imported here: training on prepared (already resampled) data does not need it

    vector = array.ndim == 4
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32 if linear else None), isVector=vector)
    img.SetSpacing(tuple(float(s) for s in spacing_xyz))
    f = sitk.ResampleImageFilter()
    f.SetOutputSpacing(tuple(float(s) for s in out_spacing_xyz))
    f.SetSize([int(n) for n in reversed(out_shape_zyx)])
    f.SetOutputOrigin((0.0, 0.0, 0.0))
    f.SetInterpolator(sitk.sitkLinear if linear else sitk.sitkNearestNeighbor)
    f.SetUseNearestNeighborExtrapolator(True)
    return sitk.GetArrayFromImage(f.Execute(img))


def normalise(image: np.ndarray, intensity: Intensity) -> np.ndarray:
    """Clip to the manifest's window and standardise; float32."""
    out = np.clip(image.astype(np.float32, copy=False), intensity.lower, intensity.upper)
    return (out - intensity.mean) / intensity.std


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _whole_volume(network: torch.nn.Module, x: torch.Tensor, divisor: int, pad_value: float) -> torch.Tensor:
    shape = x.shape[2:]
    pads = [(-n) % divisor for n in shape]
    padded = F.pad(x, [p for d in reversed(pads) for p in (0, d)], value=pad_value)
    out = network(padded)
    return out[:, :, : shape[0], : shape[1], : shape[2]]


def network_logits(network: torch.nn.Module, x: torch.Tensor, manifest: Manifest) -> torch.Tensor:
    """Logits (B, C, Z, Y, X) for a normalised (B, 1, Z, Y, X) tensor, whole-volume or sliding-window."""
    patch = manifest.patch
    if patch.inference == "whole":
        return _whole_volume(network, x, patch.divisor, float(x.min()))
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(x, patch.size, 1, network, overlap=patch.overlap, mode="gaussian")


def predict_probabilities(
    network: torch.nn.Module, image: np.ndarray, manifest: Manifest, *, device: str = "cpu", tta: bool = False
) -> np.ndarray:
    """Sigmoid probabilities (C, Z, Y, X) float32 for a normalised image at the model spacing."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        prob = torch.sigmoid(network_logits(network, x, manifest).float())
        if tta:
            flipped = torch.sigmoid(network_logits(network, torch.flip(x, dims=[4]), manifest).float())
            flipped = torch.flip(flipped, dims=[4])[:, manifest.mirror_permutation()]
            prob = (prob + flipped) / 2
    return prob[0].cpu().numpy()


# A structure split by a one-voxel gap is still one organ: thin organs (brainstem, cord) at ~4 mm come out of the
# network in fragments, and keeping the single largest fragment cost 0.15 Dice on the brainstem (hn-oar 1.0.0,
# 12 validation cases). Fragments closer than this many voxels are grouped, and every group holding at least
# KEEP_FRACTION of the largest group's voxels is kept; far, small specks are still removed.
GROUP_GAP_VOXELS = 1
KEEP_FRACTION = 0.2


def main_components(mask: np.ndarray, gap: int = GROUP_GAP_VOXELS, keep_fraction: float = KEEP_FRACTION) -> np.ndarray:
    """``mask`` without its small, distant fragments (see GROUP_GAP_VOXELS)."""
    grouped = ndimage.binary_dilation(mask, iterations=gap) if gap else mask
    labelled, n = ndimage.label(grouped)
    if n <= 1:
        return mask
    sizes = np.bincount(labelled[mask], minlength=n + 1)  # voxels of the mask itself per group
    keep = sizes >= keep_fraction * sizes.max()
    keep[0] = False
    return mask & keep[labelled]


def postprocess(mask: np.ndarray, spec: LabelSpec) -> np.ndarray:
    """Main connected components and hole filling, as the label's anatomy asks."""
    if not mask.any():
        return mask
    if spec.largest_component:
        mask = main_components(mask)
    if spec.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return mask


def _check_input(image: np.ndarray, spacing_xyz: Sequence[float], manifest: Manifest) -> None:
    if image.ndim != 3:
        raise ModelInputError(f"image must be 3-D (Z, Y, X), got shape {image.shape}")
    if len(spacing_xyz) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing_xyz):
        raise ModelInputError(f"spacing must be 3 positive numbers (x, y, z) mm, got {tuple(spacing_xyz)}")
    if min(image.shape) < 2:
        raise ModelInputError(f"image must have at least 2 voxels along each axis, got shape {image.shape}")


def segment(
    image_zyx: np.ndarray,
    spacing_xyz: Sequence[float],
    package: ModelPackage | Manifest,
    *,
    network: torch.nn.Module | None = None,
    device: str = "cpu",
    threads: int | None = None,
    tta: bool = False,
) -> dict[str, np.ndarray]:
    """Masks {TG-263 name: bool (Z, Y, X)} on the input grid for an image in HU.

    ``package`` is a loaded package (its weights are used unless ``network`` is given) or a bare manifest (then
    ``network`` is required).
    """
    manifest = package.manifest if isinstance(package, ModelPackage) else package
    _check_input(image_zyx, spacing_xyz, manifest)
    with _threads(threads):
        if network is None:
            if not isinstance(package, ModelPackage):
                raise ModelInputError("segment() needs a network when given a bare manifest")
            network = package.build_network(device)
        network.eval()
        small = resample(image_zyx, spacing_xyz, manifest.target_spacing)
        prob = predict_probabilities(network, normalise(small, manifest.intensity), manifest, device=device, tta=tta)
        back = resample(np.moveaxis(prob, 0, -1), manifest.target_spacing, spacing_xyz, image_zyx.shape)
    if back.ndim == 3:  # a single channel comes back without the vector axis
        back = back[..., None]
    cuts = manifest.label_thresholds()
    return {spec.name: postprocess(back[..., c] >= cuts[c], spec) for c, spec in enumerate(manifest.labels)}


def segment_volume(volume: Volume, package: ModelPackage | Manifest, **kwargs: object) -> list[Structure]:
    """:func:`segment` on a :class:`Volume` of any axial-ish orientation (brought to the models' orientation and
    back), as TG-263-named :class:`Structure` objects (empty masks dropped)."""
    manifest = package.manifest if isinstance(package, ModelPackage) else package
    transpose, flips = canonical_axes(volume.direction)
    image = np.transpose(volume.array, transpose)
    image = np.flip(image, [a for a in range(3) if flips[a]]) if any(flips) else image
    spacing_zyx = np.asarray(volume.spacing, float)[::-1][list(transpose)]
    masks = segment(image, tuple(spacing_zyx[::-1]), package, **kwargs)  # type: ignore[arg-type]
    inverse = tuple(int(i) for i in np.argsort(transpose))

    def back(mask: np.ndarray) -> np.ndarray:
        mask = np.flip(mask, [a for a in range(3) if flips[a]]) if any(flips) else mask
        return np.ascontiguousarray(np.transpose(mask, inverse))

    return [
        Structure(
            name=spec.name,
            mask=back(masks[spec.name]),
            color=spec.color,
            roi_type=spec.roi_type,
            algorithm=manifest.name,
            algorithm_version=manifest.version,
        )
        for spec in manifest.labels
        if masks[spec.name].any()
    ]
