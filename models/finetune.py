"""Fine-tune LiteMedSAM's prompt encoder and mask decoder on clinical contours from NPZ folders.

The image encoder stays frozen, so every training crop is encoded **once** and its embedding cached in the run
folder (``cache/<split>/<case>.pt``, one file per case, written atomically: a stopped run re-encodes at most one
case). Encoding is the expensive step on a CPU (~1.5 s per crop on an idle 2-core machine); a decoder step is
~0.1 s per crop.

Crops are made exactly as propagation makes them (:mod:`models.propagate`: a square of 2x the box, at least 24
native pixels, soft-tissue window, resized to 256^2), placed either on the slice's own box (a seed, or the true-box
upper bound) or on the neighbouring slice's box (what propagation does when it steps to this slice). Each decode is
prompted, at random, with the true box, the neighbour's box (the prompt propagation gives) or a jittered box.
Augmentation is prompt-side only: flips, rotations or intensity changes would change the image and need a new
encoding, which is what caching avoids.

Loss: BCE + soft Dice on the 256^2 logits. Validation: native-pixel Dice per structure on held-out slices of the
validation cases, for the true, a (fixed) jittered and the neighbour's box, the zero-shot weights first; the mean
over the three prompts and the structures selects ``best.pt``. ``last.pt`` resumes a run. The package holds the
tuned modules only, plus the SHA-256 of the bundled checkpoint that completes them (see
:func:`models.litemedsam.base_reference`).

With ``on_policy.rounds`` set, the supervised package then goes through on-policy rounds (:mod:`models.on_policy`:
the decoder trained on the boxes its own propagation gives) and the last round's package is the run's.

Only :func:`finetune` touches the disk (the run folder); the rest take and return values.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from config.finetune import FinetuneConfig, PromptMix
from models.crops import CropWindow, box_of, box_to_input, crop_image, crop_window, logits_to_native, normalise
from models.data import KeyMap, LabelSource, read_npz
from models.errors import TrainingError
from models.extent import fit_abutments, learn_growth, learn_reach, learned_growth, middle_slice_extent, pair_gaps
from models.litemedsam import ARCHITECTURE, INPUT_SIZE, LiteMedSamEngine, base_reference
from models.package import ModelPackage, write_package
from models.propagate import PropagationSettings
from models.train import npz_keymap, out_of_time, restore_last, save_last, start_run

__all__ = ["CropItem", "CropSet", "FinetuneResult", "PROMPT_KINDS", "sample_items", "item_crop", "item_box",
           "decode_logits", "segmentation_loss", "native_dice", "build_cache", "unpack_native", "validate", "finetune",
           "crop_item_from_dict", "freeze_all_but", "label_sources", "prompt_kinds", "tuned_state"]

log = logging.getLogger(__name__)

PROMPT_KINDS = ("true_box", "neighbour_box", "jittered_box")
SETTINGS = PropagationSettings()  # the crop geometry inference uses; training must not drift from it
CACHE_FORMAT = 1


@dataclass(frozen=True)
class CropItem:
    """One training/validation decode: a structure on one slice, its crop window and the boxes that prompt it."""

    case_id: str
    label: int  # index into the config's labels
    z: int
    window: CropWindow
    own_box: tuple[int, int, int, int]  # native (x0, y0, x1, y1), inclusive
    neighbour_box: tuple[int, int, int, int] | None  # a nearby slice's box (z +- neighbour_distance), None: no such
    placed_on: str  # 'own' or 'neighbour': whose box placed the window


def _bigger(box: tuple[float, float, float, float], margin: float) -> tuple[float, float, float, float]:
    return box[0] - margin, box[1] - margin, box[2] + margin, box[3] + margin


def sample_items(case_id: str, masks: np.ndarray, present: np.ndarray, per_structure: int, min_pixels: int,
                 neighbour_fraction: float, rng: np.random.Generator, neighbour_distance: int = 1) -> list[CropItem]:
    """Draw up to ``per_structure`` slices of every present structure ((C, Z, Y, X) masks) without replacement; each
    gets the box of a neighbouring slice up to ``neighbour_distance`` away that holds the structure."""
    items = []
    for c in np.flatnonzero(present):
        area = masks[c].reshape(masks.shape[1], -1).sum(axis=1)
        zs = np.flatnonzero(area >= min_pixels)
        if not len(zs):
            continue
        for z in sorted(rng.choice(zs, size=min(per_structure, len(zs)), replace=False).tolist()):
            own = box_of(masks[c, z])
            offsets = [d for k in range(1, neighbour_distance + 1) for d in (-k, k)]
            neighbours = [z + d for d in offsets if 0 <= z + d < masks.shape[1] and area[z + d] >= min_pixels]
            nbox = box_of(masks[c, neighbours[int(rng.integers(len(neighbours)))]]) if neighbours else None
            on_neighbour = nbox is not None and rng.random() < neighbour_fraction
            window = crop_window(nbox if on_neighbour else own, SETTINGS.crop_factor, SETTINGS.min_crop,  # type: ignore[arg-type]
                                 SETTINGS.snap)
            items.append(CropItem(case_id, int(c), int(z), window, own, nbox,  # type: ignore[arg-type]
                                  "neighbour" if on_neighbour else "own"))
    return items


def item_crop(image: np.ndarray, item: CropItem) -> np.ndarray:
    """The engine input for ``item``: its slice, windowed, cropped and resized exactly as propagation does."""
    return crop_image(normalise(image[item.z], SETTINGS.window), item.window, INPUT_SIZE)


def item_target(mask_slice: np.ndarray, window: CropWindow) -> np.ndarray:
    """The structure on the 256^2 crop grid (bool)."""
    return crop_image(mask_slice.astype(np.float32), window, INPUT_SIZE) >= 0.5


def item_box(item: CropItem, kind: str, rng: np.random.Generator | None = None,
             jitter: float = 0.15) -> tuple[float, float, float, float]:
    """The prompt box of ``kind`` in input pixels; 'neighbour_box' falls back to the true box when there is none.
    Boxes carry propagation's margin, as ``models.propagate._prompt`` gives them."""
    box: tuple[float, ...] = item.own_box
    if kind == "neighbour_box" and item.neighbour_box is not None:
        box = item.neighbour_box
    elif kind == "jittered_box":
        if rng is None:
            raise ValueError("a jittered box needs a random generator")
        x0, y0, x1, y1 = item.own_box
        w, h = x1 - x0 + 1, y1 - y0 + 1
        dx0, dx1 = rng.uniform(-jitter, jitter, 2) * w
        dy0, dy1 = rng.uniform(-jitter, jitter, 2) * h
        box = (x0 + dx0, y0 + dy0, max(x1 + dx1, x0 + dx0), max(y1 + dy1, y0 + dy0))
    bx = box_to_input(_bigger(box, SETTINGS.box_margin), item.window, INPUT_SIZE)  # type: ignore[arg-type]
    return tuple(float(np.clip(v, 0, INPUT_SIZE - 1)) for v in bx)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- network and loss
