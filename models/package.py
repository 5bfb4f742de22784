"""Model packages: a folder holding ``manifest.yaml`` and one weights file whose SHA-256 the manifest records.

``load_package`` reads and validates the manifest, checks that the weights file exists and matches its hash, and
returns a :class:`ModelPackage`; anything wrong raises :class:`~models.errors.ModelPackageError` naming the package
and the problem. Building the network (``ModelPackage.build_network``) is the only step that imports torch.

Packages are found in the built-in zoo (``models/zoo``), in folders listed in ``$DICOM_NODE_MODEL_PATH``
(``os.pathsep``-separated) and in folders a caller passes explicitly.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.errors import ModelPackageError
from models.types import RoiType

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "MANIFEST_NAME",
    "ZOO_DIR",
    "MODEL_PATH_ENV",
    "Architecture",
    "Intensity",
    "LabelSpec",
    "Manifest",
    "ModelPackage",
    "PackageInfo",
    "PatchConfig",
    "WeightsInfo",
    "find_package",
    "list_packages",
    "load_package",
    "sha256_file",
    "write_package",
]

MANIFEST_NAME = "manifest.yaml"
ZOO_DIR = Path(__file__).resolve().parent / "zoo"
MODEL_PATH_ENV = "DICOM_NODE_MODEL_PATH"
FORMAT_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(_Strict):
    name: str = Field(description="Registered network builder, e.g. 'monai.UNet' (see models.networks).")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the builder.")


class Intensity(_Strict):
    kind: Literal["ct_window"] = Field("ct_window", description="Normalisation: clip to a window, then standardise.")
    lower: float = Field(description="Lower clip value (HU).")
    upper: float = Field(description="Upper clip value (HU).")
    mean: float = Field(0.0, description="Subtracted after clipping.")
    std: float = Field(1.0, gt=0, description="Divisor after subtracting the mean.")

    @model_validator(mode="after")
    def _ordered(self) -> "Intensity":
        if self.upper <= self.lower:
            raise ValueError(f"upper must be > lower, got lower={self.lower}, upper={self.upper}")
        return self


class PatchConfig(_Strict):
    size: tuple[int, int, int] = Field(description="Training patch (Z, Y, X) in voxels at the target spacing.")
    inference: Literal["whole", "sliding"] = Field(
        "whole", description="'whole': the whole resampled volume in one pass; 'sliding': sliding windows of size."
    )
    overlap: float = Field(0.25, ge=0, lt=1, description="Sliding-window overlap (inference='sliding').")
    divisor: int = Field(16, ge=1, description="Whole-volume inference pads each axis to a multiple of this.")


class ReachLawSpec(_Strict):
    """A structure's half-length from its middle slice as a power of that slice's size (models.extent.ReachLaw)."""

    half_mm: float = Field(gt=0, description="Half the z extent, in mm, of a structure whose middle slice has the "
                           "reference diameter.")
    diameter_mm: float = Field(gt=0, description="The reference: median middle-slice equivalent diameter, mm.")
    exponent: float = Field(ge=-1, le=2, description="How the half extent grows with the middle slice's diameter "
                            "(0: a fixed length in mm; 1: a fixed number of diameters, like ``reach``).")


class AbutmentSpec(_Strict):
    """Where a structure ends beside another in the training contours (models.extent.Abutment)."""

    label: str = Field(description="Name of the structure it ends beside (a label of this package).")
    gap_mm: float = Field(description="From its end slice to the other's facing end slice, mm (one slice apart: the "
                          "slice spacing; negative: they overlap).")


class LabelSpec(_Strict):
    name: str = Field(description="TG-263 structure name, e.g. 'Parotid_L'.")
    source_names: tuple[str, ...] = Field(
        (), description="Other names of this structure in training data (e.g. OpenKBP 'LeftParotid')."
    )
    color: tuple[int, int, int] = Field((255, 0, 0), description="Display colour (R, G, B), 0-255.")
    roi_type: RoiType = Field(RoiType.ORGAN, description="RT ROI Interpreted Type.")
    largest_component: bool = Field(
        True, description="Keep the main 3-D connected component(s): drop small, distant fragments "
        "(models.organs.main_components)."
    )
    fill_holes: bool = Field(True, description="Fill enclosed holes after thresholding.")
    mirror: str | None = Field(None, description="Name of the left/right counterpart (for flip augmentation/TTA).")
    threshold: float | None = Field(
        None, gt=0, lt=1, description="Probability threshold for this label; the manifest's ``threshold`` if unset "
        "(a small organ the network draws too thin may be better cut lower: bench/organ_threshold.py)."
    )
    reach: float | None = Field(
        None, gt=0, description="Prompted engines: median distance from the structure's middle slice to its ends "
        "in the training contours, in equivalent diameters of the middle slice (models.extent.learned_reach); "
        "bounds how far propagation goes past a seed."
    )
    reach_law: ReachLawSpec | None = Field(
        None, description="Prompted engines: the reach fitted against the middle slice's size over the training "
        "contours (models.extent.fit_reach_law); used instead of ``reach`` when present."
    )
    growth: float | None = Field(
        None, gt=0, description="Prompted engines: how much the structure's area grows from one slice to the next "
        "going outward from its middle slice in the training contours (the largest step over the training cases, "
        "models.extent.learn_growth); propagation's leak guard stops its fronts only beyond the "
        "larger of this and max_growth."
    )
    abuts: AbutmentSpec | None = Field(
        None, description="Prompted engines: the structure this one ends beside in every training case, give or take "
        "a slice (models.extent.fit_abutments); its seeded fronts end where that structure's extent says."
    )


class WeightsInfo(_Strict):
    file: str = Field(description="Weights file name inside the package folder.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the weights file, lower-case hex.")
    format: Literal["torch_state_dict"] = Field("torch_state_dict", description="How the weights are stored.")
    dtype: Literal["float32", "float16"] = Field("float32", description="Stored precision of floating tensors.")


class Manifest(_Strict):
    format_version: int = Field(FORMAT_VERSION, description="Manifest format version.")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="Model name used in routing rules.")
    version: str = Field(description="Model version.")
    task: Literal["segmentation"] = Field("segmentation", description="What the model does.")
    description: str = Field("", description="Free text shown by 'models list'.")
    modality: str = Field("CT", description="Input modality.")
    architecture: Architecture
    target_spacing: tuple[float, float, float] = Field(description="Model spacing (x, y, z) in mm.")
    intensity: Intensity
    patch: PatchConfig
    threshold: float = Field(0.5, gt=0, lt=1, description="Probability threshold per label (sigmoid outputs).")
    labels: tuple[LabelSpec, ...] = Field(min_length=1, description="Output channels, in order.")
    weights: WeightsInfo
    training: dict[str, Any] = Field(default_factory=dict, description="Training data summary and settings.")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Metrics on the validation set.")

    def label_thresholds(self) -> list[float]:
        """The probability threshold of each output channel."""
        return [self.threshold if lab.threshold is None else lab.threshold for lab in self.labels]

    @model_validator(mode="after")
    def _labels_consistent(self) -> "Manifest":
        names = [lab.name for lab in self.labels]
        if len(set(names)) != len(names):
            raise ValueError(f"label names must be unique, got {names}")
        for lab in self.labels:
            if lab.mirror is not None and lab.mirror not in names:
                raise ValueError(f"label {lab.name!r}: mirror {lab.mirror!r} is not one of {names}")
            if lab.abuts is not None and (lab.abuts.label not in names or lab.abuts.label == lab.name):
                raise ValueError(f"label {lab.name!r}: abuts {lab.abuts.label!r}, which is not one of the other "
                                 f"labels {[n for n in names if n != lab.name]}")
        if any(s <= 0 for s in self.target_spacing):
            raise ValueError(f"target_spacing must be positive, got {self.target_spacing}")
        return self

    @property
    def label_names(self) -> list[str]:
        return [lab.name for lab in self.labels]

    def mirror_permutation(self) -> list[int]:
        """Channel order after a left/right flip: each label takes its mirror's channel."""
        index = {lab.name: i for i, lab in enumerate(self.labels)}
        return [index[lab.mirror] if lab.mirror else i for i, lab in enumerate(self.labels)]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelPackage:
    """A validated package on disk: its folder and manifest. The weights are read by ``build_network``."""

    path: Path
    manifest: Manifest

    @property
    def weights_path(self) -> Path:
        return self.path / self.manifest.weights.file

    def build_network(self, device: str = "cpu") -> "torch.nn.Module":
        """The network with the package's weights, in eval mode, on ``device``."""
        import torch

        from models.networks import build_network

        net = build_network(self.manifest.architecture.name, self.manifest.architecture.params)
        try:
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a damaged file
            raise ModelPackageError(f"{self.path}: cannot read weights {self.weights_path.name}: {exc}") from exc
        try:
            net.load_state_dict({k: v.float() for k, v in state.items()})
        except (RuntimeError, AttributeError) as exc:
            raise ModelPackageError(
                f"{self.path}: weights do not fit architecture {self.manifest.architecture.name}: {exc}"
            ) from exc
        return net.to(device).eval()


