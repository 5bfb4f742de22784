"""Exceptions raised by ``models``: one root, written down here.

::

    ModelError                      root: anything models/ raises on purpose
    ├── ModelPackageError           a package is missing, incomplete, corrupted or does not match its manifest
    ├── ModelInputError             an image/spacing handed to inference is unusable (wrong rank, bad spacing, …)
    ├── EngineError                 a promptable engine is unknown or its weights cannot be loaded
    └── TrainingError               training data or a training run cannot proceed (no cases, resume mismatch, …)

The node turns these into job failures at its edge; nothing here knows about DICOM statuses.
"""

from __future__ import annotations

__all__ = ["ModelError", "ModelPackageError", "ModelInputError", "EngineError", "TrainingError"]


class ModelError(Exception):
    """Root of every exception raised on purpose by ``models``."""


class ModelPackageError(ModelError):
    """A model package cannot be used: missing or invalid manifest, missing or mismatched weights."""


class ModelInputError(ModelError, ValueError):
    """The image or its geometry handed to inference is unusable."""


class EngineError(ModelError):
    """A promptable engine (LiteMedSAM, SAM2) is unknown, or its weights are missing or do not fit."""


class TrainingError(ModelError):
    """Training cannot proceed: no usable cases, label table mismatch, incompatible checkpoint."""