def decode_logits(net: torch.nn.Module, embeddings: torch.Tensor, boxes: torch.Tensor,
                  masks: torch.Tensor | None = None, with_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 256, 256) logits for (B, 256, 64, 64) embeddings and (B, 4) boxes, with gradients: the same calls as
    :meth:`LiteMedSamEngine.decode` makes for a box prompt (a test checks they agree). ``masks`` (B, 256, 256)
    logits (as :func:`models.propagate.neighbour_prompt` gives them) add a mask prompt to the decodes where
    ``with_mask`` (B,) is true (default: all)."""
    sparse, dense = net.prompt_encoder(points=None, boxes=boxes[:, None, :], masks=None)
    if masks is not None:
        use = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device) if with_mask is None else with_mask
        if use.any():
            dense = torch.where(use[:, None, None, None], net.prompt_encoder._embed_masks(masks[:, None]), dense)
    logits, _ = net.mask_decoder(image_embeddings=embeddings, image_pe=net.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=False)
    return logits[:, 0]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """BCE + ``dice_weight`` x (1 - soft Dice), Dice per crop then averaged (every crop holds its structure)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2))
    dice = (2 * inter + 1.0) / (prob.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + 1.0)
    return bce + dice_weight * (1 - dice.mean())


def native_dice(logits: np.ndarray, window: CropWindow, truth: np.ndarray) -> float:
    """Dice on the native slice grid, as propagation would write the mask (logit > 0)."""
    pred = logits_to_native(logits, window, truth.shape) > SETTINGS.threshold
    total = int(pred.sum() + truth.sum())
    return 1.0 if total == 0 else 2.0 * float((pred & truth).sum()) / total


