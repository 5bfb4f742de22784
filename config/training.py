"""Schema of ``train.yaml``: where the NPZ cases are, which structures to learn, the network, and how to train.

Loaded by ``dicom-node train --config``; every field is documented and unknown keys are refused, so a typo fails
at start-up with its key path. See ``config/train.example.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from config.node import ConfigError, format_validation_errors

RunConfigT = TypeVar("RunConfigT", bound=BaseModel)

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "LabelConfig",
    "NetworkConfig",
    "OptimConfig",
    "TrainingConfig",
    "load_training_config",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NpzData(_Strict):
    """Where NPZ cases are and how they are read; shared by organ training and prompt-engine fine-tuning."""

    train_dirs: list[Path] = Field(min_length=1, description="Folders of training NPZ cases (*.npz).")
    val_dirs: list[Path] = Field(default_factory=list, description="Folders of validation NPZ cases (model selection).")
    image_keys: list[str] = Field(
        ["image", "ct"], min_length=1, description="NPZ keys tried in order for the image (HU, (Z, Y, X)).")
    spacing_key: str = Field("spacing", description="NPZ key of the voxel spacing (mm).")
    spacing_order: Literal["zyx", "xyz"] = Field(
        "zyx", description="Order of the spacing array: OpenKBP stores (sz, sy, sx) = 'zyx'.")
    mask_prefix: str = Field("mask_", description="Binary masks are stored as <prefix><structure name>.")
    label_map_key: str = Field(
        "labels", description="Alternative to masks: an integer label map under this key (value v = name table[v]).")
    label_names_key: str = Field("label_names", description="NPZ key of the name table for the label map.")
    max_train_cases: int | None = Field(None, ge=1, description="Use only the first N training cases (tests, tries).")
    max_val_cases: int | None = Field(None, ge=1, description="Use only the first N validation cases.")


class DataConfig(NpzData):
    workers: int = Field(1, ge=1, le=64, description="Processes that load and resample cases.")


class LabelConfig(_Strict):
    name: str = Field(description="TG-263 name of the structure, as written into the package and RTSTRUCT.")
    source_names: list[str] = Field(
        default_factory=list, description="Other names of this structure in the NPZ files (e.g. 'LeftParotid').")
    color: tuple[int, int, int] = Field((255, 0, 0), description="Display colour (R, G, B).")
    roi_type: Literal["ORGAN", "EXTERNAL", "PTV", "CTV", "GTV", "AVOIDANCE", "CONTROL"] = Field(
        "ORGAN", description="RT ROI Interpreted Type written for this structure.")
    largest_component: bool = Field(True, description="Post-processing: keep the main connected component(s).")
    fill_holes: bool = Field(True, description="Post-processing: fill enclosed holes.")
    mirror: str | None = Field(None, description="Left/right counterpart, swapped on mirror augmentation and TTA.")
    threshold: float | None = Field(
        None, gt=0, lt=1, description="Probability threshold for this structure; network.threshold if unset.")
    sample_weight: float = Field(
        1.0, gt=0, description="How often foreground patches centre on this structure, relative to the others "
                               "(raise it for a small organ the network is slow to learn).")


class NetworkConfig(_Strict):
    name: str = Field("hn-oar", pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="Package name (used in rules).")
    version: str = Field("1.0.0", description="Package version.")
    description: str = Field("", description="Free text for the manifest.")
    architecture: str = Field("monai.UNet", description="Network builder name (models.networks.NETWORKS).")
    params: dict[str, Any] = Field(
        default_factory=lambda: {
            "spatial_dims": 3, "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2,
            "norm": "INSTANCE"},
        description="Builder keyword arguments; in_channels and out_channels are set from the labels.")
    target_spacing: tuple[float, float, float] = Field(
        (3.906, 3.906, 2.5), description="Model spacing (x, y, z) mm; cases are resampled to it.")
    window: tuple[float, float] = Field((-1000.0, 1000.0), description="Intensity clip window (HU).")
    mean: float = Field(0.0, description="Subtracted after clipping.")
    std: float = Field(500.0, gt=0, description="Divisor after subtracting the mean.")
    patch_size: tuple[int, int, int] = Field((128, 128, 128), description="Training patch (Z, Y, X) voxels.")
    inference: Literal["whole", "sliding"] = Field("whole", description="Inference over the whole volume or windows.")
    threshold: float = Field(0.5, gt=0, lt=1, description="Probability threshold.")
    weights_dtype: Literal["float16", "float32"] = Field("float16", description="Precision of the shipped weights.")

    @model_validator(mode="after")
    def _window(self) -> "NetworkConfig":
        if self.window[1] <= self.window[0]:
            raise ValueError(f"window must be (lower, upper) with upper > lower, got {self.window}")
        return self


class AugmentConfig(_Strict):
    mirror_p: float = Field(0.5, ge=0, le=1, description="Probability of a left/right flip (mirror labels swap).")
    affine_p: float = Field(0.5, ge=0, le=1, description="Probability of a random rotation/scaling.")
    rotate_deg: float = Field(15.0, ge=0, le=180, description="Maximum in-plane rotation (degrees).")
    tilt_deg: float = Field(5.0, ge=0, le=45, description="Maximum rotation about the in-plane axes (degrees).")
    scale: tuple[float, float] = Field((0.85, 1.15), description="Range of isotropic scaling.")
    intensity_scale: float = Field(0.1, ge=0, le=1, description="Multiply normalised intensities by 1 ± this.")
    intensity_shift: float = Field(0.1, ge=0, le=1, description="Add ± this to normalised intensities.")
    noise_std: float = Field(0.03, ge=0, le=1, description="Standard deviation of added Gaussian noise.")


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0, le=1, description="Peak AdamW learning rate.")
    weight_decay: float = Field(1e-4, ge=0, le=1, description="AdamW weight decay.")
    warmup_iterations: int = Field(100, ge=0, description="Linear warm-up, then cosine decay to zero.")
    dice_weight: float = Field(1.0, ge=0, description="Weight of the soft Dice term (BCE has weight 1).")


class TrainingConfig(_Strict):
    data: DataConfig
    labels: list[LabelConfig] = Field(min_length=1, description="Structures to learn, in output-channel order.")
    network: NetworkConfig = Field(default_factory=NetworkConfig, description="Network and package settings.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="On-the-fly augmentation.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimiser and loss.")
    output_dir: Path = Field(description="Run folder: checkpoints/, history.json, curve.png, package/<name>/.")
    epochs: int = Field(50, ge=1, description="Number of epochs.")
    iterations_per_epoch: int = Field(100, ge=1, description="Training iterations per epoch.")
    batch_size: int = Field(2, ge=1, le=64, description="Patches per iteration.")
    foreground_fraction: float = Field(
        0.5, ge=0, le=1, description="Fraction of patches centred on a voxel of a random present structure.")
    val_every: int = Field(1, ge=1, description="Validate every N epochs (and after the last).")
    seed: int = Field(0, description="Seed for torch, numpy and patch sampling.")
    device: str = Field("auto", description="'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'.")
    threads: int | None = Field(None, ge=1, le=256, description="CPU threads for torch (None: torch's default).")
    amp: bool = Field(True, description="bfloat16 autocast on CUDA (ignored on CPU).")
    resume: bool = Field(True, description="Continue from output_dir/checkpoints/last.pt when it exists.")
    init_from: str | None = Field(
        None, description="Start from this model package's weights (a name in the model path, or a folder); its "
                          "architecture, parameters and labels must match. Ignored when resuming.")
    time_limit_minutes: float | None = Field(
        None, gt=0, description="Stop after the epoch that would overrun this wall time (resume later).")
    progress: bool = Field(True, description="Show a progress bar.")

    @model_validator(mode="after")
    def _labels(self) -> "TrainingConfig":
        names = [lab.name for lab in self.labels]
        if len(set(names)) != len(names):
            raise ValueError(f"labels: names must be unique, got {names}")
        for lab in self.labels:
            if lab.mirror is not None and lab.mirror not in names:
                raise ValueError(f"labels.{lab.name}.mirror: {lab.mirror!r} is not one of {names}")
        return self


def load_run_config(path: str | Path, model: type[RunConfigT], readme_section: str) -> RunConfigT:
    """Read and validate a training-run YAML (``model``: a config with ``data.train_dirs``/``val_dirs`` and
    ``output_dir``); relative paths are taken relative to the file's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(str(path), [f"cannot read: {exc}"]) from exc
    if not isinstance(raw, dict):
        raise ConfigError(str(path), [f"top level must be a mapping, got {type(raw).__name__}"])
    try:
        cfg = model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(str(path), format_validation_errors(exc, readme_section)) from None
    base = path.resolve().parent

    def rel(p: Path) -> Path:
        return p if p.is_absolute() else base / p

    data = cfg.data.model_copy(  # type: ignore[attr-defined]
        update={"train_dirs": [rel(p) for p in cfg.data.train_dirs],  # type: ignore[attr-defined]
                "val_dirs": [rel(p) for p in cfg.data.val_dirs]}  # type: ignore[attr-defined]
    )
    update: dict[str, object] = {"data": data, "output_dir": rel(cfg.output_dir)}
    init_from = getattr(cfg, "init_from", None)
    if init_from and ("/" in init_from or init_from.startswith(".")):  # a folder, not a package name
        update["init_from"] = str(rel(Path(init_from)))
    return cfg.model_copy(update=update)


def load_training_config(path: str | Path) -> TrainingConfig:
    """Read and validate a training YAML; relative paths are taken relative to the file's folder."""
    return load_run_config(path, TrainingConfig, "Organ models: the `organs` pipeline")
