"""Register a prior CT to a new one and carry its contours across (pure functions, SimpleITK in memory).

``register(fixed, moving)`` finds the transform mapping points of the *fixed* (new) grid into the *moving* (prior)
one, which is what resampling the prior onto the new grid needs: first rigid (Euler 3-D, centres of the two grids
aligned to start), then, optionally, a B-spline deformation on a coarse control-point mesh. Both stages use Mattes
mutual information (robust to the two scans' different contrast and noise) on a random fraction of the voxels,
over a multi-resolution pyramid. Geometry (origin, spacing, direction) is taken from each :class:`Volume`, so
two series on different frames of reference register like any other pair.

``map_masks`` resamples the prior's masks through that transform (linear, thresholded at one half: smoother than
nearest neighbour at 4 mm pixels), ``key_slices`` picks slices of a mapped mask to prompt propagation from, and
``simulate_follow_up`` makes a test follow-up scan of a real CT: a random smooth deformation plus a rigid motion.

SimpleITK uses ``sitk.ProcessObject_GetGlobalDefaultNumberOfThreads()`` threads; callers set it (the node's
worker, the benchmark) to share the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from models.errors import ModelInputError
from models.types import Volume

__all__ = ["RegistrationSettings", "Registration", "FollowUp", "to_sitk", "register", "map_masks", "key_slices",
           "simulate_follow_up"]

log = logging.getLogger(__name__)
AIR = -1024.0  # HU written where a resampled image has no data


@dataclass(frozen=True)
class RegistrationSettings:
    """Knobs of :func:`register`; defaults register a 128^3 head-and-neck CT in seconds on 2 threads."""

    bins: int = 32  # Mattes histogram bins
    sampling: float = 0.1  # fraction of voxels sampled per metric evaluation
    shrink: tuple[int, ...] = (4, 2, 1)  # pyramid: shrink factor per level ...
    smoothing_mm: tuple[float, ...] = (4.0, 2.0, 0.0)  # ... and Gaussian sigma per level
    rigid_iterations: int = 200
    mesh_mm: float = 60.0  # B-spline control-point spacing (a head-and-neck CT gets a mesh of ~4 per axis)
    bspline_iterations: int = 30
    bspline_shrink: tuple[int, ...] = (4, 2)
    bspline_smoothing_mm: tuple[float, ...] = (4.0, 2.0)
    clip_hu: tuple[float, float] = (-1000.0, 2000.0)  # metal and air beyond this carry no alignment information
    seed: int = 1  # of the metric's random sampling: the same pair registers the same way

    def __post_init__(self) -> None:
        if not 0 < self.sampling <= 1:
            raise ValueError(f"sampling must be > 0 and <= 1, got {self.sampling}")
        if len(self.shrink) != len(self.smoothing_mm) or len(self.bspline_shrink) != len(self.bspline_smoothing_mm):
            raise ValueError("each pyramid needs one smoothing sigma per shrink factor, got "
                             f"{self.shrink}/{self.smoothing_mm} and {self.bspline_shrink}/{self.bspline_smoothing_mm}")
        if self.mesh_mm <= 0:
            raise ValueError(f"mesh_mm must be > 0, got {self.mesh_mm}")


@dataclass(frozen=True)
class Registration:
    """A fixed-to-moving transform and how well each stage ended (Mattes MI: lower is better)."""

    transform: sitk.Transform
    rigid_metric: float
    deformable_metric: float | None = None


def to_sitk(volume: Volume, array: np.ndarray | None = None) -> sitk.Image:
    """``volume`` (or ``array`` on its grid) as a SimpleITK image with the same geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array if array is None else array))
    image.SetSpacing([float(v) for v in volume.spacing])
    image.SetOrigin([float(v) for v in volume.origin])
    image.SetDirection([float(v) for v in volume.direction])
    return image


def _prepared(volume: Volume, s: RegistrationSettings) -> sitk.Image:
    return to_sitk(volume, np.clip(volume.array.astype(np.float32), *s.clip_hu))


def _method(s: RegistrationSettings, iterations: int, shrink: tuple[int, ...],
            smoothing: tuple[float, ...]) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=s.bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(s.sampling, s.seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(smoothing))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def _rigid(fixed: sitk.Image, moving: sitk.Image, s: RegistrationSettings) -> tuple[sitk.Transform, float]:
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = _method(s, s.rigid_iterations, s.shrink, s.smoothing_mm)
    # Steps in mm: scales make one radian comparable to the shift it causes at the image's edge.
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=0.01,
                                                 numberOfIterations=s.rigid_iterations, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(initial, inPlace=False)
    transform = reg.Execute(fixed, moving)
    return transform, float(reg.GetMetricValue())


