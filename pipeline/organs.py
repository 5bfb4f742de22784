"""The ``organs`` pipeline: organs at risk from a packaged U-Net (``models/zoo``, or ``$DICOM_NODE_MODEL_PATH``).

In rules::

    run:
      - pipeline: organs
        params: {model: hn-oar, tta: true}

The model name is checked when the rules load (an unknown package or an invalid manifest is a rules error, not a
failed job hours later); the weights' SHA-256 is checked by every job. Networks are built once per (package, device) and kept for the next series.
"""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from models.errors import ModelInputError, ModelPackageError
from models.networks import NETWORKS
from models.organs import cached_network, resolve_device, segment_volume
from models.package import find_package, list_packages
from models.types import StructureSet
from pipeline.base import PipelineInput, PipelineParams
from pipeline.errors import PipelineError, SeriesError

__all__ = ["OrgansParams", "OrgansPipeline"]

logger = logging.getLogger(__name__)


class OrgansParams(PipelineParams):
    model: str = Field("hn-oar", description="Name of an installed model package (`dicom-node models list`).")
    tta: bool = Field(False, description="Average with a left/right mirrored pass (about 2x the time).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when available.")
    structures: list[str] | None = Field(
        None, description="Return only these of the model's structures (TG-263 names); all when omitted.")

    @field_validator("model")
    @classmethod
    def _installed(cls, name: str) -> str:
        # names and manifests only: the weights' hash is checked by every job, so a file damaged later fails
        # that job (retried, audited) instead of making its parameters look wrong
        found = [p for p in list_packages() if p.name == name]
        if not found:
            known = sorted(p.name for p in list_packages() if p.error is None)
            raise ValueError(f"no model package named {name!r}; installed: {known}")
        if all(p.error for p in found):
            raise ValueError(found[0].error)
        usable = [p for p in found if p.error is None]
        if usable and all(p.architecture not in NETWORKS for p in usable):
            # e.g. a fine-tuned LiteMedSAM package: a prompt engine for `propagate`, not an organ network
            raise ValueError(f"model package {name!r} is a {usable[0].architecture!r} model, not an organ "
                             f"segmentation network ({', '.join(sorted(NETWORKS))}); use it with the propagate "
                             f"pipeline's checkpoint parameter")
        return name


class OrgansPipeline:
    """Organs at risk segmented by a model package's network; structure names, colours and types from its
    manifest."""

    name: ClassVar[str] = "organs"
    version: ClassVar[str] = "1.0"
    Params: ClassVar[type[PipelineParams]] = OrgansParams

    def run(self, data: PipelineInput) -> StructureSet:
        p = data.params if isinstance(data.params, OrgansParams) else OrgansParams.model_validate(
            data.params.model_dump())
        try:
            package = find_package(p.model)  # hash-checked on every job: a damaged file fails this job clearly
        except ModelPackageError as exc:
            raise PipelineError(f"model package {p.model!r} is unusable: {exc}") from exc
        manifest = package.manifest
        if data.volume.modality != manifest.modality:
            raise SeriesError(f"model {manifest.name!r} segments {manifest.modality}, this series is "
                              f"{data.volume.modality}")
        device = resolve_device(p.device)
        network = cached_network(package, device)
        try:
            structures = segment_volume(data.volume, package, network=network, device=device, tta=p.tta)
        except ModelInputError as exc:
            raise SeriesError(f"model {manifest.name!r} cannot segment this series: {exc}") from exc
        if p.structures is not None:
            structures = [s for s in structures if s.name in p.structures]
        logger.info("organs %s %s: %s", manifest.name, manifest.version, [s.name for s in structures])
        return StructureSet(structures=tuple(structures), label=manifest.name[:16],
                            description=f"dicom-node organs pipeline, model {manifest.name} {manifest.version}",
                            notes={"model": manifest.name, "model_version": manifest.version,
                                   "model_sha256": manifest.weights.sha256})
