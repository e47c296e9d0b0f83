"""Encode-one-item latency: torch eager vs ONNX fp32 vs ONNX int8 (onnxruntime), batch 1.

Each tower gets a seeded random content head (out_dim -> 64) and is exported exactly as the
exporter does (export.onnx_export: dynamo, legacy fallback; int8 = the first scheme whose min
cosine to torch reaches 0.99 on the bench items). Latency is the p50 of `--repeats` calls on one
preprocessed item with `--threads` torch / onnxruntime intra-op threads (preprocessing excluded: it
is the same Pillow + numpy / tokenizers code for every backend). Towers: the tiny open_clip test
architecture, open_clip ViT-B-32 image + text (random init: speed and quantisation error only) and
the pretrained all-MiniLM-L6-v2 text tower, and the pretrained EfficientNet-Lite0 CNN (`lite0`; its
int8 schemes quantise MatMul/Gemm only, i.e. the content head: bench/image_tower.py measures int8
convolutions). Target: ONNX int8 >= 3x faster than torch eager for a
ViT-B-32 item (image + text) on 2 cores, cosine(int8, fp32) >= 0.99.

    python -m bench.encode_bench [--towers tiny vit-b-32 minilm] [--threads 2] [--repeats 30]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn


from export import onnx_export
from export.tokenizer import encode_texts, tokenizer_for
from train.encoders import (MiniLMConfig, OpenClipImageConfig, OpenClipTextConfig,
                            TimmCnnConfig, build_encoder)
from train.encoders.preprocess import PreprocessSpec, preprocess_images

TOWERS = {
    "tiny": [("image", OpenClipImageConfig(model="ptmrec-tiny", init_seed=0)),
             ("text", OpenClipTextConfig(model="ptmrec-tiny", init_seed=0))],
    "vit-b-32": [("image", OpenClipImageConfig(model="ViT-B-32", init_seed=0)),
                 ("text", OpenClipTextConfig(model="ViT-B-32", init_seed=0))],
    "minilm": [("text", MiniLMConfig())],
    "lite0": [("image", TimmCnnConfig())],  # pretrained EfficientNet-Lite0 (docs/image_tower.md)
}
ITEMS = [("red", "Rustic red striped coffee mug. A handmade ceramic mug for slow mornings."),
         ("navy", "Minimal navy plaid scarf. Soft wool, one size. Free shipping."),
         ("olive", "Sporty olive solid sneaker. Breathable mesh for daily runs. New arrival."),
         ("white", "Elegant white dotted lamp. This modern piece comes in white."),
         ("black", ""), ("pink", "Cozy pink heart pillow. 45 x 45 cm, machine washable.")]
TARGET_SPEEDUP = 3.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--towers", nargs="+", default=list(TOWERS), choices=list(TOWERS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--exporter", choices=onnx_export.EXPORTERS, default="dynamo")
    return p.parse_args(argv)


def images() -> list[Image.Image]:
    """Odd-sized synthetic product photos (noise on a coloured background)."""
    rng = np.random.default_rng(0)
    out = []
    for i, (colour, _) in enumerate(ITEMS):
        base = np.array(Image.new("RGB", (1, 1), colour).getpixel((0, 0)), dtype=np.float32)
        pixels = base + rng.normal(0, 40, (240 + 10 * i, 320, 3))
        out.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return out


def p50_ms(fn, repeats: int) -> float:
    """Median wall time of fn() in milliseconds, after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def wrapper_and_inputs(modality: str, tower, head: nn.Module, workdir: Path):
    """(encoder wrapper, serving-path input builder, raw items, dynamic axes, max length)."""
    if modality == "image":
        spec = PreprocessSpec.model_validate(tower.preprocess_spec())
        return (onnx_export.ImageEncoder(tower, head), lambda raw: {
            "image": preprocess_images(raw, spec)[0]}, images(), {0: "batch"}, 2)
    tokenizer, kind, names = tokenizer_for(tower)
    cls = onnx_export.BertTextEncoder if kind == "bert" else onnx_export.ClipTextEncoder
    axes = {0: "batch", 1: "length"} if kind == "bert" else {0: "batch"}
    return (cls(tower, head), lambda raw: encode_texts(tokenizer, raw, names),
            [t for _, t in ITEMS], axes, onnx_export._context_length(tower))


