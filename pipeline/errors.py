"""Exceptions raised by the ``pipeline`` package.

The whole hierarchy, in one place::

    PipelineError                 root: everything this package raises on purpose
    ├── SeriesError               the DICOM series cannot be a volume (missing slice, gantry tilt, mixed sizes,
    │                             undecodable pixels, ...): reject the input, do not retry
    ├── StructureError            a structure set does not fit its series (shape mismatch, empty name, ...)
    ├── UnknownPipelineError      a pipeline name that no entry point registers
    └── PipelineParamsError       parameters a pipeline refuses (raised at config-load time too)

``dicom_node`` maps these onto job states: ``SeriesError`` and ``StructureError`` reject the job, anything else
from a pipeline's ``run`` fails it with bounded retry.
"""

from __future__ import annotations

__all__ = [
    "PipelineError",
    "SeriesError",
    "StructureError",
    "UnknownPipelineError",
    "PipelineParamsError",
]


class PipelineError(Exception):
    """Root of every exception the pipeline package raises on purpose."""


class SeriesError(PipelineError):
    """A set of DICOM instances that cannot be loaded as one volume; the message says what is wrong."""


class StructureError(PipelineError):
    """A structure set that does not match its source series."""


class UnknownPipelineError(PipelineError, LookupError):
    """No pipeline of that name is registered."""


class PipelineParamsError(PipelineError, ValueError):
    """Pipeline parameters failed validation."""
