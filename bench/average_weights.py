"""Average an on-policy round's tuned weights with its base package's: how hn-litemedsam 1.8.0 was made.

An on-policy round trained on one set of decodes moves the decoder towards those patients; the element-wise mean
of the round's weights and its base's (a "model soup" of two fine-tunings that share a start) kept what each
did best (model card, "A fourth round"). The round's package must record its base's weights hash
(``training.on_policy[-1].base_sha256``, written by ``bench/finetune_on_policy.py``), so the pair cannot be
mixed up:

    python bench/average_weights.py --round runs/op4/package/hn-litemedsam --base models/zoo/hn-litemedsam \\
        --version 1.8.0 --out runs/average

``--weight`` is the round's share (0.5: the plain mean). The copy records it in its last on-policy record
(``averaged_with_base``), the base's version, and ``metrics.selection``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round", dest="round_path", type=Path, required=True, help="the round's package folder")
    parser.add_argument("--base", type=Path, required=True, help="the package the round started from")
    parser.add_argument("--weight", type=float, default=0.5, help="the round's share of each tensor")
    parser.add_argument("--version", required=True)
    parser.add_argument("--selection", default="", help="text for metrics.selection (how it was chosen)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not 0.0 < args.weight < 1.0:
        parser.error("--weight must lie strictly between 0 and 1")

    import torch

    from models.package import load_package, write_package

    tuned, base = load_package(args.round_path), load_package(args.base)
    record = ((tuned.manifest.training or {}).get("on_policy") or [{}])[-1]
    if record.get("base_sha256") != base.manifest.weights.sha256:
        sys.exit(f"{args.round_path} was not trained from {args.base}: its last on-policy round records base "
                 f"{record.get('base_sha256')}, the base's weights are {base.manifest.weights.sha256}")
    a = torch.load(tuned.weights_path, map_location="cpu", weights_only=True)
    b = torch.load(base.weights_path, map_location="cpu", weights_only=True)
    if a.keys() != b.keys():
        sys.exit("the two packages store different tensors")
    mean = {k: a[k] * args.weight + b[k] * (1.0 - args.weight) if a[k].is_floating_point() else a[k] for k in a}

    fields = tuned.manifest.model_dump(mode="json", exclude={"weights"})
    fields["version"] = args.version
    record = fields["training"]["on_policy"][-1]
    record["averaged_with_base"] = args.weight
    record["note"] = (f"weights = {args.weight:g} x this round + {1 - args.weight:g} x "
                      f"{base.manifest.name} {base.manifest.version}, per tensor (bench/average_weights.py)")
    if args.selection:
        fields["metrics"] = {**(fields.get("metrics") or {}), "selection": args.selection}
    package = write_package(args.out / tuned.manifest.name, fields, mean, dtype=tuned.manifest.weights.dtype)
    print(f"{package.path}: {package.manifest.name} {args.version}, sha256 {package.manifest.weights.sha256}")


if __name__ == "__main__":
    main()
