"""The pretrained EfficientNet-Lite0 image tower on real posters: speed per image and quantisation.

Rows (times per image, model only, preprocessing excluded; `--threads` intra-op threads):
- torch eager (channels-last, inference mode), ONNX fp32 and the exporter's int8 (`export.onnx_export`
  schemes: they quantise MatMul/Gemm only, so on this CNN only the content head is int8), each at
  batch 1 (p50 of `--repeats`) and batch 32;
- two experiments that quantise the convolutions themselves (not shipped by the exporter): dynamic
  int8 (ConvInteger) and static QDQ int8 (per-channel weights, activations calibrated MinMax on
  `--calib` other posters); their cosine to torch says whether they pass the exporter's 0.99 gate;
- frozen feature extraction of the whole catalogue (`train.encoders.cache.extract` into a fresh
  cache: decode + preprocess + encode, batch 64): items/s.
The tower carries a seeded random content head (1280 -> 64), as in bench/encode_bench.py.

    python -m bench.image_tower [--data ../shared/data/ml100k_mm] [--threads 2] [--n 64]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from bench.common import SHARED_DATA
from export import onnx_export
from train.data import load_dataset
from train.encoders import TimmCnnConfig, build_encoder
from train.encoders.cache import extract
from train.encoders.preprocess import PreprocessSpec, preprocess_images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=SHARED_DATA / "ml100k_mm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=64, help="posters for parity and batch timing")
    p.add_argument("--calib", type=int, default=128, help="other posters for static int8")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--skip-catalogue", action="store_true")
    return p.parse_args(argv)


def posters(data: Path) -> list:
    """The catalogue's images as training sees them (item order; None where missing)."""
    return list(load_dataset(data).items.images)


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def per_image_ms(run, batch: np.ndarray, repeats: int) -> tuple[float, float]:
    """(ms per image at batch 1, ms per image at batch len(batch))."""
    one = timed(lambda: run(batch[:1]), repeats)
    many = timed(lambda: run(batch), max(3, repeats // 5))
    return 1000 * one, 1000 * many / len(batch)


def quantize_convs(src: Path, workdir: Path, calib: np.ndarray) -> dict[str, Path]:
    """int8 convolutions: dynamic (ConvInteger) and static QDQ calibrated on `calib`."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(src))
    del model.graph.value_info[:]
    plain, pre = workdir / "plain.onnx", workdir / "pre.onnx"
    onnx.save(model, str(plain))
    dynamic, static = workdir / "conv_dynamic.onnx", workdir / "conv_static.onnx"
    quantize_dynamic(str(plain), str(dynamic), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    quant_pre_process(str(plain), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": calib[i:i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(pre), str(static), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return {"int8 conv dynamic (ConvInteger, experiment)": dynamic,
            "int8 conv static QDQ (MinMax calibration, experiment)": static}


def speed_rows(args, items: list, workdir: Path) -> list[tuple]:
    """(backend, ms/img batch 1, ms/img batch n, cos min to torch, MB) per backend."""
    tower = build_encoder(TimmCnnConfig())
    torch.manual_seed(0)
    encoder = onnx_export.ImageEncoder(tower, nn.Linear(tower.out_dim, 64)).eval()
    spec = PreprocessSpec.model_validate(tower.preprocess_spec())
    chosen = [p for p in items if p is not None]
    batch = preprocess_images(chosen[:args.n], spec)[0]  # (n, 3, 224, 224)
    calib = preprocess_images(chosen[args.n:args.n + args.calib], spec)[0]
    with torch.inference_mode():
        reference = encoder(torch.from_numpy(batch)).numpy()

        def eager(x: np.ndarray) -> np.ndarray:
            return encoder(torch.from_numpy(x)).numpy()

        rows = [("torch eager", *per_image_ms(eager, batch, args.repeats), 1.0, float("nan"))]
    fp32 = workdir / "image_encoder.onnx"
    onnx_export.export_encoder(encoder, (torch.from_numpy(batch[:2]),), fp32, {0: "batch"})
    head_int8 = workdir / "head_int8.onnx"
    serving = {"image": batch}
    scheme, _ = onnx_export.quantize_checked(fp32, head_int8, lambda p: float(onnx_export.cosines(
        onnx_export.run_session(onnx_export.session(p, args.threads), serving), reference).min()))
    paths = {"ONNX fp32": fp32, f"ONNX int8, exporter ({scheme}: head only)": head_int8}
    paths |= quantize_convs(fp32, workdir, calib)
    for name, path in paths.items():
        sess = onnx_export.session(path, args.threads)

        def run(x: np.ndarray, sess=sess) -> np.ndarray:
            return onnx_export.run_session(sess, {"image": x})

        cos = float(onnx_export.cosines(run(batch), reference).min())
        rows.append((name, *per_image_ms(run, batch, args.repeats), cos,
                     path.stat().st_size / 2**20))
    return rows


def catalogue_rate(items: list, threads: int) -> tuple[int, float]:
    """(items, seconds) of frozen feature extraction of the whole catalogue into a fresh cache."""
    tower = build_encoder(TimmCnnConfig())
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        extract(tower, items, Path(cache), batch_size=64, progress=False)
        return len(items), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print markdown tables."""
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    items = posters(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        rows = speed_rows(args, items, Path(tmp))
    print(f"\nEfficientNet-Lite0 + 1280->64 head, 224 px posters, {args.threads} threads, "
          f"torch {torch.__version__}; ms per image (model only)\n")
    print(f"| backend | batch 1 | batch {args.n} | cos min to torch ({args.n} posters) | MB |")
    print("|---|---|---|---|---|")
    for name, one, many, cos, mb in rows:
        print(f"| {name} | {one:.1f} | {many:.1f} | {cos:.4f} | {mb:.1f} |")
    if not args.skip_catalogue:
        n, seconds = catalogue_rate(items, args.threads)
        print(f"\nfrozen feature extraction, whole catalogue ({n} items, decode + preprocess + "
              f"encode, batch 64): {seconds:.1f} s = {n / seconds:.1f} items/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