# ----------------------------------------------------------------------------------------------------- the cache
@dataclass
class CropSet:
    """Cached crops of one split, in memory."""

    items: list[CropItem]
    embeddings: torch.Tensor  # (N, 256, 64, 64) float16
    targets: torch.Tensor  # (N, 256, 256) bool
    native: list[np.ndarray]  # the structure on each item's native slice (bool)

    def __len__(self) -> int:
        return len(self.items)


def label_sources(cfg: FinetuneConfig) -> list[LabelSource]:
    """The configured structures as :func:`models.data.read_npz` takes them."""
    return [LabelSource(lab.name, tuple(lab.source_names)) for lab in cfg.labels]


def _keymap(cfg: FinetuneConfig) -> KeyMap:
    return npz_keymap(cfg.data)


def _fingerprint(items: Sequence[CropItem], base_sha: str) -> str:
    text = json.dumps([CACHE_FORMAT, base_sha, asdict(SETTINGS), [asdict(i) for i in items]], sort_keys=True,
                      default=str)
    return f"{zlib.crc32(text.encode()):08x}-{len(items)}"


@dataclass(frozen=True)
class _CaseGeometry:
    spacing_xyz: tuple[float, ...]
    extents: dict[int, tuple[float, float]]  # label -> middle_slice_extent: the reach's measurements
    gaps: dict[tuple[str, str], float]  # (label name, later label's) -> facing_gap_mm: the abutments' measurements
    growth: dict[int, float]  # label -> learned_growth: the growth limit's measurements


def _cache_case(path: Path, shard: Path, cfg: FinetuneConfig, engine: LiteMedSamEngine, per_structure: int,
                neighbour_fraction: float, base_sha: str
                ) -> tuple[dict[str, Any], int, _CaseGeometry]:
    """The cached shard of one case (encoded now when missing or stale); also how many crops were encoded and the
    case's geometry (what a package learns of its structures' extents)."""
    case = read_npz(path, label_sources(cfg), _keymap(cfg))
    present = [int(c) for c in np.flatnonzero(case.present)]
    extents = {c: middle_slice_extent(case.masks[c], case.spacing_xyz) for c in present}
    geometry = _CaseGeometry(
        case.spacing_xyz, {c: e for c, e in extents.items() if e is not None and e[0] > 0},
        pair_gaps({cfg.labels[c].name: case.masks[c] > 0 for c in present}, case.spacing_xyz[2]),
        {c: g for c in present if (g := learned_growth(case.masks[c] > 0)) is not None})
    rng = np.random.default_rng([cfg.seed, zlib.crc32(case.case_id.encode())])  # a case's draw ignores the others
    items = sample_items(case.case_id, case.masks, case.present, per_structure, cfg.data.min_pixels,
                         neighbour_fraction, rng, cfg.data.neighbour_distance)
    key = _fingerprint(items, base_sha)
    if shard.is_file():
        cached = torch.load(shard, map_location="cpu", weights_only=False)
        if cached.get("key") == key:
            return cached, 0, geometry
    embeddings = []
    for i in range(0, len(items), cfg.encode_batch):
        chunk = items[i:i + cfg.encode_batch]
        embeddings += engine.encode(np.stack([item_crop(case.image, it) for it in chunk]))
    shard_data = {
        "key": key,
        "items": [asdict(it) for it in items],
        "embeddings": torch.stack(embeddings).cpu() if embeddings else torch.zeros(0, 256, 64, 64, dtype=torch.float16),
        "targets": torch.from_numpy(np.stack([item_target(case.masks[it.label, it.z] > 0, it.window) for it in items])
                                    if items else np.zeros((0, INPUT_SIZE, INPUT_SIZE), bool)),
        "native": [np.packbits(case.masks[it.label, it.z] > 0) for it in items],
        "shape": tuple(case.image.shape[1:]),
    }
    shard.parent.mkdir(parents=True, exist_ok=True)
    tmp = shard.with_suffix(".tmp")
    torch.save(shard_data, tmp)
    tmp.replace(shard)
    return shard_data, len(items), geometry


