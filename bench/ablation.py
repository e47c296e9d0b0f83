"""PTMRec ablation (the paper's Fig. 3) on ml100k_mm: which part of the two-stage design helps.

Variants, all with the checked-in prompt config (configs/ml100k/stage2/prompt.yaml; --method names
another file there, e.g. lora_image for LoRA on the EfficientNet-Lite0 image tower) unless noted:
- frozen: frozen encoders, i.e. the stage-1 run itself;
- joint: joint prompts without stage 1 (`from_stage1: false`: backbone, heads and prompts start
  together from scratch); it needs a backbone's full schedule, so it has its own caps
  (--joint-epochs, --joint-patience, --joint-kt-steps, the stage-1 lr --joint-lr) and re-encodes
  every --joint-refresh epochs. On a CPU these caps stay far below stage 1's 100-300 epochs;
- no_kt: two stages without KT (`tuning_loss: bpr`: prompts and heads train on BPR of
  u · head(tower(i)) instead of the KL knowledge transfer);
- full: two stages with KT (PTMRec);
- perpeft: full with one prompt set and head set per user group (PerPEFT, train/perpeft.py), from
  configs/ml100k/stage2/perpeft.yaml (4 groups; --groups overrides; the CLI caps apply too, and
  --kt-steps is per group there: the run gets groups x kt-steps tuning steps per epoch);
- perpeft_global: perpeft whose groups all start from the full variant's tuned prompts, heads and
  backbone (`init_from`), as PerPEFT trains a global adapter before the per-group ones.
Prints test and validation Recall@20 (mean ± std over seeds, test at the best validation epoch)
as a markdown table, and writes a bar chart (--png, default <out>/ablation.png).

Usage (CPU-feasible caps):
  .venv/bin/python -m bench.ablation --backbones lightgcn_mm --seeds 999 --epochs 2 --kt-steps 4
At Baby-like training density (a sparse copy of ml100k_mm from bench.sparse_data):
  .venv/bin/python -m bench.ablation --data runs/bench/data/ml100k_sparse6 \
      --stage1-root runs/bench/ml100k_sparse6 --out runs/bench/stage2_sparse6 \
      --backbones lightgcn_mm_text freedom_text --variants frozen full no_kt
Runs are shared with bench.peft_table (the same stage-2 config lands in the same directory).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from train.run import read_metrics

from bench.common import (add_common_args, fmt, stage1_run, stage2_dir,
                              stage2_run, stage2_settings)
from train.config import Stage2Config

VARIANTS = ["frozen", "joint", "no_kt", "full", "perpeft", "perpeft_global"]
LABELS = {"frozen": "frozen encoders (stage 1)", "joint": "joint prompts, no stage 1",
          "no_kt": "two stages, no KT", "full": "two stages + KT (full)",
          "perpeft": "full, one prompt set per user group (PerPEFT)",
          "perpeft_global": "PerPEFT from the full variant's prompts"}


def variant_runs(variant: str, backbone: str, args) -> list[dict]:
    """Metrics of one variant for every seed (stage-1 runs trained when missing)."""
    runs = []
    for seed in args.seeds:
        stage1 = stage1_run(backbone, seed, args)
        if variant == "frozen":
            runs.append(read_metrics(stage1).model_dump())
            continue
        if variant.startswith("perpeft"):
            settings = stage2_settings("perpeft", args)
            settings["groups"] = groups = args.groups or settings["groups"]
            if args.kt_steps:  # per group
                settings["kt_steps_per_epoch"] = args.kt_steps * groups
            name = f"perpeft{groups}"
            if variant == "perpeft_global":
                full = stage2_settings("prompt", args)
                stage2_run("prompt", stage1, full, seed, args)  # trained when missing
                resolved = Stage2Config.model_validate(full).model_dump(mode="json")
                settings["init_from"] = str(stage2_dir(args.out, stage1, "prompt", resolved, seed))
                name += "_global"
            runs.append(stage2_run(name, stage1, settings, seed, args))
            continue
        if variant == "full":
            name, extra = args.method, {}
        elif variant == "no_kt":
            name, extra = f"{args.method}_nokt", {"tuning_loss": "bpr"}
        else:
            name, extra = f"{args.method}_joint", {"from_stage1": False, "epochs": args.joint_epochs,
                                           "patience": args.joint_patience,
                                           "refresh_every": args.joint_refresh,
                                           "learning_rate": args.joint_lr,
                                           "kt_steps_per_epoch": args.joint_kt_steps}
        runs.append(stage2_run(name, stage1, stage2_settings(args.method, args, extra), seed, args))
    return runs


def summary(runs: list[dict], split: str) -> tuple[float, float]:
    """(mean, sample std) of Recall@20 on a split."""
    values = [r[split]["recall@20"] for r in runs]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def bar_chart(results: dict[str, dict[str, list[dict]]], path: Path,
              dataset: str = "ml100k_mm") -> None:
    """Grouped bars: test Recall@20 per backbone and variant, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = list(results)
    variants = [v for v in VARIANTS if any(v in results[b] for b in backbones)]
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(3.5 + 2.4 * len(backbones), 5))
    for k, variant in enumerate(variants):
        stats = [summary(results[b][variant], "test") if variant in results[b] else (0.0, 0.0)
                 for b in backbones]
        xs = [i + (k - (len(variants) - 1) / 2) * width for i in range(len(backbones))]
        ax.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=3,
               label=LABELS[variant])
    ax.set_xticks(range(len(backbones)), backbones)
    ax.set_ylabel("test Recall@20 (mean ± std)")
    stats = [summary(r, "test") for b in backbones for r in results[b].values()]
    ax.set_ylim(max(0.0, min(m - s for m, s in stats) * 0.95), max(m + s for m, s in stats) * 1.02)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    ax.set_title(f"PTMRec ablation, {dataset} (text tower tuned)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run (or reuse) every backbone x variant x seed, print the table, draw the chart."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--joint-epochs", type=int, default=20, help="epochs of the joint variant")
    p.add_argument("--joint-patience", type=int, default=10)
    p.add_argument("--joint-refresh", type=int, default=10,
                   help="joint variant: re-encode every k epochs")
    p.add_argument("--joint-lr", type=float, default=1e-3,
                   help="joint variant: backbone lr (from scratch: the stage-1 configs' 1e-3)")
    p.add_argument("--joint-kt-steps", type=int, default=1,
                   help="joint variant: tuning steps per epoch")
    p.add_argument("--groups", type=int, help="perpeft variant: user groups (default: the "
                   "YAML's 4)")
    p.add_argument("--png", type=Path, help="bar chart path (default <out>/ablation.png)")
    p.add_argument("--method", default="prompt", help="stage-2 YAML of the full / no_kt / joint "
                   "variants in configs/ml100k/stage2 (lora_image: LoRA on the Lite0 image tower)")
    args = p.parse_args(argv)
    results: dict[str, dict[str, list[dict]]] = {}
    rows = []
    for backbone in args.backbones:
        results[backbone] = {}
        for variant in args.variants:
            runs = results[backbone][variant] = variant_runs(variant, backbone, args)
            frozen = results[backbone].get("frozen") or variant_runs("frozen", backbone, args)
            delta = fmt([r["test"]["recall@20"] - f["test"]["recall@20"]
                         for r, f in zip(runs, frozen)])
            epochs = statistics.mean(r.get("epochs_run", len(r.get("epoch_seconds", [])))
                                     for r in runs)
            rows.append(f"| {backbone} | {LABELS[variant]} | "
                        f"{fmt([r['test']['recall@20'] for r in runs])} | "
                        f"{fmt([r['valid']['recall@20'] for r in runs])} | "
                        f"{fmt([r['test']['ndcg@20'] for r in runs])} | {delta} | {epochs:.0f} |")
            print(rows[-1], flush=True)
    png = args.png or args.out / "ablation.png"
    bar_chart(results, png, args.data.name)
    print(f"\n{args.data.name}, seeds {args.seeds}; test at the best validation epoch; chart: {png}\n")
    print("| backbone | variant | test R@20 | valid R@20 | test NDCG@20 | test R@20 - frozen "
          "(paired by seed) | epochs run |")
    print("|---" * 7 + "|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
