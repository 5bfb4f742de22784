"""ONNX Runtime sessions for torch modules on CPU: the same arithmetic, 1.6-2x faster than torch eager here.

A module is exported once (tens of seconds on a busy 2-core CPU) and the graph kept in a cache folder keyed by
its weights (``$DICOM_NODE_CACHE``, default ``~/.cache/dicom-node``, under ``onnx/``); an unwritable cache only
costs the export. Used for the LiteMedSAM image encoder and box-prompted mask decoder (:mod:`models.litemedsam`)
and the organ models' slice network (:func:`models.organs.cached_network`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["available", "weights_key", "session", "OnnxModule"]

log = logging.getLogger(__name__)
OPSET = 17


def available() -> bool:
    """Whether onnxruntime and onnx (for the export) are installed."""
    from importlib.util import find_spec

    return find_spec("onnxruntime") is not None and find_spec("onnx") is not None


def cache_dir() -> Path:
    root = os.environ.get("DICOM_NODE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                              os.path.expanduser("~/.cache"), "dicom-node")
    return Path(root) / "onnx"


def weights_key(module: torch.nn.Module, salt: str = "") -> str:
    """A key that changes with the module's weights, the torch version and ``salt`` (e.g. the input shape)."""
    digest = hashlib.sha256(f"{torch.__version__}/opset{OPSET}/{salt}".encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def _export(module: torch.nn.Module, examples: tuple[torch.Tensor, ...], input_names: list[str],
            dynamic_axes: dict[int, str] | None) -> bytes:
    buffer = io.BytesIO()
    axes = {n: dynamic_axes for n in [*input_names, "output"]} if dynamic_axes else None
    with warnings.catch_warnings():  # the TorchScript exporter warns about its own deprecation and traced shapes
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), examples, buffer, input_names=input_names, output_names=["output"],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    return buffer.getvalue()


def session(module: torch.nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], name: str,
            dynamic_axes: dict[int, str] | None = None) -> Any:
    """An ONNX Runtime session computing ``module`` (one output; its inputs named ``input``, or ``input0``,
    ``input1`` ... when ``example`` is a tuple), with the graph cached as ``<name>.onnx``; ``name`` must change
    with the weights (see :func:`weights_key`). Threads: torch's current count (the worker's budget,
    :mod:`models.threads`)."""
    import onnxruntime as ort

    examples = example if isinstance(example, tuple) else (example,)
    names = [f"input{i}" for i in range(len(examples))] if isinstance(example, tuple) else ["input"]
    path = cache_dir() / f"{name}.onnx"
    try:
        graph = path.read_bytes()
    except OSError:
        graph = _export(module, examples, names, dynamic_axes)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as fh:
                fh.write(graph)
            os.replace(fh.name, path)  # atomic: a concurrent reader sees the whole graph or none
        except OSError as exc:
            log.warning("could not cache the ONNX graph in %s: %s", path.parent, exc)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


class OnnxModule(torch.nn.Module):
    """A stand-in for an exported module inside a torch model at inference: CPU tensors in and out."""

    def __init__(self, onnx_session: Any) -> None:
        super().__init__()
        self.session = onnx_session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"input": np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})
        return torch.from_numpy(out[0])
