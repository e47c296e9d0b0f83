"""Distilled students (train/distill.py) against their teacher and against small models alone.

For each teacher run (--teacher-root/<backbone>/<seed>, bench.ml100k_table's layout) and each
student width, trains the variants below with `train.distill.run_distill` (same data, split and
seed as the teacher) and prints test Recall@20 / NDCG@20, mean ± sample std over the seeds, with
the share of the teacher's Recall@20 kept and the bytes per item vector in the index:

- `scratch`: the student backbone alone (random init, its own BPR loss, no teacher);
- `svd`: the teacher's best rank-d score approximation, not trained (learning rate 0);
- `svd_bpr`: that initialisation, then the student's own loss alone;
- `kd`: that initialisation, then its own loss + pairwise + listwise KD (the default config);
- `kd_random`: random init + the KD losses (what the distillation losses do without the init).

    .venv/bin/python -m bench.distill_table --teachers freedom --dims 16 32 \
        --seeds 999 1000 1001 --threads 1 --jobs 2

Runs go to --out/<teacher>/<variant>-<student><dim>[-<kd overrides>]/<seed> and are reused when
finished with the same distillation config (else trained again).
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import statistics
import sys
from pathlib import Path

from bench.common import ROOT
from train.run import CONFIG, METRICS, read_metrics

from bench.common import fmt

NO_KD = {"pair_weight": 0.0, "list_weight": 0.0}
VARIANTS = {
    "scratch": {"init": "random"} | NO_KD,
    "svd": {"init": "svd"} | NO_KD,
    "svd_bpr": {"init": "svd"} | NO_KD,
    "kd": {"init": "svd"},
    "kd_random": {"init": "random"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teachers", nargs="+", default=["freedom"])
    p.add_argument("--seeds", nargs="+", type=int, default=[999, 1000, 1001])
    p.add_argument("--dims", nargs="+", type=int, default=[16, 32])
    p.add_argument("--student", choices=["lightgcn", "bpr"], default="lightgcn")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--teacher-root", type=Path, default=ROOT / "runs" / "bench" / "ml100k")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "distill")
    p.add_argument("--epochs", type=int, default=None, help="cap on student epochs (default: "
                                                          "the teacher's, early-stopped)")
    p.add_argument("--kd-set", dest="kd_overrides", action="append", default=[], metavar="a=b",
                   help="override a DistillConfig key in the kd variants (repeatable); the "
                        "overrides become part of their run directory names")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    return p.parse_args(argv)


def distill_config(variant: str, dim: int, teacher_cfg, args):
    """The DistillConfig of one variant and student width."""
    from train.config import apply_override
    from train.distill import DistillConfig

    student = {"name": args.student, "embedding_size": dim}
    if args.student == "lightgcn":
        student["n_layers"] = 1
    optim = teacher_cfg.optim.model_dump()
    if variant == "svd":
        optim |= {"learning_rate": 0.0, "epochs": 1}
    elif args.epochs:
        optim["epochs"] = args.epochs
    raw = VARIANTS[variant] | {"student": student, "optim": optim}
    if variant.startswith("kd"):
        for assignment in args.kd_overrides:
            apply_override(raw, assignment)
    return DistillConfig.model_validate(raw)


def run_name(variant: str, dim: int, args) -> str:
    """Directory name of a variant's runs: the student, its width and any kd overrides."""
    extra = "".join(f"-{a}" for a in args.kd_overrides) if variant.startswith("kd") else ""
    return f"{variant}-{args.student}{dim}{extra}"


def _run(job: tuple) -> dict:
    """One student run in its own process (reused when its metrics exist)."""
    teacher, seed, variant, dim, args = job
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    from train.config import load_config
    from train.distill import run_distill

    teacher_run = args.teacher_root / teacher / str(seed)
    out = args.out / teacher / run_name(variant, dim, args) / str(seed)
    dcfg = distill_config(variant, dim, load_config(teacher_run / CONFIG), args)
    if (out / METRICS).is_file():
        metrics = read_metrics(out).model_dump()
        if metrics.get("distill", {}).get("config") == dcfg.model_dump(mode="json"):
            return row_of(teacher, seed, variant, dim, metrics)
        logging.warning("%s: finished with another config; training it again", out)
    metrics = run_distill(teacher_run, dcfg, out, torch.device("cpu"))
    return row_of(teacher, seed, variant, dim, metrics)


def row_of(teacher: str, seed: int, variant: str, dim: int, metrics: dict) -> dict:
    """The figures the table needs from a student run's metrics.json."""
    info = metrics["distill"]
    return {"teacher": teacher, "seed": seed, "variant": variant, "dim": dim,
            "test": metrics["test"], "teacher_test": info["teacher_test"],
            "teacher_dim": info["teacher_dim"], "best_epoch": metrics["best_epoch"],
            "seconds": info["wall_seconds"], "svd_error": info.get("svd_relative_error")}


def table(rows: list[dict], args) -> str:
    """Markdown table: teacher first, then each width and variant."""
    out = ["| teacher | student | variant | bytes / item | test R@20 | test N@20 | "
           "R@20 / teacher | per seed R@20 | best epochs | s / run |", "|---" * 10 + "|"]
    for t in args.teachers:
        got = [r for r in rows if r["teacher"] == t]
        if not got:
            continue
        teacher_r = {r["seed"]: r["teacher_test"]["recall@20"] for r in got}
        teacher_n = {r["seed"]: r["teacher_test"]["ndcg@20"] for r in got}
        seeds = sorted(teacher_r)
        out.append(f"| {t} | {t} {got[0]['teacher_dim']}-d | teacher | "
                   f"{4 * got[0]['teacher_dim']} | {fmt([teacher_r[s] for s in seeds])} | "
                   f"{fmt([teacher_n[s] for s in seeds])} | 100.0% | "
                   f"{' / '.join(f'{teacher_r[s]:.4f}' for s in seeds)} | | |")
        for dim in args.dims:
            for v in args.variants:
                cell = sorted((r for r in got if r["dim"] == dim and r["variant"] == v),
                              key=lambda r: r["seed"])
                if not cell:
                    continue
                rec = [r["test"]["recall@20"] for r in cell]
                kept = statistics.mean(r["test"]["recall@20"] / teacher_r[r["seed"]]
                                       for r in cell)
                label = v + (f" ({', '.join(args.kd_overrides)})"
                             if v.startswith("kd") and args.kd_overrides else "")
                out.append(
                    f"| {t} | {args.student} {dim}-d | {label} | {4 * dim} | {fmt(rec)} | "
                    f"{fmt([r['test']['ndcg@20'] for r in cell])} | {kept:.1%} | "
                    f"{' / '.join(f'{x:.4f}' for x in rec)} | "
                    f"{', '.join(str(r['best_epoch']) for r in cell)} | "
                    f"{statistics.mean(r['seconds'] for r in cell):.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Train (or reuse) every student and print the table."""
    args = parse_args(argv)
    jobs = [(t, s, v, d, args) for t in args.teachers for d in args.dims for v in args.variants
            for s in args.seeds]
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            rows = pool.map(_run, jobs, chunksize=1)
    else:
        rows = [_run(j) for j in jobs]
    print(table(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