def _bspline(fixed: sitk.Image, moving: sitk.Image, rigid: sitk.Transform,
             s: RegistrationSettings) -> tuple[sitk.Transform, float]:
    extent = [n * d for n, d in zip(fixed.GetSize(), fixed.GetSpacing())]
    mesh = [max(1, int(round(e / s.mesh_mm))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = _method(s, s.bspline_iterations, s.bspline_shrink, s.bspline_smoothing_mm)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=s.bspline_iterations,
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * s.bspline_iterations)
    reg.SetMovingInitialTransform(rigid)  # the B-spline is optimised on top of the fixed rigid result
    reg.SetInitialTransform(bspline, inPlace=True)
    reg.Execute(fixed, moving)
    composite = sitk.CompositeTransform(3)
    # ITK applies a composite's last-added transform first: fixed point -> B-spline -> rigid -> moving point.
    composite.AddTransform(rigid)
    composite.AddTransform(bspline)
    return composite, float(reg.GetMetricValue())


def register(fixed: Volume, moving: Volume, deformable: bool = True,
             settings: RegistrationSettings | None = None) -> Registration:
    """The transform taking points of ``fixed`` (the new scan) to ``moving`` (the prior): rigid, then B-spline."""
    s = settings or RegistrationSettings()
    f, m = _prepared(fixed, s), _prepared(moving, s)
    rigid, rigid_metric = _rigid(f, m, s)
    log.debug("rigid registration: metric %.4f, %s", rigid_metric, rigid.GetParameters())
    if not deformable:
        return Registration(rigid, rigid_metric)
    transform, metric = _bspline(f, m, rigid, s)
    log.debug("deformable registration: metric %.4f", metric)
    return Registration(transform, rigid_metric, metric)


def _dense(transform: sitk.Transform, reference: sitk.Image) -> sitk.Transform:
    """``transform`` sampled once per voxel of ``reference``: resampling through a B-spline composite costs
    ~6x more per image than through its displacement field, and a prior carries a dozen masks."""
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, reference.GetSize(),
                                              reference.GetOrigin(), reference.GetSpacing(), reference.GetDirection())
    return sitk.DisplacementFieldTransform(field)


def map_masks(masks: Mapping[str, np.ndarray], moving: Volume, fixed: Volume,
              transform: sitk.Transform) -> dict[str, np.ndarray]:
    """Masks on the ``moving`` grid -> masks on the ``fixed`` grid (linear interpolation, kept where >= 0.5)."""
    reference = to_sitk(fixed, np.zeros(fixed.shape, np.uint8))
    if masks and not isinstance(transform, (sitk.Euler3DTransform, sitk.AffineTransform)):
        transform = _dense(transform, reference)
    out = {}
    for name, mask in masks.items():
        if mask.shape != moving.shape:
            raise ModelInputError(f"mask {name!r} has shape {mask.shape}, the prior volume is {moving.shape}")
        image = to_sitk(moving, mask.astype(np.float32))
        mapped = sitk.Resample(image, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        out[name] = sitk.GetArrayFromImage(mapped) >= 0.5
    return out


def key_slices(mask: np.ndarray, count: int = 3) -> list[int]:
    """``count`` slices spread over the mask's z extent (the middle for 1; 1/4, 1/2, 3/4 for 3), each holding
    the mask: where propagation is prompted from the mapped prior."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    zs = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    if zs.size == 0:
        return []
    wanted = [(zs[0] + zs[-1]) / 2.0] if count == 1 else [zs[0] + (zs[-1] - zs[0]) * f
                                                          for f in np.linspace(0.25, 0.75, count)]
    return sorted({int(zs[np.argmin(np.abs(zs - w))]) for w in wanted})


# --- simulated follow-up scans --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FollowUp:
    """A simulated follow-up: image and masks on the same grid as the prior, and the motion that made them."""

    image: np.ndarray  # (Z, Y, X) HU, int16 like the input
    masks: dict[str, np.ndarray]  # bool (Z, Y, X)
    shift_mm: tuple[float, float, float]  # rigid translation (x, y, z)
    rotation_deg: tuple[float, float, float]  # rigid rotation about the grid's centre (x, y, z axes)
    max_deformation_mm: float  # largest B-spline control-point displacement, a bound on the deformation


def simulate_follow_up(image: np.ndarray, masks: Mapping[str, np.ndarray], spacing_zyx: tuple[float, float, float],
                       seed: int, *, deformation_mm: float = 6.0, mesh: int = 3, shift_mm: float = 8.0,
                       rotation_deg: float = 4.0) -> FollowUp:
    """A follow-up scan of ``image``: new(p) = prior(R(D(p))), with D a cubic B-spline deformation whose
    control points (``mesh`` cells per axis) move by independent uniform draws in [-deformation_mm,
    deformation_mm] per axis (a cubic B-spline's displacement never exceeds its largest coefficient), and R a
    rigid motion: rotation uniform in [-rotation_deg, rotation_deg] about each axis through the grid's centre,
    translation uniform in [-shift_mm, shift_mm] per axis. Everything is drawn from ``numpy.random.default_rng
    (seed)``, so one seed gives one scan. Masks go through the same motion (linear, kept where >= 0.5); air
    fills what moves into the field."""
    rng = np.random.default_rng(seed)
    grid = Volume(array=image, spacing=tuple(float(v) for v in spacing_zyx[::-1]), origin=(0.0, 0.0, 0.0))  # type: ignore[arg-type]
    reference = to_sitk(grid, np.zeros(image.shape, np.uint8))
    bspline = sitk.BSplineTransformInitializer(reference, [mesh] * 3, order=3)
    coefficients = rng.uniform(-deformation_mm, deformation_mm, len(bspline.GetParameters()))
    bspline.SetParameters(coefficients.tolist())
    centre = reference.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in reference.GetSize()])
    angles = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3))
    shift = rng.uniform(-shift_mm, shift_mm, 3)
    rigid = sitk.Euler3DTransform(centre, *angles.tolist(), shift.tolist())
    motion = sitk.CompositeTransform(3)
    motion.AddTransform(rigid)
    motion.AddTransform(bspline)  # applied first
    motion = _dense(motion, reference)
    moved = sitk.Resample(to_sitk(grid, image.astype(np.float32)), reference, motion, sitk.sitkLinear, AIR,
                          sitk.sitkFloat32)
    new_image = np.round(sitk.GetArrayFromImage(moved)).astype(image.dtype)
    new_masks = map_masks(masks, grid, grid, motion)
    return FollowUp(new_image, new_masks, tuple(shift.tolist()), tuple(np.rad2deg(angles).tolist()),  # type: ignore[arg-type]
                    float(np.abs(coefficients).max()))
