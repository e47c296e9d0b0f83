"""PTMRec Table 2 on ml100k_mm: frozen encoders vs prompt / LoRA / (IA)^3 tuning of the text tower.

Per backbone and method: test Recall@20 (mean ± std over seeds, at the best VALIDATION epoch),
trainable encoder parameters and their share of the tuned tower(s), seconds per epoch (training
alone, and with the re-encoding of every item that precedes each validation) and peak memory
(peak RSS of the run's process on CPU; peak allocated GPU memory on CUDA). "frozen" is the
stage-1 run itself (bench.ml100k_table layout, reused when finished).

Usage (CPU-feasible caps):
  .venv/bin/python -m bench.peft_table --backbones lightgcn_mm --seeds 999 --epochs 2 --kt-steps 4
Stage-1 runs live under --stage1-root/<backbone>/<seed>; stage-2 runs under
--out/<backbone>/<method>-<hash of the stage-2 config and stage-1 root>/<seed>; finished runs with
the same config are reused.
"""
from __future__ import annotations

import argparse
import statistics
import sys

from bench.common import add_common_args, fmt, stage1_run, stage2_run, stage2_settings
from train.run import read_metrics

METHODS = ["frozen", "prompt", "lora", "ia3", "lora_image"]  # lora_image: the CNN tower


def median_of(runs: list[dict], key: str) -> float | None:
    """Median over all runs of a per-epoch list in their metrics (None when absent)."""
    values = [v for r in runs for v in r.get(key, [])]
    return statistics.median(values) if values else None


def _cell(value: float | None, spec: str) -> str:
    """A number, or n/a."""
    return "n/a" if value is None else format(value, spec)


def method_row(backbone: str, method: str, runs: list[dict]) -> str:
    """One markdown row of the Table-2 layout."""
    test = fmt([r["test"]["recall@20"] for r in runs])
    valid = fmt([r["valid"]["recall@20"] for r in runs])
    memory = [r["peak_memory_mib"] for r in runs if "peak_memory_mib" in r]
    if method == "frozen":
        params, share = "0", "0"
        train_s, epoch_s = median_of(runs, "epoch_seconds"), None
    else:
        trainable = runs[0]["trainable_encoder_params"]
        own = runs[0]["encoder_params"] - trainable  # the tower's own parameters (method added)
        params, share = f"{trainable:,}", f"{trainable / own:.3%} of {own / 1e6:.1f}M"
        train_s, epoch_s = median_of(runs, "train_seconds"), median_of(runs, "epoch_seconds")
    return (f"| {backbone} | {method} | {test} | {valid} | {params} | {share} | "
            f"{_cell(train_s, '.1f')} | {_cell(epoch_s, '.1f')} | "
            f"{_cell(max(memory) if memory else None, ',.0f')} |")


HEADER = ("| backbone | method | test R@20 | valid R@20 | trainable encoder params | share of the "
          "tuned tower | train s/epoch | s/epoch incl. re-encoding | peak memory MiB |\n"
          + "|---" * 9 + "|")


def main(argv: list[str] | None = None) -> int:
    """Run (or reuse) every backbone x method x seed and print the table."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args = p.parse_args(argv)
    rows = []
    for backbone in args.backbones:
        stage1 = {seed: stage1_run(backbone, seed, args) for seed in args.seeds}
        for method in args.methods:
            if method == "frozen":
                runs = [read_metrics(stage1[s]).model_dump() for s in args.seeds]
            else:
                settings = stage2_settings(method, args)
                runs = [stage2_run(method, stage1[s], settings, s, args) for s in args.seeds]
            rows.append(method_row(backbone, method, runs))
            print(rows[-1], flush=True)
    print(f"\nml100k_mm, seeds {args.seeds}; test at the best validation epoch; stage-2 caps: "
          f"epochs {args.epochs}, kt steps {args.kt_steps}, kt batch {args.kt_batch}\n")
    print(HEADER)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
