"""Export a run: `python -m export --run RUN_DIR --bundles BUNDLES_DIR [--publish] [...]`.

RUN_DIR is a stage-1 run (`python -m train`) or a stage-2 run (`python -m train.stage2`): the latter
exports its tuned towers (prompts in the ONNX graph, LoRA / (IA)^3 merged into the weights).
Options: --quantize int8, --factory FAISS_FACTORY (Flat, HNSW32, IVF256,Flat...), --exporter
dynamo|legacy (the other is the fallback), --parity-items N, --threads N, --stage1-run DIR (the
stage-1 run of a stage-2 run written before stage 2 recorded its stage-1 config).

Exit codes: 0 bundle written (and published with --publish), 1 export refused (parity, tokenizer,
exporter or bundle error; nothing new is published), 2 bad arguments or unreadable run.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from pydantic import ValidationError

from export.bundle import PARITY_ITEMS, export_run
from export.onnx_export import EXPORTERS, ExportError
from index.bundle import BundleError
from train.data import DatasetError
from train.run import CONFIG, STAGE2

log = logging.getLogger("export")


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the exporter."""
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run directory written by train")
    p.add_argument("--bundles", type=Path, required=True, help="bundles directory (vN/, CURRENT)")
    p.add_argument("--publish", action="store_true", help="point CURRENT at the new bundle")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 ONNX encoders: dynamic int8, else weight-only int8, whichever first "
                   "keeps cosine to torch >= 0.99")
    p.add_argument("--factory", default="Flat",
                   help="FAISS factory string of the item index, e.g. Flat, HNSW32, "
                        "IVF4096,SQ8, IVF4096,PQ16,Refine(SQ8)")
    p.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                   help="ONNX exporter to try first (the other one is the fallback)")
    p.add_argument("--parity-items", type=int, default=PARITY_ITEMS,
                   help="items of the dataset used for the ONNX parity check")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--stage1-run", type=Path, default=None,
                   help="stage-1 run of a stage-2 RUN_DIR without stage1_config.yaml")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not any((args.run / name).is_file() for name in (CONFIG, STAGE2)):
        print(f"error: {args.run} is not a run directory (no {CONFIG})", file=sys.stderr)
        return 2
    stage1_config = args.stage1_run / CONFIG if args.stage1_run else None
    try:
        path = export_run(args.run, args.bundles, factory=args.factory, quantize=args.quantize,
                          publish_bundle=args.publish, exporter=args.exporter,
                          parity_items=args.parity_items, stage1_config=stage1_config)
    except (DatasetError, ValidationError, FileNotFoundError) as err:
        print(f"error: cannot read run {args.run}: {err}", file=sys.stderr)
        return 2
    except (ExportError, BundleError, ValueError, RuntimeError) as err:
        print(f"error: export refused: {err}", file=sys.stderr)
        return 1
    print(f"bundle {path.name} written to {path}" + (" and published" if args.publish else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
