"""LiteMedSAM image encoder: seconds per 256 x 256 crop in torch, ONNX Runtime, and dynamic int8 in both, interleaved.

    nice -n 19 .venv/bin/python bench/encoder.py [--threads 2] [--images 4] [--rounds 2]

Each round times every backend on the same random crops, one after another, so a machine whose load changes
during the run affects all of them alike; the ratio is the figure to read. Also prints how far each backend's
embeddings are from torch fp32 (relative L2 norm of the difference).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch

    from models.litemedsam import LiteMedSamEngine

    torch.set_num_threads(args.threads)
    ort = LiteMedSamEngine.load(backend="onnxruntime")
    eager = LiteMedSamEngine(ort.net, ort.version, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8_net = torch.ao.quantization.quantize_dynamic(ort.net.image_encoder, {torch.nn.Linear}, dtype=torch.qint8)

    def int8(images: np.ndarray) -> list:
        with torch.inference_mode():
            x = torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1).contiguous()
            return list(int8_net(x).unbind(0))

    def ort_int8_session():
        import tempfile

        import onnxruntime
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from models import onnx_cpu

        graph = onnx_cpu.cache_dir() / f"tinyvit-{ort.encoder_id}.onnx"  # written when ``ort`` was loaded
        quantised = Path(tempfile.mkdtemp()) / "tinyvit-int8.onnx"
        quantize_dynamic(str(graph), str(quantised), weight_type=QuantType.QInt8)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        return onnxruntime.InferenceSession(str(quantised), options, providers=["CPUExecutionProvider"])

    ort_int8 = ort_int8_session()

    def onnx_int8(images: np.ndarray) -> list:
        rgb = np.repeat(images[:, None], 3, axis=1)
        return [torch.from_numpy(ort_int8.run(None, {"input": rgb[i:i + 1]})[0][0]) for i in range(len(rgb))]

    backends = {"torch": eager.encode, "onnxruntime": ort.encode, "torch int8 (Linear)": int8,
                "onnxruntime int8": onnx_int8}
    images = np.random.default_rng(0).random((args.images, 256, 256), dtype=np.float32)
    reference = [e.float() for e in eager.encode(images)]
    times: dict[str, list[float]] = {k: [] for k in backends}
    errors = {}
    for _ in range(args.rounds):
        for name, encode in backends.items():
            started = time.perf_counter()
            found = encode(images)
            times[name].append((time.perf_counter() - started) / len(images))
            errors[name] = float(np.mean([float((f.float() - r).norm() / r.norm()) for f, r in zip(found, reference)]))
    base = np.median(times["torch"])
    print(f"threads {args.threads}, load average {os.getloadavg()[0]:.1f}")
    for name in backends:
        t = float(np.median(times[name]))
        print(f"{name:20s} {t:6.2f} s/crop  x{base / t:4.2f} vs torch  relative embedding error {errors[name]:.1e}")


if __name__ == "__main__":
    main()