def bench_tower(modality: str, cfg, workdir: Path, args: argparse.Namespace) -> dict:
    """Latency of one tower + head at batch 1 in the three backends, and int8 cosines."""
    tower = build_encoder(cfg)
    torch.manual_seed(0)
    head = nn.Linear(tower.out_dim, 64)
    encoder, serving, raw, axes, max_len = wrapper_and_inputs(modality, tower, head, workdir)
    encoder.eval()
    path = workdir / f"{modality}.onnx"
    example, _ = tower.prepare_counted(raw[:2])
    onnx_export.export_encoder(encoder, encoder.torch_args(example), path, axes, max_len,
                               args.exporter)
    reference = onnx_export.torch_vectors(encoder, tower, raw, len(raw))
    fp32 = onnx_export.session(path, args.threads)
    int8_path = workdir / f"{modality}.int8.onnx"
    scheme, _ = onnx_export.quantize_checked(path, int8_path, lambda p: float(onnx_export.cosines(
        onnx_export.onnx_vectors(p, serving, raw, 1, singles=0)[0], reference).min()))
    int8 = onnx_export.session(int8_path, args.threads)
    one_torch = encoder.torch_args(tower.prepare_counted(raw[:1])[0])
    one = serving(raw[:1])
    with torch.inference_mode():
        torch_ms = p50_ms(lambda: encoder(*one_torch), args.repeats)
    fp32_out = np.concatenate([fp32.run(None, serving([r]))[0] for r in raw])
    int8_out = np.concatenate([int8.run(None, serving([r]))[0] for r in raw])
    return {"tower": f"{type(tower).__name__} ({getattr(cfg, 'model', 'all-MiniLM-L6-v2')})",
            "modality": modality, "torch": torch_ms,
            "fp32": p50_ms(lambda: fp32.run(None, one), args.repeats),
            "int8": p50_ms(lambda: int8.run(None, one), args.repeats), "scheme": scheme,
            "cos_fp32": float(onnx_export.cosines(int8_out, fp32_out).min()),
            "fp32_diff": float(np.abs(fp32_out - reference).max())}


def row(name: str, r: dict) -> str:
    """One markdown table row."""
    speedup = r["torch"] / r["int8"]
    return (f"| {name} | {r['torch']:.1f} | {r['fp32']:.1f} | {r['int8']:.1f} | {r['scheme']} | "
            f"{r['torch'] / r['fp32']:.2f}x | {speedup:.2f}x | {r['cos_fp32']:.4f} |")


def item_row(name: str, parts: list[dict]) -> str:
    """Row for a whole item: image + text towers summed."""
    total = {k: sum(p[k] for p in parts) for k in ("torch", "fp32", "int8")}
    total |= {"scheme": " + ".join(p["scheme"] for p in parts),
              "cos_fp32": min(p["cos_fp32"] for p in parts)}
    return row(f"**item: {name}**", total)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the markdown table."""
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.towers:
            for modality, cfg in TOWERS[name]:
                workdir = Path(tmp) / name
                workdir.mkdir(exist_ok=True)
                print(f"benchmarking {name} {modality} ...", file=sys.stderr, flush=True)
                results.setdefault(name, {})[modality] = bench_tower(modality, cfg, workdir, args)
    print(f"\nbatch 1, p50 of {args.repeats}, {args.threads} threads, torch "
          f"{torch.__version__}, exporter {args.exporter}; times in ms (model only)\n")
    print("| tower | torch eager | ONNX fp32 | ONNX int8 | int8 scheme | fp32 speed-up | "
          "int8 speed-up | cos(int8, fp32) min |")
    print("|---|---|---|---|---|---|---|---|")
    for name, towers in results.items():
        for modality, r in towers.items():
            print(row(f"{name} {modality}", r))
    for name, parts in (("tiny image + tiny text", [("tiny", "image"), ("tiny", "text")]),
                        ("ViT-B-32 image + text", [("vit-b-32", "image"), ("vit-b-32", "text")]),
                        ("ViT-B-32 image + MiniLM", [("vit-b-32", "image"), ("minilm", "text")]),
                        ("Lite0 image + MiniLM", [("lite0", "image"), ("minilm", "text")])):
        if all(t in results and m in results[t] for t, m in parts):
            print(item_row(name, [results[t][m] for t, m in parts]))
    vit = results.get("vit-b-32")
    if vit and len(vit) == 2:
        speedup = sum(r["torch"] for r in vit.values()) / sum(r["int8"] for r in vit.values())
        ok = speedup >= TARGET_SPEEDUP and min(r["cos_fp32"] for r in vit.values()) >= 0.99
        print(f"\nViT-B-32 item: int8 {speedup:.2f}x faster than torch eager "
              f"(target >= {TARGET_SPEEDUP:.0f}x): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