def _read_manifest(path: Path) -> Manifest:
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        raise ModelPackageError(f"{path}: not a model package folder (does not exist or is not a folder)")
    if not manifest_path.is_file():
        raise ModelPackageError(f"{path}: incomplete package, {MANIFEST_NAME} is missing")
    try:
        raw = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ModelPackageError(f"{manifest_path}: unreadable manifest: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelPackageError(f"{manifest_path}: manifest must be a mapping, got {type(raw).__name__}")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ModelPackageError(f"{manifest_path}: invalid manifest: {problems}") from exc


def load_package(path: str | Path, *, verify: bool = True) -> ModelPackage:
    """Read, validate and (by default) hash-check the package in folder ``path``."""
    path = Path(path)
    manifest = _read_manifest(path)
    weights = path / manifest.weights.file
    if not weights.is_file():
        raise ModelPackageError(f"{path}: incomplete package, weights file {manifest.weights.file!r} is missing")
    if verify:
        actual = sha256_file(weights)
        if actual != manifest.weights.sha256:
            raise ModelPackageError(
                f"{path}: weights file {manifest.weights.file!r} is corrupted or replaced: "
                f"SHA-256 {actual} does not match the manifest's {manifest.weights.sha256}"
            )
    return ModelPackage(path=path, manifest=manifest)


def write_package(
    path: str | Path, manifest_fields: dict[str, Any], state_dict: dict[str, Any], *, dtype: str = "float16"
) -> ModelPackage:
    """Write ``state_dict`` and a manifest (``manifest_fields`` without ``weights``) into folder ``path``."""
    import torch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cast = torch.float16 if dtype == "float16" else torch.float32
    state = {k: (v.detach().cpu().to(cast) if v.is_floating_point() else v.detach().cpu()) for k, v in state_dict.items()}
    weights_file = "weights.pt"
    tmp = path / (weights_file + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path / weights_file)
    fields = dict(manifest_fields)
    fields["weights"] = {"file": weights_file, "sha256": sha256_file(path / weights_file), "dtype": dtype}
    manifest = Manifest.model_validate(fields)
    write_manifest(path, manifest)
    return ModelPackage(path=path, manifest=manifest)


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Write ``manifest.yaml`` atomically (e.g. to record new metrics; the weights hash stays)."""
    data = manifest.model_dump(mode="json")
    tmp = path / (MANIFEST_NAME + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, path / MANIFEST_NAME)


@dataclass(frozen=True)
class PackageInfo:
    """One package found by :func:`list_packages`; ``error`` is set when it does not load."""

    name: str
    version: str
    path: Path
    labels: tuple[str, ...]
    error: str | None = None
    architecture: str = "?"


def search_dirs(extra: list[Path] | None = None) -> list[Path]:
    """Folders searched for packages: the built-in zoo, ``$DICOM_NODE_MODEL_PATH``, then ``extra``."""
    dirs = [ZOO_DIR]
    env = os.environ.get(MODEL_PATH_ENV, "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs += list(extra or [])
    return dirs


def list_packages(extra_dirs: list[Path] | None = None, *, verify: bool = False) -> list[PackageInfo]:
    """Every package folder (a child holding ``manifest.yaml``) in :func:`search_dirs`."""
    found: list[PackageInfo] = []
    for root in search_dirs(extra_dirs):
        if not root.is_dir():
            continue
        for child in sorted(p for p in root.iterdir() if (p / MANIFEST_NAME).is_file()):
            try:
                m = load_package(child, verify=verify).manifest
                found.append(PackageInfo(m.name, m.version, child, tuple(m.label_names),
                                         architecture=m.architecture.name))
            except ModelPackageError as exc:
                found.append(PackageInfo(child.name, "?", child, (), error=str(exc)))
    return found


def find_package(name: str, extra_dirs: list[Path] | None = None) -> ModelPackage:
    """Load the first valid package called ``name`` in :func:`search_dirs`."""
    candidates = [p for p in list_packages(extra_dirs) if p.name == name]
    if not candidates:
        known = sorted({p.name for p in list_packages(extra_dirs) if p.error is None})
        raise ModelPackageError(f"no model package named {name!r}; installed: {known}")
    return load_package(candidates[0].path)
