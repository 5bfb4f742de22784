"""Promptable 2-D segmentation engines (segment-anything family): one small interface, chosen by name.

An engine encodes square image crops once (the expensive step, batched) and then decodes any number of prompts
against an encoding (cheap). Propagation (:mod:`models.propagate`) and the evaluation see only this interface, so
they run unchanged on LiteMedSAM, a fine-tuned LiteMedSAM package or a SAM2 checkpoint (``sam2``).

Coordinates are pixels of the engine's square input (``input_size`` x ``input_size``), x then y, as SAM takes them.
Images are float32 in [0, 1] (already windowed); masks come back as logits on the same square grid.

Engines are looked up in :data:`ENGINES` by name (``litemedsam``, ``sam2``); :func:`load_engine` caches one
instance per (name, checkpoint) so a worker loads weights once, and :func:`check_engine` is the rules-time check
(no weights loaded). An engine that tracks through the whole stack itself (SAM2's video predictor) is also a
:class:`VolumePropagator`; propagation hands it the volume instead of driving it slice by slice.

``sam2`` is always listed: its package is an optional extra (``dicom-node[sam2]``), imported only when the engine
loads, and a rule naming it without the package or without a checkpoint file fails the rules check with that
reason, which says more than "unknown engine" would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from models.errors import EngineError

if TYPE_CHECKING:
    from models.propagate import PropagationSettings, Seed, StructureResult

__all__ = ["Prompt", "PromptEngine", "VolumePropagator", "ENGINES", "available_engines", "load_engine",
           "engine_factory", "check_engine"]


@dataclass(frozen=True)
class Prompt:
    """What one decode is told: a box, and optionally clicks and a mask (logits) from a neighbouring slice."""

    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 in input pixels
    points: np.ndarray | None = None  # (K, 2) x, y in input pixels
    labels: np.ndarray | None = None  # (K,) 1 = inside, 0 = outside
    mask_logits: np.ndarray | None = None  # (input_size, input_size) logits, e.g. the neighbour's result

    def __post_init__(self) -> None:
        if self.box is None and self.points is None:
            raise ValueError("a prompt needs a box or points")
        if self.points is not None:
            if self.labels is None or len(self.labels) != len(self.points):
                raise ValueError(f"points and labels must have the same length, got {len(self.points)} points "
                                 f"and {None if self.labels is None else len(self.labels)} labels")


@runtime_checkable
class PromptEngine(Protocol):
    """A box/point/mask-promptable 2-D segmenter."""

    name: str
    version: str
    input_size: int

    def encode(self, images: np.ndarray) -> list[Any]:
        """Encode (N, S, S) float32 images in [0, 1] (S = input_size); one opaque embedding per image."""
        ...

    def decode(self, embeddings: Sequence[Any], prompts: Sequence[Prompt]) -> np.ndarray:
        """Logits (M, S, S): prompt m decoded against ``embeddings[m]`` (one embedding may serve many prompts)."""
        ...


@runtime_checkable
class VolumePropagator(Protocol):
    """An engine that propagates seeds through a whole (Z, Y, X) HU volume itself, e.g. a video predictor."""

    name: str
    version: str

    def propagate_volume(self, image: np.ndarray, seeds: Mapping[str, Seed],
                         settings: PropagationSettings | None = None) -> dict[str, StructureResult]:
        ...


def _litemedsam(checkpoint: str | None) -> PromptEngine:
    from models.litemedsam import LiteMedSamEngine

    return LiteMedSamEngine.load(checkpoint)


def _sam2(checkpoint: str | None) -> PromptEngine:
    from models.sam2_engine import Sam2Engine

    return Sam2Engine.load(checkpoint)


def _sam2_check(checkpoint: str | None) -> None:
    from models.sam2_checkpoint import check_checkpoint  # imports neither torch nor sam2

    check_checkpoint(checkpoint)


ENGINES: dict[str, Callable[[str | None], PromptEngine]] = {"litemedsam": _litemedsam, "sam2": _sam2}
# Rules-time checks of an engine's checkpoint; an engine without one is checked when it loads.
ENGINE_CHECKS: dict[str, Callable[[str | None], None]] = {"sam2": _sam2_check}


def available_engines() -> list[str]:
    return sorted(ENGINES)


def engine_factory(name: str) -> Callable[[str | None], PromptEngine]:
    """The loader of engine ``name``; :class:`EngineError` lists the known names otherwise."""
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; known engines: {', '.join(available_engines())}")
    return ENGINES[name]


def check_engine(name: str, checkpoint: str | None) -> None:
    """:class:`EngineError` unless engine ``name`` is known and ``checkpoint`` passes its rules-time check."""
    engine_factory(name)
    if name in ENGINE_CHECKS:
        ENGINE_CHECKS[name](checkpoint)


def load_engine(name: str, checkpoint: str | None = None) -> PromptEngine:
    """Engine ``name`` with its default weights, or with ``checkpoint`` (a model package name or folder, or a
    weights file); kept between jobs until the checkpoint's files change (a package replaced while the node runs
    is loaded again)."""
    return _load_engine(name, checkpoint, _checkpoint_stamp(checkpoint))


@lru_cache(maxsize=4)
def _load_engine(name: str, checkpoint: str | None, stamp: tuple) -> PromptEngine:
    return engine_factory(name)(checkpoint)


def _checkpoint_stamp(checkpoint: str | None) -> tuple:
    """Size and modification time of the checkpoint's files (a package name is looked up); () when there are none
    to see, e.g. an unknown name: loading then raises its own error."""
    if checkpoint is None:
        return ()
    from pathlib import Path

    path = Path(checkpoint)
    if not path.exists():
        from models.package import find_package

        try:
            path = find_package(checkpoint).path
        except Exception:  # noqa: BLE001 - the engine's loader reports what is wrong with it
            return ()
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
