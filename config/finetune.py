"""Schema of ``finetune.yaml``: fine-tuning a promptable engine (LiteMedSAM) on clinical contours from NPZ folders.

Loaded by ``dicom-node finetune --config``; every field is documented and unknown keys are refused, so a typo fails
at start-up with its key path. See ``config/finetune.example.yaml``. Crop geometry (zoom factor, minimum crop, CT
window, box margin) is not configurable here on purpose: it is taken from the propagation defaults, so training
crops are exactly the crops inference decodes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from config.training import LabelConfig, NpzData, load_run_config

__all__ = ["FinetuneConfig", "FinetuneData", "FinetunePackage", "OnPolicy", "PromptMix", "load_finetune_config"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FinetuneData(NpzData):
    slices_per_structure: int = Field(
        4, ge=1, le=256, description="Training slices drawn per structure per case (each is one encoded crop).")
    val_slices_per_structure: int = Field(
        1, ge=1, le=256, description="Validation slices drawn per structure per case.")
    min_pixels: int = Field(4, ge=1, description="Slices where a structure has fewer native pixels are not drawn.")
    neighbour_window_fraction: float = Field(
        0.5, ge=0, le=1, description="Fraction of training crops placed on the neighbouring slice's box, as "
        "propagation places them; the rest are placed on the slice's own box (seed / true-box upper bound).")
    neighbour_distance: int = Field(
        1, ge=1, le=16, description="The neighbour whose box places and prompts a crop is a slice up to this many "
        "away, at random: propagation decodes every slice_step-th slice (4 by default), prompted from the last one.")


class PromptMix(_Strict):
    """Which box a training decode is prompted with; weights are normalised. Embeddings are cached, so only
    prompt-side augmentation is possible (image flips or intensity changes would need a new encoding)."""

    true_box: float = Field(0.25, ge=0, description="The slice's own box (+ the propagation margin).")
    neighbour_box: float = Field(
        0.35, ge=0, description="The neighbouring slice's box (+ margin): the prompt propagation gives.")
    jittered_box: float = Field(0.4, ge=0, description="The own box with each edge moved at random (box_jitter).")
    box_jitter: float = Field(
        0.15, ge=0, le=0.5, description="Largest edge shift of a jittered box, as a fraction of the box side.")

    @model_validator(mode="after")
    def _some(self) -> "PromptMix":
        if self.true_box + self.neighbour_box + self.jittered_box <= 0:
            raise ValueError("at least one of true_box, neighbour_box, jittered_box must be > 0")
        return self


class FinetunePackage(_Strict):
    name: str = Field("hn-litemedsam", pattern=r"^[a-z0-9][a-z0-9_.-]*$",
                      description="Package name (rules: params.checkpoint).")
    version: str = Field("1.0.0", description="Package version.")
    description: str = Field("", description="Free text for the manifest.")
    weights_dtype: Literal["float32", "float16"] = Field(
        "float32", description="Precision of the stored tuned parts (the frozen encoder is not stored).")


class OnPolicy(_Strict):
    """On-policy (DAgger) rounds after supervised training (models/on_policy.py): each round propagates the current
    package over training cases from their middle slices and trains on the boxes its own fronts gave."""

    rounds: int = Field(0, ge=0, le=10, description="Rounds (0: supervised training only). Each costs one seed-mode "
                        "propagation per case (~90 s with one CPU thread) and one training pass.")
    cases: int = Field(64, ge=1, description="Training cases propagated per round, drawn at random (seed), the same "
                       "ones every round.")
    case_names: list[str] | None = Field(
        None, description="The training cases to propagate, by file name without .npz (instead of 'cases' drawn "
        "at random), e.g. to repeat a shipped run.")
    hold: int = Field(6, ge=0, description="Of those, the first (by name) are not trained on: their decode Dice "
                      "before and after each round is recorded as a check.")
    epochs: float = Field(1.0, gt=0, le=20, description="Passes over decodes and supervised crops per round.")
    lr: float = Field(1e-4, gt=0, le=1, description="AdamW learning rate of a round (cosine decay to zero).")
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW weight decay of a round.")
    workers: int = Field(1, ge=1, le=64, description="Cases propagated in parallel, one torch thread each (1: in "
                         "this process with 'threads').")
    mask_prompt: float = Field(0.0, ge=0, le=1, description="Fraction of decodes trained with the mask prompt "
                               "their front offered (the last slice's logits) besides the box (0: box only). A "
                               "package trained with it is given one in propagation.")

    @model_validator(mode="after")
    def _some_trained(self) -> "OnPolicy":
        count = len(self.case_names) if self.case_names is not None else self.cases
        if self.rounds and self.hold >= count:
            raise ValueError(f"hold ({self.hold}) must be below the number of cases ({count}): nothing would be "
                             "trained on")
        return self


class FinetuneConfig(_Strict):
    engine: Literal["litemedsam"] = Field("litemedsam", description="Engine whose weights are fine-tuned.")
    data: FinetuneData = Field(description="Where the NPZ cases are and how slices are drawn from them.")
    labels: list[LabelConfig] = Field(min_length=1, description="Structures to sample, with their source names.")
    train_parts: list[Literal["prompt_encoder", "mask_decoder"]] = Field(
        ["prompt_encoder", "mask_decoder"], min_length=1,
        description="Modules trained; the image encoder stays frozen so its embeddings can be cached once.")
    prompts: PromptMix = Field(default_factory=PromptMix, description="Prompt augmentation.")
    package: FinetunePackage = Field(default_factory=FinetunePackage, description="Output package.")
    on_policy: OnPolicy = Field(default_factory=OnPolicy, description="On-policy rounds after supervised training.")
    output_dir: Path = Field(description="Run folder: cache/, checkpoints/, history.json, curve.png, package/<name>/.")
    epochs: int = Field(10, ge=1, description="Passes over the cached training crops.")
    batch_size: int = Field(8, ge=1, le=256, description="Crops per iteration.")
    lr: float = Field(1e-4, gt=0, le=1, description="AdamW learning rate (cosine decay to zero).")
    weight_decay: float = Field(1e-4, ge=0, le=1, description="AdamW weight decay.")
    dice_weight: float = Field(1.0, ge=0, description="Weight of the soft Dice term (BCE has weight 1).")
    encode_batch: int = Field(8, ge=1, le=256, description="Crops per encoder call while caching.")
    seed: int = Field(0, description="Seed for slice sampling, prompts and torch.")
    device: str = Field("auto", description="'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N'.")
    threads: int | None = Field(None, ge=1, le=256, description="CPU threads for torch (None: torch's default).")
    resume: bool = Field(True, description="Continue from output_dir/checkpoints/last.pt when it exists "
                         "(cached embeddings are always reused).")
    time_limit_minutes: float | None = Field(
        None, gt=0, description="Stop training after the epoch that would overrun this wall time (resume later).")
    progress: bool = Field(True, description="Show progress bars.")

    @model_validator(mode="after")
    def _labels(self) -> "FinetuneConfig":
        names = [lab.name for lab in self.labels]
        if len(set(names)) != len(names):
            raise ValueError(f"labels: names must be unique, got {names}")
        if len(set(self.train_parts)) != len(self.train_parts):
            raise ValueError(f"train_parts: each part once, got {self.train_parts}")
        return self


def load_finetune_config(path: str | Path) -> FinetuneConfig:
    """Read and validate a fine-tuning YAML; relative paths are taken relative to the file's folder."""
    return load_run_config(path, FinetuneConfig, "Fine-tuning on a clinic's own contours")
