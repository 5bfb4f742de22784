"""Train a multi-label 3-D U-Net from NPZ folders; the result is a model package.

Cases are resampled once to the model spacing and kept in (device) memory. Each iteration draws patches (part of
them centred on a structure), augments them on the device (left/right mirror with label swap, rotation/scaling,
intensity), and minimises BCE + soft Dice over the structures *present* in each case. Every ``val_every`` epochs
the whole validation volumes are segmented and the mean Dice over structures selects ``best.pt``; ``last.pt`` holds
everything needed to resume (model, optimiser, scheduler, RNG states, history).

Only :func:`train` touches the disk (the run folder); the rest take and return values.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from config.training import NpzData, TrainingConfig
from models.data import KeyMap, LabelSource, find_cases, read_npz
from models.errors import ModelInputError, TrainingError
from models.networks import build_network, expand_input_weights
from models.organs import normalise, resample, resolve_device
from models.package import Intensity, Manifest, ModelPackage, write_package

__all__ = ["PreparedCase", "TrainResult", "manifest_fields", "masked_loss", "prepare_case", "train",
           "RunFolder", "start_run", "save_last", "restore_last", "out_of_time"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedCase:
    case_id: str
    image: np.ndarray  # (Z, Y, X) float32, normalised, model spacing
    masks: np.ndarray  # (C, Z, Y, X) uint8, model spacing
    present: np.ndarray  # (C,) bool
    foreground: tuple[np.ndarray, ...]  # per channel: (N, 3) sampled voxel indices, empty when absent


@dataclass(frozen=True)
class TrainResult:
    package: ModelPackage
    history: list[dict[str, Any]]
    best_epoch: int
    best_dice: float


def _intensity(cfg: TrainingConfig) -> Intensity:
    n = cfg.network
    return Intensity(lower=n.window[0], upper=n.window[1], mean=n.mean, std=n.std)


def _label_sources(cfg: TrainingConfig) -> list[LabelSource]:
    return [LabelSource(lab.name, tuple(lab.source_names)) for lab in cfg.labels]


def npz_keymap(d: NpzData) -> KeyMap:
    """How the configured NPZ cases name their arrays."""
    return KeyMap(tuple(d.image_keys), d.spacing_key, d.spacing_order, d.mask_prefix, d.label_map_key, d.label_names_key)


def _keymap(cfg: TrainingConfig) -> KeyMap:
    return npz_keymap(cfg.data)


def run_case_paths(d: NpzData) -> tuple[list[Path], list[Path]]:
    """The training and validation NPZ files of a run (``max_*_cases`` applied); no training case is an error."""
    train_paths = find_cases(d.train_dirs)[: d.max_train_cases]
    val_paths = find_cases(d.val_dirs)[: d.max_val_cases] if d.val_dirs else []
    if not train_paths:
        raise TrainingError(f"no *.npz cases in {d.train_dirs}")
    return train_paths, val_paths


def prepare_case(path: Path, cfg: TrainingConfig, max_foreground: int = 4000) -> PreparedCase:
    """Read one NPZ case and bring it to the model spacing and intensity scale."""
    case = read_npz(path, _label_sources(cfg), _keymap(cfg))
    target = cfg.network.target_spacing
    image = normalise(resample(case.image, case.spacing_xyz, target), _intensity(cfg)).astype(np.float32)
    masks = np.zeros((len(cfg.labels), *image.shape), dtype=np.uint8)
    rng = np.random.default_rng(zlib.crc32(case.case_id.encode()))
    fg: list[np.ndarray] = []
    for c in range(len(cfg.labels)):
        if case.present[c]:
            masks[c] = resample(case.masks[c], case.spacing_xyz, target, image.shape) >= 0.5
        idx = np.argwhere(masks[c])
        if len(idx) > max_foreground:
            idx = idx[rng.choice(len(idx), max_foreground, replace=False)]
        fg.append(idx.astype(np.int32))
    present = case.present & np.array([len(f) > 0 for f in fg])
    return PreparedCase(case.case_id, image, masks, present, tuple(fg))


def _prepare_all(paths: list[Path], cfg: TrainingConfig) -> list[PreparedCase]:
    if cfg.data.workers > 1 and len(paths) > 1:
        with ProcessPoolExecutor(cfg.data.workers) as pool:
            return list(pool.map(prepare_case, paths, [cfg] * len(paths)))
    return [prepare_case(p, cfg) for p in paths]


# ----------------------------------------------------------------------------------------------- sampling / aug
@dataclass(frozen=True)
class _Resident:
    """A prepared case as tensors on the training device (sampling and validation happen there)."""

    image: torch.Tensor  # (Z, Y, X) float32
    masks: torch.Tensor  # (C, Z, Y, X) uint8
    present: torch.Tensor  # (C,) bool
    foreground: tuple[np.ndarray, ...]
    pad_value: float


def _resident(case: PreparedCase, device: str) -> _Resident:
    return _Resident(torch.from_numpy(case.image).to(device), torch.from_numpy(case.masks).to(device),
                     torch.from_numpy(case.present).to(device), case.foreground, float(case.image.min()))


def _sample_patch(
    case: _Resident, patch: tuple[int, int, int], rng: np.random.Generator, centre: np.ndarray | None,
    z_margin: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A patch of ``case``; along Z it may start ``z_margin`` slices before the volume or end as far after it, with
    the end slices repeated as inference pads them (a slice network's neighbours), so the volume's first and last
    slices are trained too. Y and X stay inside the volume where it is large enough, else pad with air."""
    shape = case.image.shape
    lo = [-z_margin, 0, 0]
    hi = [max(n - p + m, l) for n, p, m, l in zip(shape, patch, (z_margin, 0, 0), lo)]
    if centre is not None:
        start = [int(np.clip(c - p // 2, l, h)) for c, p, l, h in zip(centre, patch, lo, hi)]
    else:
        start = [int(rng.integers(l, h + 1)) for l, h in zip(lo, hi)]
    zs = torch.arange(start[0], start[0] + patch[0], device=case.image.device)
    inside = ((zs >= 0) & (zs < shape[0])).to(case.masks.dtype)
    zs = zs.clamp(0, shape[0] - 1)
    yx = (slice(start[1], start[1] + patch[1]), slice(start[2], start[2] + patch[2]))
    img = case.image[zs][(slice(None), *yx)]
    msk = case.masks[:, zs][(slice(None), slice(None), *yx)] * inside[None, :, None, None]
    pad = [q for p, n in zip(reversed(patch[1:]), reversed(img.shape[1:])) for q in (0, p - n)]
    if any(pad):
        img = F.pad(img, pad, value=case.pad_value)
        msk = F.pad(msk, pad)
    return img, msk


def _rotation(rng: np.random.Generator, cfg: TrainingConfig) -> np.ndarray:
    a = cfg.augment
    rz = math.radians(rng.uniform(-a.rotate_deg, a.rotate_deg))
    rx, ry = (math.radians(rng.uniform(-a.tilt_deg, a.tilt_deg)) for _ in range(2))
    cz, sz, cx, sx, cy, sy = math.cos(rz), math.sin(rz), math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry)
    # affine_grid works in (x, y, z) = (W, H, D) normalised coordinates; rz turns the axial plane
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return (mz @ mx @ my) / rng.uniform(*a.scale)


def augment(
    image: torch.Tensor, masks: torch.Tensor, present: torch.Tensor, cfg: TrainingConfig,
    mirror_perm: list[int], rng: np.random.Generator, z_crop: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augment a batch (B,1,Z,Y,X) image, (B,C,Z,Y,X) float masks, (B,C) present, on their device. The masks come
    back without ``z_crop`` slices at each end: a slice network's context slices need no labels, and resampling
    seven label channels over a 52-slice patch cost more than the network step."""
    a = cfg.augment
    b = image.shape[0]
    for i in range(b):
        if rng.random() < a.mirror_p:
            image[i] = torch.flip(image[i], dims=[-1])
            masks[i] = torch.flip(masks[i], dims=[-1])[mirror_perm]
            present[i] = present[i][mirror_perm]
    theta = np.tile(np.eye(3, 4), (b, 1, 1))
    do_affine = rng.random(b) < a.affine_p
    for i in np.flatnonzero(do_affine):
        theta[i, :, :3] = _rotation(rng, cfg)
    if do_affine.any():
        t = torch.as_tensor(theta, dtype=torch.float32, device=image.device)
        grid = F.affine_grid(t, list(image.shape), align_corners=False)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
        grid = grid[:, z_crop : grid.shape[1] - z_crop]  # where the kept slices sample the whole patch's masks
        masks = (F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False) >= 0.5).float()
    elif z_crop:
        masks = masks[:, :, z_crop:-z_crop]
    scale = torch.as_tensor(1 + rng.uniform(-a.intensity_scale, a.intensity_scale, b), dtype=torch.float32)
    shift = torch.as_tensor(rng.uniform(-a.intensity_shift, a.intensity_shift, b), dtype=torch.float32)
    image = image * scale.view(b, 1, 1, 1, 1).to(image.device) + shift.view(b, 1, 1, 1, 1).to(image.device)
    if a.noise_std > 0:
        image = image + a.noise_std * torch.randn_like(image)
    return image, masks, present


def masked_loss(logits: torch.Tensor, target: torch.Tensor, present: torch.Tensor, dice_weight: float) -> torch.Tensor:
    """BCE over (sample, structure) pairs whose structure is present in the case, plus soft Dice over the structures
    that have voxels in this batch.

    A structure present in the case but outside every patch of the batch is left to BCE: scoring it with a smoothed
    Dice of 1 when nothing is predicted made "predict nothing" a minimum the network fell into (loss ~0.75, no
    organ segmented) on small head-and-neck organs."""
    logits = logits.float()
    w = present.float()  # (B, C)
    if w.sum() == 0:
        return logits.sum() * 0
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(2, 3, 4))
    bce = (bce * w).sum() / w.sum()
    prob = torch.sigmoid(logits)
    dims = (0, 2, 3, 4)
    wv = w[:, :, None, None, None]
    inter = (prob * target * wv).sum(dims)
    denom = (prob * wv).sum(dims) + (target * wv).sum(dims)
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    has = (target * wv).sum(dims) > 0
    if not has.any():
        return bce
    return bce + dice_weight * (1 - dice[has].mean())


# ----------------------------------------------------------------------------------------------------- validation
def validate(net: torch.nn.Module, cases: list[_Resident], manifest: Manifest, device: str) -> dict[str, float]:
    """Mean Dice per structure (over cases where it is present) at the model spacing, no post-processing."""
    from models.organs import network_logits

    net.eval()
    cut = torch.tensor([math.log(t / (1 - t)) for t in manifest.label_thresholds()], device=device).view(-1, 1, 1, 1)
    scores: dict[str, list[float]] = {lab.name: [] for lab in manifest.labels}
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        for case in cases:
            pred = network_logits(net, case.image[None, None], manifest)[0].float() >= cut
            truth = case.masks > 0
            inter = (pred & truth).flatten(1).sum(1).float()
            total = (pred.flatten(1).sum(1) + truth.flatten(1).sum(1)).float()
            dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)).cpu().numpy()
            for c, lab in enumerate(manifest.labels):
                if bool(case.present[c]):
                    scores[lab.name].append(float(dice[c]))
    net.train()
    return {k: float(np.mean(v)) for k, v in scores.items() if v}


# ------------------------------------------------------------------------------------------------------- manifest
def manifest_fields(cfg: TrainingConfig, summary: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """Manifest content (without ``weights``) for a model trained with ``cfg``."""
    n = cfg.network
    params = dict(n.params, in_channels=1, out_channels=len(cfg.labels))
    return {
        "name": n.name,
        "version": n.version,
        "description": n.description,
        "architecture": {"name": n.architecture, "params": params},
        "target_spacing": list(n.target_spacing),
        "intensity": _intensity(cfg).model_dump(),
        "patch": {"size": list(n.patch_size), "inference": n.inference},
        "threshold": n.threshold,
        "labels": [
            {"name": lab.name, "source_names": list(lab.source_names), "color": list(lab.color),
             "roi_type": lab.roi_type, "largest_component": lab.largest_component, "fill_holes": lab.fill_holes,
             "mirror": lab.mirror, "threshold": lab.threshold}
            for lab in cfg.labels
        ],
        "training": summary,
        "metrics": metrics,
    }


def training_device(choice: str) -> str:
    """The torch device of a training run: :func:`models.organs.resolve_device`, failing as a training error."""
    try:
        return resolve_device(choice)
    except ModelInputError as exc:
        raise TrainingError(str(exc)) from exc


@dataclass(frozen=True)
class RunFolder:
    """Where a resumable training run writes: ``out`` (history, curve, package) and ``checkpoints/``."""

    device: str
    out: Path
    checkpoints: Path
    train_paths: list[Path]
    val_paths: list[Path]

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"


def start_run(cfg: Any) -> RunFolder:
    """Device, threads and folders of a run (organ training or fine-tuning: both configs carry ``device``,
    ``threads``, ``output_dir`` and ``data``)."""
    device = training_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    train_paths, val_paths = run_case_paths(cfg.data)
    return RunFolder(device, out, out / "checkpoints", train_paths, val_paths)


def save_last(run: RunFolder, model_state: dict[str, Any], opt: torch.optim.Optimizer, sched: Any,
              rng: np.random.Generator, epoch: int, history: list[dict[str, Any]], **extra: Any) -> None:
    """Everything a resume needs after ``epoch``, written atomically to ``last.pt`` (a run stopped while writing
    keeps the previous epoch's)."""
    tmp = run.checkpoints / "last.tmp"
    torch.save({"model": model_state, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "epoch": epoch,
                "history": history, **extra}, tmp)
    tmp.replace(run.last)


def restore_last(state: dict[str, Any], opt: torch.optim.Optimizer, sched: Any,
                 rng: np.random.Generator) -> tuple[int, list[dict[str, Any]]]:
    """Optimiser, schedule and random states from a :func:`save_last` checkpoint; (next epoch, history). The
    model's weights are the caller's to load (a fine-tuning run holds only the tuned parts)."""
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    rng.bit_generator.state = state["rng"]
    torch.set_rng_state(state["torch_rng"])
    return state["epoch"] + 1, state["history"]


def out_of_time(limit_minutes: float | None, started: float, epoch_times: list[float], epoch: int,
                epochs: int) -> bool:
    """Whether a run with a time limit should stop after ``epoch``: another epoch as long as the longest so far
    would pass the limit (a later resume continues)."""
    if not limit_minutes or epoch + 1 >= epochs:
        return False
    if time.monotonic() - started + max(epoch_times) > limit_minutes * 60:
        log.warning("time limit reached after epoch %d; resume to continue", epoch)
        return True
    return False


def _plot_curve(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["loss"] for h in history], label="training loss", color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    val = [(h["epoch"], h["val_mean_dice"]) for h in history if h.get("val_mean_dice") is not None]
    if val:
        ax2.plot(*zip(*val), label="validation mean Dice", color="tab:orange", marker=".")
    ax2.set_ylabel("validation mean Dice")
    ax2.set_ylim(0, 1)
    fig.legend(loc="lower center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------- train
def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _batch(
    cases: list[_Resident], by_label: list[list[int]], cfg: TrainingConfig, rng: np.random.Generator,
    z_margin: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch; foreground patches pick a structure (uniformly, or by the labels' ``sample_weight``: rare organs are
    seen as often as common ones), then a case holding it, then one of its voxels as the patch centre."""
    labels = [c for c, idx in enumerate(by_label) if idx]
    weights = np.array([cfg.labels[c].sample_weight for c in labels])
    imgs, msks, pres = [], [], []
    for _ in range(cfg.batch_size):
        centre = None
        if labels and rng.random() < cfg.foreground_fraction:
            if np.all(weights == weights[0]):  # the draw older runs made, so they reproduce
                c = labels[int(rng.integers(len(labels)))]
            else:
                c = labels[int(rng.choice(len(labels), p=weights / weights.sum()))]
            case = cases[by_label[c][int(rng.integers(len(by_label[c])))]]
            centre = case.foreground[c][int(rng.integers(len(case.foreground[c])))]
        else:
            case = cases[int(rng.integers(len(cases)))]
        img, msk = _sample_patch(case, cfg.network.patch_size, rng, centre, z_margin)
        imgs.append(img)
        msks.append(msk)
        pres.append(case.present)
    return torch.stack(imgs)[:, None], torch.stack(msks).float(), torch.stack(pres)


def _grows_far_context(have: dict[str, Any], want: dict[str, Any]) -> bool:
    """Whether slice-network params ``want`` only add far offsets after ``have``'s (the channels they append can
    start at zero weight)."""
    far_have, far_want = list(have.get("far", [])), list(want.get("far", []))
    rest = {k: v for k, v in have.items() if k != "far"} == {k: v for k, v in want.items() if k != "far"}
    return rest and len(far_want) > len(far_have) and far_want[: len(far_have)] == far_have


def _initial_weights(cfg: TrainingConfig, target: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights of the package ``cfg.init_from``, checked against the configured network and labels. A slice
    network configured with more ``far`` offsets than the package's starts from its weights with the new input
    channels at zero (:func:`~models.networks.expand_input_weights`) to fit ``target``, the new network's state."""
    from models.package import find_package, load_package

    ref = cfg.init_from or ""
    package = load_package(ref) if Path(ref).is_dir() else find_package(ref)
    m = package.manifest
    wanted = manifest_fields(cfg, {}, {})["architecture"]
    problems = []
    if m.label_names != [lab.name for lab in cfg.labels]:
        problems.append(f"labels {m.label_names} differ from the config's {[lab.name for lab in cfg.labels]}")
    grows = m.architecture.name == wanted["name"] == "slices.UNet" and _grows_far_context(m.architecture.params,
                                                                                          wanted["params"])
    if (m.architecture.name, m.architecture.params) != (wanted["name"], wanted["params"]) and not grows:
        problems.append(f"architecture {m.architecture.name} {m.architecture.params} differs from the config's "
                        f"{wanted['name']} {wanted['params']}")
    if problems:
        raise TrainingError(f"init_from {ref}: " + "; ".join(problems))
    state = torch.load(package.weights_path, map_location="cpu", weights_only=True)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if grows and target is not None:
        state = expand_input_weights(state, target, int(wanted["params"].get("in_channels", 1)))
    return state


def train(cfg: TrainingConfig) -> TrainResult:
    """Run (or resume) training as configured; writes the run folder and returns the model package."""
    run = start_run(cfg)
    device, out, ckpt_dir = run.device, run.out, run.checkpoints
    t0 = time.monotonic()
    train_cases = [c for c in _prepare_all(run.train_paths, cfg) if c.present.any()]
    val_cases = _prepare_all(run.val_paths, cfg)
    if not train_cases:
        raise TrainingError("no training case holds any of the configured structures")
    log.info("prepared %d training and %d validation cases in %.0f s", len(train_cases), len(val_cases),
             time.monotonic() - t0)

    torch.manual_seed(cfg.seed)
    net = build_network(cfg.network.architecture, dict(cfg.network.params, in_channels=1,
                                                        out_channels=len(cfg.labels))).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    total = cfg.epochs * cfg.iterations_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, cfg.optim.warmup_iterations))
    rng = np.random.default_rng(cfg.seed)
    history: list[dict[str, Any]] = []
    start_epoch, best_dice, best_epoch = 0, -1.0, -1
    if cfg.resume and run.last.is_file():
        state = torch.load(run.last, map_location=device, weights_only=False)
        if state["labels"] != [lab.name for lab in cfg.labels]:
            raise TrainingError(f"{run.last}: checkpoint labels {state['labels']} differ from the config's")
        net.load_state_dict(state["model"])
        start_epoch, history = restore_last(state, opt, sched, rng)
        best_dice, best_epoch = state["best_dice"], state["best_epoch"]
        log.info("resumed from %s at epoch %d", run.last, start_epoch)
    elif cfg.init_from:
        net.load_state_dict(_initial_weights(cfg, net.state_dict()))
        log.info("starting from the weights of %s", cfg.init_from)

    fields = manifest_fields(cfg, {}, {})
    manifest = Manifest.model_validate({**fields, "weights": {"file": "-", "sha256": "0" * 64}})
    perm = manifest.mirror_permutation()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.startswith("cuda"))
    epoch_times: list[float] = []
    resident = [_resident(c, device) for c in train_cases]
    val_resident = [_resident(c, device) for c in val_cases]
    by_label = [[i for i, c in enumerate(train_cases) if c.present[k]] for k in range(len(cfg.labels))]
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed patch size while training; switched off for validation
    z_context = int(getattr(net, "z_context", 0))
    if z_context and cfg.network.patch_size[0] <= 2 * z_context:
        raise TrainingError(f"patch_size Z {cfg.network.patch_size[0]} must exceed 2 x context ({z_context})")
    net.train()
    for epoch in range(start_epoch, cfg.epochs):
        te = time.monotonic()
        losses = []
        bar = _progress(cfg, epoch)
        for _ in bar:
            image, masks, present = _batch(resident, by_label, cfg, rng, z_context)
            # a slice-wise network's patch end slices only serve as neighbours: no labels, no outputs there
            image, masks, present = augment(image, masks, present, cfg, perm, rng, z_context)
            with autocast:
                logits = net.forward_valid(image) if z_context else net(image)
            loss = masked_loss(logits, masks, present, cfg.optim.dice_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        row: dict[str, Any] = {"epoch": epoch, "loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0]}
        if val_cases and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
            bench_flag, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
            per_label = validate(net, val_resident, manifest, device)
            torch.backends.cudnn.benchmark = bench_flag
            row["val_dice"] = per_label
            row["val_mean_dice"] = float(np.mean(list(per_label.values())))
            if row["val_mean_dice"] > best_dice:
                best_dice, best_epoch = row["val_mean_dice"], epoch
                torch.save(net.state_dict(), ckpt_dir / "best.pt")
        history.append(row)
        log.info("epoch %d: %s", epoch, {k: v for k, v in row.items() if k != "val_dice"})
        save_last(run, net.state_dict(), opt, sched, rng, epoch, history, best_dice=best_dice, best_epoch=best_epoch,
                  labels=[lab.name for lab in cfg.labels])
        epoch_times.append(time.monotonic() - te)
        if out_of_time(cfg.time_limit_minutes, t0, epoch_times, epoch, cfg.epochs):
            break
    (out / "history.json").write_text(json.dumps(history, indent=1))
    _plot_curve(history, out / "curve.png")
    if best_epoch < 0:  # no validation set: ship the last weights
        torch.save(net.state_dict(), ckpt_dir / "best.pt")
        best_epoch = history[-1]["epoch"] if history else -1
    best_state = torch.load(ckpt_dir / "best.pt", map_location="cpu", weights_only=True)
    summary = {
        "train_cases": len(train_cases),
        "validation_cases": len(val_cases),
        "train_dirs": [str(p) for p in cfg.data.train_dirs],
        "structures_present_in_train": {
            lab.name: int(sum(c.present[i] for c in train_cases)) for i, lab in enumerate(cfg.labels)},
        "epochs_run": len(history),
        "epochs_planned": cfg.epochs,
        "iterations_per_epoch": cfg.iterations_per_epoch,
        "batch_size": cfg.batch_size,
        "best_epoch": best_epoch,
        "seed": cfg.seed,
    }
    if cfg.init_from:
        summary["init_from"] = cfg.init_from
    metrics = {}
    if best_dice >= 0:
        best_row = next(h for h in history if h["epoch"] == best_epoch)
        metrics = {"selection": "validation mean Dice at model spacing, no post-processing",
                   "validation_dice_model_grid": best_row["val_dice"], "validation_mean_dice_model_grid": best_dice}
    package = write_package(out / "package" / cfg.network.name, manifest_fields(cfg, summary, metrics), best_state,
                            dtype=cfg.network.weights_dtype)
    return TrainResult(package, history, best_epoch, best_dice)


def _progress(cfg: TrainingConfig, epoch: int) -> Any:
    rng = range(cfg.iterations_per_epoch)
    if not cfg.progress:
        return rng
    from tqdm.auto import tqdm

    return tqdm(rng, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