def unpack_native(shard: Mapping[str, Any]) -> list[np.ndarray]:
    """A cached shard's native slices, stored bit-packed, as bool (Y, X) arrays."""
    h, w = shard["shape"]
    return [np.unpackbits(m, count=h * w).reshape(h, w).astype(bool) for m in shard["native"]]


def _label_named(cfg: FinetuneConfig, lower: str) -> str:
    return next(lab.name for lab in cfg.labels if lab.name.lower() == lower)


def crop_item_from_dict(d: dict[str, Any]) -> CropItem:
    """A :class:`CropItem` from its cached form (``asdict``)."""
    nb = d["neighbour_box"]
    return CropItem(d["case_id"], d["label"], d["z"], CropWindow(**d["window"]),
                    tuple(d["own_box"]),  # type: ignore[arg-type]
                    tuple(nb) if nb is not None else None, d["placed_on"])  # type: ignore[arg-type]


def build_cache(paths: Sequence[Path], split: str, out: Path, cfg: FinetuneConfig, engine: LiteMedSamEngine,
                 per_structure: int, neighbour_fraction: float) -> tuple[CropSet, dict[str, Any]]:
    base_sha = base_reference()["sha256"]
    items: list[CropItem] = []
    embeddings, targets, native = [], [], []
    encoded, t0, spacings = 0, time.monotonic(), []
    extents: dict[int, list[tuple[float, float]]] = {}
    gaps: dict[tuple[str, str], list[float]] = {}
    growth: dict[int, list[float]] = {}
    for path in _progress(cfg, paths, f"caching {split} crops"):
        shard, n, geometry = _cache_case(path, out / "cache" / split / f"{path.stem}.pt", cfg, engine,
                                         per_structure, neighbour_fraction, base_sha)
        encoded += n
        spacings.append(geometry.spacing_xyz)
        for c, e in geometry.extents.items():
            extents.setdefault(c, []).append(e)
        for pair, g in geometry.gaps.items():
            gaps.setdefault(pair, []).append(g)
        for c, g in geometry.growth.items():
            growth.setdefault(c, []).append(g)
        items += [crop_item_from_dict(d) for d in shard["items"]]
        embeddings.append(shard["embeddings"])
        targets.append(shard["targets"])
        native += unpack_native(shard)
    seconds = time.monotonic() - t0
    learned = {c: learn_reach(v) for c, v in sorted(extents.items())}
    abutments = fit_abutments(gaps, {cfg.labels[c].name: float(np.median([h for _, h in v]))
                                     for c, v in extents.items()})
    log.info("%s: %d crops from %d cases (%d encoded now in %.0f s)", split, len(items), len(paths), encoded, seconds)
    data = CropSet(items, torch.cat(embeddings) if embeddings else torch.zeros(0, 256, 64, 64, dtype=torch.float16),
                  torch.cat(targets) if targets else torch.zeros(0, INPUT_SIZE, INPUT_SIZE, dtype=torch.bool), native)
    stats = {"cases": len(paths), "crops": len(items), "encoded_now": encoded, "cache_seconds": round(seconds, 1),
             "median_spacing_xyz": [float(v) for v in np.median(np.asarray(spacings), axis=0)] if spacings else None,
             # median over cases, in middle-slice diameters: the manifest's per-label reach (propagation's bound),
             # and, with enough cases, the reach against the middle slice's size (used instead)
             "reach": {cfg.labels[c].name: median for c, (median, _) in learned.items()},
             "reach_law": {cfg.labels[c].name: asdict(law) for c, (_, law) in learned.items() if law is not None},
             # where a structure ends beside another in every case give or take a slice (propagation's end there)
             "abuts": {name: {"label": _label_named(cfg, a.other), "gap_mm": a.gap_mm}
                       for name, a in abutments.items()},
             # how much a structure grows from one slice to the next (propagation's leak guard allows it)
             "growth": {cfg.labels[c].name: learn_growth(v) for c, v in sorted(growth.items())}}
    return data, stats


# ------------------------------------------------------------------------------------------------ train / validate
def prompt_kinds(mix: PromptMix, items: Sequence[CropItem], rng: np.random.Generator) -> list[str]:
    """A prompt kind per item, drawn with ``mix``'s weights (no neighbour box where the item has none)."""
    weights = np.array([mix.true_box, mix.neighbour_box, mix.jittered_box], float)
    kinds = []
    for it in items:
        w = weights.copy()
        if it.neighbour_box is None:
            w[1] = 0
        if w.sum() == 0:
            w[0] = 1
        kinds.append(PROMPT_KINDS[int(rng.choice(3, p=w / w.sum()))])
    return kinds


