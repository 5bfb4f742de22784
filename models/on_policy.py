"""On-policy rounds of LiteMedSAM fine-tuning: train the decoder on the boxes its own propagation gives (DAgger).

Supervised fine-tuning (:mod:`models.finetune`) prompts each crop with a box made from the clinical contours: the
slice's own, a neighbour's, or a jittered one. In seed mode the prompt is the box of the mask decoded on the last
slice, so errors compound along a front. A round propagates the current package over training cases (a seed on each
structure's middle slice, the propagation defaults), records every box-prompted decode (the crop's encoding and the
box the front gave) and takes the clinical contour on that slice as the target, empty past the structure's end.
Those decodes, mixed with the supervised crops (prompted as supervised training prompts them), train the tuned parts
at a cosine-decayed rate; the result is the next round's package, with the same manifest (reach, growth, abutments).
Each decode also records the mask prompt its front offered (the last slice's logits on the crop): with
``on_policy.mask_prompt`` > 0 that fraction of decodes is trained with it, and the package says so
(``architecture.params.mask_prompt``) so that propagation gives it one.

Layout under a run folder: ``on_policy/round_0/package/<name>`` (the supervised package), then per round
``on_policy/round_<r>/decodes/<case>.pt`` (resumable: a case already collected is not propagated again) and
``on_policy/round_<r>/package/<name>``; the last round's package is copied to ``package/<name>``.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from config.finetune import FinetuneConfig, OnPolicy, PromptMix
from models.crops import CropWindow
from models.data import KeyMap, LabelSource, read_npz
from models.errors import TrainingError
from models.evaluate_propagation import seed_slices
from models.finetune import (CropSet, decode_logits, freeze_all_but, item_box, item_target, label_sources, native_dice,
                             prompt_kinds, segmentation_loss, tuned_state, unpack_native, validate)
from models.litemedsam import LiteMedSamEngine
from models.package import MANIFEST_NAME, ModelPackage, load_package, write_package
from models.propagate import Decode, EncodingCache, PropagationSettings, Seed, propagate
from models.train import npz_keymap

__all__ = ["Decodes", "choose_cases", "collect_case", "decode_dice", "on_policy_rounds", "read_decodes",
           "round_package", "train_pass"]

log = logging.getLogger(__name__)


@dataclass
class Decodes:
    """Collected decodes, in memory: each item is (label index, crop window, the box the front gave)."""

    items: list[tuple[int, CropWindow, tuple[float, float, float, float]]]
    embeddings: torch.Tensor  # (N, 256, 64, 64) float16
    targets: torch.Tensor  # (N, 256, 256) bool: the clinical contour on the crop
    native: list[np.ndarray]  # the clinical contour on each decode's native slice (bool)
    masks: torch.Tensor | None = None  # (N, 256, 256) float16: the mask prompt each front offered (logits)

    def __len__(self) -> int:
        return len(self.items)


def choose_cases(paths: Sequence[Path], count: int, seed: int) -> list[Path]:
    """``count`` of ``paths`` at random (the same ones every round), sorted by name."""
    order = np.random.default_rng(seed).permutation(len(paths))[:count]
    return sorted((paths[i] for i in order), key=lambda p: p.name)


def collect_case(path: Path, shard: Path, package: str, labels: Sequence[LabelSource], keymap: KeyMap = KeyMap(),
                 threads: int | None = None) -> str:
    """Propagate ``path``'s structures from their middle slices with ``package`` and save every box-prompted
    decode (with or without the mask prompt, as the package propagates) with its target and the mask prompt its
    front offered to ``shard``; returns a line for the log."""
    from models.prompting import load_engine

    if threads:
        torch.set_num_threads(threads)
    engine = load_engine("litemedsam", package)
    started = time.perf_counter()
    case = read_npz(path, list(labels), keymap)
    names = [label.name for label in labels]
    truth = {n: case.masks[c] > 0 for c, n in enumerate(names) if case.present[c]}
    seeds = {n: Seed({z: t[z]}) for n, t in truth.items() for z in seed_slices(t)}
    decodes: list[Decode] = []
    propagate(engine, case.image.astype(np.float32), seeds, PropagationSettings(), EncodingCache(512),
              case.spacing_xyz, on_decode=decodes.append)
    kept = [d for d in decodes if d.prompt.points is None]
    slices = [truth[d.key][d.z] for d in kept]
    data = {
        "items": [{"case_id": case.case_id, "label": names.index(d.key), "z": d.z, "window": asdict(d.window),
                   "box": [float(v) for v in d.prompt.box]} for d in kept],
        "embeddings": (torch.stack([d.embedding.to(torch.float16).cpu() for d in kept]) if kept
                       else torch.zeros(0, 256, 64, 64, dtype=torch.float16)),
        "targets": torch.from_numpy(np.stack([item_target(t, d.window) for t, d in zip(slices, kept)]) if kept
                                    else np.zeros((0, 256, 256), bool)),
        "masks": (torch.from_numpy(np.stack([d.neighbour_logits for d in kept])).to(torch.float16) if kept
                  else torch.zeros(0, 256, 256, dtype=torch.float16)),
        "native": [np.packbits(t) for t in slices], "shape": tuple(case.image.shape[1:]),
    }
    shard.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, shard.with_suffix(".tmp"))
    shard.with_suffix(".tmp").replace(shard)
    empty = sum(1 for t in slices if not t.any())
    return f"{case.case_id}: {len(kept)} decodes ({empty} past the structure), {time.perf_counter() - started:.0f} s"


def _collect(job: tuple) -> str:
    return collect_case(*job)


def read_decodes(shards: Sequence[Path]) -> Decodes:
    """The decodes :func:`collect_case` saved in ``shards`` (mask prompts only when every shard has them: shards
    collected before they were recorded have none)."""
    items, embeddings, targets, native, masks = [], [], [], [], []
    for shard in shards:
        d = torch.load(shard, weights_only=False)
        items += [(it["label"], CropWindow(**it["window"]), tuple(it["box"])) for it in d["items"]]
        embeddings.append(d["embeddings"])
        targets.append(d["targets"])
        masks.append(d.get("masks"))
        native += unpack_native(d)
    if not items:
        return Decodes([], torch.zeros(0, 256, 64, 64, dtype=torch.float16), torch.zeros(0, 256, 256, dtype=torch.bool),
                       [])
    offered = torch.cat(masks) if all(m is not None for m in masks) else None
    return Decodes(items, torch.cat(embeddings), torch.cat(targets), native, offered)


@torch.no_grad()
def decode_dice(net: torch.nn.Module, decodes: Decodes, device: str = "cpu", batch: int = 16,
                mask_prompt: bool = False) -> float:
    """Mean native-slice Dice of ``net`` on ``decodes``' own boxes, with the mask prompts the fronts offered when
    ``mask_prompt`` (NaN when there are none)."""
    if mask_prompt and decodes.masks is None:
        raise TrainingError("these decodes were collected without their mask prompts: collect them again")
    net.eval()
    scores = []
    for i in range(0, len(decodes), batch):
        boxes = torch.tensor([b for _, _, b in decodes.items[i:i + batch]], device=device)
        masks = decodes.masks[i:i + batch].to(device).float() if mask_prompt else None
        logits = decode_logits(net, decodes.embeddings[i:i + batch].to(device).float(), boxes,
                               masks).cpu().numpy()
        scores += [native_dice(lg, decodes.items[i + j][1], decodes.native[i + j]) for j, lg in enumerate(logits)]
    return float(np.mean(scores)) if scores else float("nan")


def train_pass(net: torch.nn.Module, params: Sequence[torch.nn.Parameter], decodes: Decodes, crops: CropSet,
               prompts: PromptMix, settings: OnPolicy, *, batch_size: int, dice_weight: float, seed: int,
               device: str) -> list[float]:
    """Train ``params`` on the decodes (prompted with the box the front gave, and its mask prompt at the rate
    ``settings.mask_prompt``) and the supervised crops (prompted as supervised training prompts them), shuffled
    together, for ``settings.epochs`` passes; returns the losses."""
    if settings.mask_prompt and decodes.masks is None:
        raise TrainingError("on_policy.mask_prompt: these decodes were collected without their mask prompts")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    n_dec, per_epoch = len(decodes), len(decodes) + len(crops)
    total = max(1, int(settings.epochs * per_epoch / batch_size))
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    order = np.concatenate([rng.permutation(per_epoch) for _ in range(math.ceil(settings.epochs) + 1)])
    losses: list[float] = []
    started = time.perf_counter()
    net.train()
    for b in range(total):
        picked = order[b * batch_size:(b + 1) * batch_size]
        from_crops = [int(k) - n_dec for k in picked if k >= n_dec]
        kinds = iter(prompt_kinds(prompts, [crops.items[m] for m in from_crops], rng))
        embeddings, boxes, targets, masks, with_mask = [], [], [], [], []
        for k in picked:
            if k < n_dec:
                embeddings.append(decodes.embeddings[k])
                boxes.append(decodes.items[k][2])
                targets.append(decodes.targets[k])
                with_mask.append(bool(settings.mask_prompt) and rng.random() < settings.mask_prompt)
                masks.append(decodes.masks[k] if with_mask[-1] else None)
            else:
                m = int(k) - n_dec
                embeddings.append(crops.embeddings[m])
                boxes.append(item_box(crops.items[m], next(kinds), rng, prompts.box_jitter))
                targets.append(crops.targets[m])
                with_mask.append(False)
                masks.append(None)
        mask_batch = (torch.stack([m if m is not None else torch.zeros(256, 256, dtype=torch.float16)
                                   for m in masks]).to(device).float() if any(with_mask) else None)
        logits = decode_logits(net, torch.stack(embeddings).to(device).float(),
                               torch.tensor(boxes, dtype=torch.float32, device=device), mask_batch,
                               torch.tensor(with_mask, device=device))
        loss = segmentation_loss(logits, torch.stack(targets).to(device).float(), dice_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if b % 100 == 0 or b == total - 1:
            log.info("on-policy batch %d/%d: loss %.4f (%.0f s)", b + 1, total, np.mean(losses[-100:]),
                     time.perf_counter() - started)
    net.eval()
    return losses


def round_package(base: ModelPackage, out: Path, state: dict[str, torch.Tensor], record: dict[str, Any],
                  scores: dict[str, Any], version: str, dtype: str, mask_prompt: bool = False) -> ModelPackage:
    """``base``'s manifest with ``state`` as its weights, ``record`` appended to ``training.on_policy`` and the
    validation figures replaced by this round's (``scores``: before/after validate() and held decode Dice);
    ``mask_prompt``: the round trained mask prompts (a package once trained with them keeps them)."""
    fields = base.manifest.model_dump(mode="json")
    fields.pop("weights")
    fields["version"] = version
    if mask_prompt:
        fields["architecture"]["params"]["mask_prompt"] = True
    training = dict(fields.get("training") or {})
    rounds = training.pop("on_policy", [])
    training["on_policy"] = (rounds if isinstance(rounds, list) else [rounds]) + [record]  # 1.5.0 wrote one dict
    fields["training"] = training
    before, after = scores["before"], scores["after"]
    metrics = dict(fields.get("metrics") or {})
    history = metrics.pop("on_policy", [])
    row = {"round": record["round"], "held_decode_dice": after["held"], "base_held_decode_dice": before["held"]}
    for key in ("validation_slice_dice", "validation_mean_slice_dice", "validation_mean_slice_dice_by_prompt"):
        metrics.pop(key, None)  # the base's: replaced below, or left out when this round scored no crops
    if after["val"] is not None:
        metrics.update({"validation_slice_dice": after["val"]["dice"],
                        "validation_mean_slice_dice": after["val"]["score"],
                        "validation_mean_slice_dice_by_prompt": after["val"]["mean"]})
        row.update({"validation_mean_slice_dice": after["val"]["score"],
                    "base_validation_mean_slice_dice": before["val"]["score"]})
    metrics.update({  # the shipped weights' figures; one pass per round, nothing selected
        "selection": "the last on-policy round (none selected); seed mode on OpenKBP validation: README",
        "on_policy": history + [row]})
    fields["metrics"] = metrics
    return write_package(out, fields, state, dtype=dtype)


def _weights_sha(package: ModelPackage) -> str:
    return package.manifest.weights.sha256


def on_policy_rounds(cfg: FinetuneConfig, out: Path, supervised: ModelPackage, train_paths: Sequence[Path],
                     crops: CropSet, val: CropSet, device: str) -> ModelPackage:
    """Run ``cfg.on_policy.rounds`` rounds from ``supervised`` (written under ``out/on_policy/round_0``); returns
    the last round's package, also copied to ``out/package/<name>``. A round whose package was made from the
    current base weights is reused; one made from other weights is redone, its decodes too."""
    settings, names = cfg.on_policy, [lab.name for lab in cfg.labels]
    if settings.case_names is None:
        chosen = choose_cases(train_paths, settings.cases, cfg.seed)
    else:
        by_name = {p.stem: p for p in train_paths}
        if missing := sorted(set(settings.case_names) - set(by_name)):
            raise TrainingError(f"on_policy.case_names: {missing} are not among the training cases")
        chosen = sorted((by_name[n] for n in set(settings.case_names)), key=lambda p: p.name)
    held, used = chosen[:settings.hold], chosen[settings.hold:]
    base = supervised
    for r in range(1, settings.rounds + 1):
        folder = out / "on_policy" / f"round_{r}"
        target = folder / "package" / cfg.package.name
        stamp = folder / "base.json"
        if stamp.is_file() and json.loads(stamp.read_text()).get("base_sha256") != _weights_sha(base):
            log.info("on-policy round %d was made from other weights: redoing it", r)
            shutil.rmtree(folder)
        if (target / MANIFEST_NAME).is_file():
            done = load_package(target)
            if done.manifest.training["on_policy"][-1].get("base_sha256") == _weights_sha(base):
                log.info("on-policy round %d: reusing %s", r, target)
                base = done
                continue
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"base_sha256": _weights_sha(base)}))
        shard_of = {p: folder / "decodes" / f"{p.stem}.pt" for p in chosen}
        todo = [p for p in chosen if not shard_of[p].is_file()]
        log.info("on-policy round %d: propagating %d of %d cases with %s", r, len(todo), len(chosen), base.path)
        jobs = [(p, shard_of[p], str(base.path), label_sources(cfg), npz_keymap(cfg.data),
                 1 if settings.workers > 1 else cfg.threads) for p in todo]
        if settings.workers > 1:
            with mp.get_context("spawn").Pool(settings.workers) as pool:
                for line in pool.imap_unordered(_collect, jobs):
                    log.info("%s", line)
        else:
            for job in jobs:
                log.info("%s", collect_case(*job))

        decodes = read_decodes([shard_of[p] for p in used])
        held_decodes = read_decodes([shard_of[p] for p in held])
        engine = LiteMedSamEngine.load(str(base.path), device, backend="torch")
        net, masked = engine.net, engine.mask_prompt or settings.mask_prompt > 0
        params = freeze_all_but(net, cfg.train_parts)
        scores: dict[str, Any] = {"before": {"held": decode_dice(net, held_decodes, device,
                                                                 mask_prompt=engine.mask_prompt),
                                             "val": validate(net, val, names, cfg.prompts.box_jitter, device)}}
        log.info("on-policy round %d: %d decodes from %d cases (%d past a structure's end), %d held from %d; "
                 "%d supervised crops", r, len(decodes), len(used), int((~decodes.targets.flatten(1).any(1)).sum()),
                 len(held_decodes), len(held), len(crops))
        started = time.monotonic()
        losses = train_pass(net, params, decodes, crops, cfg.prompts, settings, batch_size=cfg.batch_size,
                            dice_weight=cfg.dice_weight, seed=cfg.seed + r,
                            device=device)
        scores["after"] = {"held": decode_dice(net, held_decodes, device, mask_prompt=masked),
                           "val": validate(net, val, names, cfg.prompts.box_jitter, device)}
        log.info("on-policy round %d: held decode Dice %.3f -> %.3f, validation slices %.3f -> %.3f", r,
                 scores["before"]["held"], scores["after"]["held"], scores["before"]["val"]["score"],
                 scores["after"]["val"]["score"])
        record = {"round": r, "from": f"{base.manifest.name} {base.manifest.version}",
                  "base_sha256": _weights_sha(base), "cases": [p.stem for p in used],
                  "held_cases": [p.stem for p in held], "decodes": len(decodes), "supervised_crops": len(crops),
                  "epochs": settings.epochs, "lr": settings.lr, "mask_prompt": settings.mask_prompt,
                  "weight_decay": settings.weight_decay, "final_loss": float(np.mean(losses[-50:])),
                  "seconds": round(time.monotonic() - started, 1)}
        base = round_package(base, target, tuned_state(net, cfg.train_parts), record, scores,
                             cfg.package.version, cfg.package.weights_dtype, mask_prompt=masked)
    final = out / "package" / cfg.package.name
    final.mkdir(parents=True, exist_ok=True)
    for name in (base.manifest.weights.file, MANIFEST_NAME):  # weights first: the manifest hashes them
        shutil.copy2(base.path / name, final / f"{name}.tmp")
        (final / f"{name}.tmp").replace(final / name)
    return load_package(final)
