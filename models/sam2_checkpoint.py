"""Where a SAM2 / MedSAM2 engine's weights and model config are, checked without importing torch or sam2.

The rules check runs this in the node process before the AE binds its port, so a missing checkpoint, a missing
config or a config that names classes outside ``sam2`` fails at start-up, not when the first series arrives.
:mod:`models.sam2_engine` uses the same resolution when it loads the weights in a worker.

``checkpoint`` is the path of a ``.pt`` file. Its config is the YAML beside it with the same stem
(``MedSAM2_latest.pt`` + ``MedSAM2_latest.yaml``), or, for Meta's published file names (``sam2.1_hiera_tiny.pt``
...), the config the ``sam2`` package ships. Configs are hydra ``_target_`` trees; only ``sam2.*`` targets are
accepted, so a config names model classes and cannot call arbitrary code.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from models.errors import EngineError

__all__ = ["Sam2Spec", "KNOWN_CONFIGS", "resolve_checkpoint", "check_checkpoint", "read_config", "package_dir"]

# Meta's published checkpoint names -> the config the sam2 package ships for each (as its build_sam.py maps them).
KNOWN_CONFIGS = {
    "sam2_hiera_tiny": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_small": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_base_plus": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_large": "configs/sam2/sam2_hiera_l.yaml",
    "sam2.1_hiera_tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}


@dataclass(frozen=True)
class Sam2Spec:
    checkpoint: Path
    config: Path  # a YAML file: beside the checkpoint, or one the sam2 package ships


def package_dir() -> Path:
    spec = importlib.util.find_spec("sam2")
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("the sam2 engine needs the optional package sam2: pip install 'dicom-node[sam2]' "
                          "(see README, 'Tumour pipeline')")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_checkpoint(checkpoint: str | None) -> Sam2Spec:
    """The checkpoint file and its config; :class:`EngineError` says what is missing and where it was looked for."""
    if not checkpoint:
        raise EngineError("the sam2 engine has no default weights: set checkpoint to the path of a SAM2 / MedSAM2 "
                          ".pt file")
    package = package_dir()
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise EngineError(f"sam2 checkpoint {str(path)!r} does not exist or is not a file")
    beside = path.with_suffix(".yaml")
    if beside.is_file():
        return Sam2Spec(path, beside)
    if path.stem in KNOWN_CONFIGS:
        return Sam2Spec(path, package / KNOWN_CONFIGS[path.stem])
    raise EngineError(f"sam2 checkpoint {str(path)!r}: no model config; put the model's YAML config beside it as "
                      f"{beside.name!r} (known file names, whose config the sam2 package ships: "
                      f"{', '.join(f'{k}.pt' for k in KNOWN_CONFIGS)})")


def _targets(node: Any) -> list[str]:
    if isinstance(node, Mapping):
        found = [str(node["_target_"])] if "_target_" in node else []
        return found + [t for k, v in node.items() if k != "_target_" for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def read_config(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise EngineError(f"sam2 config {str(path)!r} cannot be read: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise EngineError(f"sam2 config {str(path)!r} has no 'model' mapping")
    foreign = sorted({t for t in _targets(data["model"]) if not t.startswith("sam2.")})
    if foreign:
        raise EngineError(f"sam2 config {str(path)!r}: only sam2.* classes may be instantiated, got {foreign}")
    return data


def check_checkpoint(checkpoint: str | None) -> None:
    """The rules-time check: sam2 installed, checkpoint file present, its config found, readable and safe."""
    read_config(resolve_checkpoint(checkpoint).config)