@torch.no_grad()
def validate(net: torch.nn.Module, data: CropSet, label_names: Sequence[str], jitter: float, device: str,
             batch: int = 16) -> dict[str, Any]:
    """Native Dice per prompt kind and structure on the cached validation crops (the jittered boxes are fixed by
    a seeded generator, so every epoch and the zero-shot weights see the same boxes)."""
    rng = np.random.default_rng(12345)
    boxes = {k: [item_box(it, k, rng, jitter) for it in data.items] for k in PROMPT_KINDS}
    scores: dict[str, dict[str, list[float]]] = {k: {n: [] for n in label_names} for k in PROMPT_KINDS}
    for kind in PROMPT_KINDS:
        for i in range(0, len(data), batch):
            emb = data.embeddings[i:i + batch].to(device).float()
            logits = decode_logits(net, emb, torch.tensor(boxes[kind][i:i + batch], device=device)).cpu().numpy()
            for j, lg in enumerate(logits):
                it = data.items[i + j]
                scores[kind][label_names[it.label]].append(native_dice(lg, it.window, data.native[i + j]))
    per_kind = {k: {n: float(np.mean(v)) for n, v in s.items() if v} for k, s in scores.items()}
    means = {k: float(np.mean(list(v.values()))) for k, v in per_kind.items() if v}
    return {"dice": per_kind, "mean": means, "score": float(np.mean(list(means.values()))) if means else 0.0}


@dataclass(frozen=True)
class FinetuneResult:
    package: ModelPackage
    history: list[dict[str, Any]]
    best_epoch: int
    zero_shot: dict[str, Any] | None
    best: dict[str, Any] | None


def freeze_all_but(net: torch.nn.Module, parts: Sequence[str]) -> list[torch.nn.Parameter]:
    """Freeze ``net`` except the modules ``parts``; returns their parameters (what the optimiser trains)."""
    for p in net.parameters():
        p.requires_grad_(False)
    params = [p for part in parts for p in getattr(net, part).parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def tuned_state(net: torch.nn.Module, parts: Sequence[str]) -> dict[str, torch.Tensor]:
    """A CPU copy of the state of ``parts`` only: what a package stores."""
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if k.split(".", 1)[0] in parts}


def _epoch(net: torch.nn.Module, data: CropSet, cfg: FinetuneConfig, opt: torch.optim.Optimizer,
           sched: torch.optim.lr_scheduler.LRScheduler, rng: np.random.Generator, device: str, epoch: int) -> float:
    order = rng.permutation(len(data))
    losses: list[float] = []
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    bar = _progress(cfg, batches, f"epoch {epoch + 1}/{cfg.epochs}")
    for idx in bar:
        items = [data.items[i] for i in idx]
        kinds = prompt_kinds(cfg.prompts, items, rng)
        boxes = torch.tensor([item_box(it, k, rng, cfg.prompts.box_jitter) for it, k in zip(items, kinds)],
                             device=device)
        logits = decode_logits(net, data.embeddings[idx].to(device).float(), boxes)
        loss = segmentation_loss(logits, data.targets[idx].to(device).float(), cfg.dice_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    return float(np.mean(losses))


def _manifest_fields(cfg: FinetuneConfig, summary: dict[str, Any], metrics: dict[str, Any],
                     spacing_xyz: Sequence[float]) -> dict[str, Any]:
    lo, hi = SETTINGS.window
    return {
        "name": cfg.package.name,
        "version": cfg.package.version,
        "description": cfg.package.description,
        "architecture": {"name": ARCHITECTURE, "params": {
            "base": base_reference(), "stored_parts": list(cfg.train_parts), "input_size": INPUT_SIZE,
            "crop": {"factor": SETTINGS.crop_factor, "min_side": SETTINGS.min_crop, "snap": SETTINGS.snap,
                     "box_margin": SETTINGS.box_margin}}},
        "target_spacing": [float(s) for s in spacing_xyz],  # the training data's median: crops are zoomed per box
        "intensity": {"kind": "ct_window", "lower": lo, "upper": hi, "mean": lo, "std": hi - lo},  # -> [0, 1]
        "patch": {"size": [1, INPUT_SIZE, INPUT_SIZE], "inference": "whole"},
        "threshold": 0.5,
        "labels": [{"name": lab.name, "source_names": list(lab.source_names), "color": list(lab.color),
                    "roi_type": lab.roi_type, "largest_component": lab.largest_component,
                    "fill_holes": lab.fill_holes, "mirror": lab.mirror,
                    "reach": summary["train"]["reach"].get(lab.name),
                    "reach_law": summary["train"].get("reach_law", {}).get(lab.name),
                    "abuts": summary["train"].get("abuts", {}).get(lab.name),
                    "growth": summary["train"].get("growth", {}).get(lab.name)} for lab in cfg.labels],
        "training": summary,
        "metrics": metrics,
    }


def _plot_curve(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [h for h in history if h["epoch"] >= 0]
    ax.plot([h["epoch"] + 1 for h in rows], [h["loss"] for h in rows], label="training loss", color="tab:blue",
            marker=".")
    ax.set_xlabel("epoch (0 = zero-shot)")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    for kind, colour in zip(PROMPT_KINDS, ("tab:orange", "tab:green", "tab:red")):
        val = [(h["epoch"] + 1, h["val"]["mean"][kind]) for h in history if h.get("val")]
        if val:
            ax2.plot(*zip(*val), label=f"validation Dice, {kind.replace('_', ' ')}", color=colour, marker=".")
    ax2.set_ylabel("validation mean Dice (native pixels)")
    ax2.set_ylim(0, 1)
    fig.legend(loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _progress(cfg: FinetuneConfig, iterable: Iterable[Any], desc: str) -> Any:
    if not cfg.progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(list(iterable), desc=desc, leave=False, dynamic_ncols=True)


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Cache the crops' embeddings, then train (or resume) as configured; writes the run folder and the package."""
    run = start_run(cfg)
    device, out, ckpt_dir = run.device, run.out, run.checkpoints
    train_paths, val_paths = run.train_paths, run.val_paths
    engine = LiteMedSamEngine.load(None, device)
    train, train_stats = build_cache(train_paths, "train", out, cfg, engine, cfg.data.slices_per_structure,
                                      cfg.data.neighbour_window_fraction)
    val, val_stats = build_cache(val_paths, "validation", out, cfg, engine, cfg.data.val_slices_per_structure, 0.0)
    if not len(train):
        raise TrainingError("no training case holds any of the configured structures")
    names = [lab.name for lab in cfg.labels]

    torch.manual_seed(cfg.seed)
    net = engine.net
    params = freeze_all_but(net, cfg.train_parts)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    rng = np.random.default_rng(cfg.seed)
    history: list[dict[str, Any]] = []
    start_epoch, best_score, best_epoch = 0, -1.0, -1
    if cfg.resume and run.last.is_file():
        state = torch.load(run.last, map_location=device, weights_only=False)
        if state["labels"] != names or state["train_parts"] != list(cfg.train_parts):
            raise TrainingError(f"{run.last}: checkpoint labels/parts {state['labels']}/{state['train_parts']} "
                                f"differ from the config's {names}/{list(cfg.train_parts)}")
        net.load_state_dict({**net.state_dict(), **state["model"]})
        start_epoch, history = restore_last(state, opt, sched, rng)
        best_score, best_epoch = state["best_score"], state["best_epoch"]
        log.info("resumed from %s at epoch %d", run.last, start_epoch)
    elif len(val):  # the zero-shot weights on the same validation crops: the baseline every epoch is compared with
        zero = validate(net, val, names, cfg.prompts.box_jitter, device)
        history.append({"epoch": -1, "loss": None, "val": zero, "seconds": 0.0})
        best_score = zero["score"]  # fine-tuning must beat the weights it started from to be shipped
        torch.save(tuned_state(net, cfg.train_parts), ckpt_dir / "best.pt")
        log.info("zero-shot validation: %s", zero["mean"])
    t0 = time.monotonic()
    epoch_times: list[float] = []
    for epoch in range(start_epoch, cfg.epochs):
        te = time.monotonic()
        net.train()
        loss = _epoch(net, train, cfg, opt, sched, rng, device, epoch)
        net.eval()
        row: dict[str, Any] = {"epoch": epoch, "loss": loss, "lr": sched.get_last_lr()[0]}
        if len(val):
            row["val"] = validate(net, val, names, cfg.prompts.box_jitter, device)
            if row["val"]["score"] > best_score:
                best_score, best_epoch = row["val"]["score"], epoch
                torch.save(tuned_state(net, cfg.train_parts), ckpt_dir / "best.pt")
        row["seconds"] = round(time.monotonic() - te, 1)
        history.append(row)
        log.info("epoch %d: loss %.4f%s", epoch, loss, f", validation {row['val']['mean']}" if "val" in row else "")
        save_last(run, tuned_state(net, cfg.train_parts), opt, sched, rng, epoch, history, best_score=best_score,
                  best_epoch=best_epoch, labels=names, train_parts=list(cfg.train_parts))
        epoch_times.append(time.monotonic() - te)
        if out_of_time(cfg.time_limit_minutes, t0, epoch_times, epoch, cfg.epochs):
            break
    (out / "history.json").write_text(json.dumps(history, indent=1))
    _plot_curve(history, out / "curve.png")
    if not len(val):  # nothing to select on: ship the last weights
        torch.save(tuned_state(net, cfg.train_parts), ckpt_dir / "best.pt")
        best_epoch = history[-1]["epoch"] if history else -1
    best_state = torch.load(ckpt_dir / "best.pt", map_location="cpu", weights_only=True)
    zero_row = next((h for h in history if h["epoch"] == -1), None)
    best_row = next((h for h in history if h["epoch"] == best_epoch), None) if best_epoch >= 0 else zero_row
    trained_epochs = [h for h in history if h["epoch"] >= 0]
    summary = {
        "engine": cfg.engine, "train_parts": list(cfg.train_parts), "frozen": "image_encoder",
        "train_dirs": [str(p) for p in cfg.data.train_dirs], "val_dirs": [str(p) for p in cfg.data.val_dirs],
        "train": train_stats, "validation": val_stats,
        "crops_per_structure": {n: sum(1 for it in train.items if it.label == i) for i, n in enumerate(names)},
        "slices_per_structure": cfg.data.slices_per_structure,
        "neighbour_window_fraction": cfg.data.neighbour_window_fraction,
        "neighbour_distance": cfg.data.neighbour_distance,
        "prompts": cfg.prompts.model_dump(), "epochs_run": len(trained_epochs), "epochs_planned": cfg.epochs,
        "batch_size": cfg.batch_size, "lr": cfg.lr, "best_epoch": best_epoch, "seed": cfg.seed,
        "train_seconds": round(sum(h.get("seconds", 0.0) for h in trained_epochs), 1),
    }
    metrics: dict[str, Any] = {}
    if best_row is not None and best_row.get("val"):
        # slice Dice with a box given: not comparable with an organ model's 3-D 'validation_mean_dice'
        metrics = {"selection": "mean native-pixel Dice over structures and the three box prompts, on held-out "
                                "validation slices (one crop per structure and slice)",
                   "validation_slice_dice": best_row["val"]["dice"],
                   "validation_mean_slice_dice_by_prompt": best_row["val"]["mean"],
                   "validation_mean_slice_dice": best_row["val"]["score"]}
        if zero_row is not None:
            metrics["zero_shot_validation_slice_dice"] = zero_row["val"]["dice"]
            metrics["zero_shot_validation_mean_slice_dice_by_prompt"] = zero_row["val"]["mean"]
            metrics["zero_shot_validation_mean_slice_dice"] = zero_row["val"]["score"]
    spacing = train_stats["median_spacing_xyz"] or [1.0, 1.0, 1.0]
    rounds = cfg.on_policy.rounds
    supervised = out / "on_policy" / "round_0" / "package" if rounds else out / "package"
    package = write_package(supervised / cfg.package.name, _manifest_fields(cfg, summary, metrics, spacing),
                            best_state, dtype=cfg.package.weights_dtype)
    if rounds:
        from models.on_policy import on_policy_rounds  # imports this module's helpers: imported here, not above

        package = on_policy_rounds(cfg, out, package, train_paths, train, val, device)
    return FinetuneResult(package, history, best_epoch, zero_row["val"] if zero_row else None,
                          best_row["val"] if best_row else None)
