"""Seed spread of one config: N seeds, mean ± std, min and max of the test and validation figures
and the best epochs, optionally under several early-stopping protocols side by side.

    python -m bench.seeds --config configs/ml100k/lightgcn.yaml --seeds 1 2 3 4 5 \\
        --protocols mmrec patient [--derive mmrec] [--set optim.epochs=300] [--threads 2] \\
        [--variant 'r0.25:eval.protocol=patient,eval.patience_ratio=0.25']

Each (protocol, seed) run lives under --out/<config folder>/<config stem>/<protocol>/<seed> (e.g.
ml100k/lightgcn/patient/1) and is reused when finished with the same resolved config; an
unfinished one resumes from its checkpoint. Test figures are the ones at the best validation
epoch. The --derive protocols are not trained: their figures are replayed exactly from the
per-epoch history of the last trained protocol's run of the same seed (train.fit.replay_stopping;
training up to an epoch does not depend on the stopping rule), which must stop no earlier. A
--variant is another rule (config overrides under a label) replayed the same way, so candidate
rules are compared on the very same training curves.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from scipy import stats

from bench.common import ROOT
from train.config import load_config
from train.fit import replay_stopping
from train.run import CHECKPOINT, CONFIG, METRICS, RunMetrics, read_metrics
from train.stage1 import run_stage1


def config_name(config: Path) -> str:
    """`<folder>/<stem>` of a config: configs/ml100k/lightgcn.yaml and configs/baby/lightgcn.yaml
    must not share runs or a table row."""
    return f"{config.parent.name}/{config.stem}"


def one_run(config: Path, protocol: str, seed: int, args: argparse.Namespace) -> RunMetrics:
    """A finished run of the config under one protocol and seed (trained when missing)."""
    overrides = [*args.set, f"seed={seed}", f"eval.protocol={protocol}"]
    overrides += [f"threads={args.threads}"] if args.threads else []
    cfg = load_config(config, overrides)
    out = args.out / config_name(config) / protocol / str(seed)
    same = (out / CONFIG).is_file() and load_config(out / CONFIG).config_hash() == cfg.config_hash()
    if same and (out / METRICS).is_file() and not args.rerun:
        return read_metrics(out)
    resume = same and (out / CHECKPOINT).is_file() and not (out / METRICS).is_file()
    print(f"training {config_name(config)} {protocol} seed {seed} -> {out}"
          + (" (resuming)" if resume else ""), flush=True)
    run_stage1(cfg, out, torch.device("cpu"), resume=resume and not args.rerun)
    return read_metrics(out)


def derived_run(config: Path, protocol: str, seed: int, source: RunMetrics,
                args: argparse.Namespace) -> RunMetrics:
    """The figures `protocol` (a protocol name or a --variant label) would have selected,
    replayed from `source`'s history."""
    rule = args.variants.get(protocol, [f"eval.protocol={protocol}"])
    cfg = load_config(config, [*args.set, f"seed={seed}", *rule])
    history = (source.model_extra or {}).get("history")
    if not history:
        raise SystemExit(f"{config_name(config)} seed {seed}: the source run has no per-epoch "
                         "history in metrics.json (trained before it was recorded); rerun it "
                         "(--rerun)")
    try:
        replayed = replay_stopping(history, cfg.eval.valid_metric, cfg.eval.stops,
                                   cfg.optim.epochs, cfg.eval.improves)
    except ValueError as e:
        raise SystemExit(f"{config_name(config)} seed {seed}, {protocol}: {e}") from None
    return RunMetrics.model_validate(replayed)


def config_runs(config: Path, args: argparse.Namespace) -> dict[str, list[RunMetrics]]:
    """protocol -> the runs of every seed, trained or derived (--derive)."""
    trained = [p for p in args.protocols if p not in args.derive]
    if not trained:
        raise SystemExit("--derive needs at least one protocol that is trained")
    runs = {p: [one_run(config, p, s, args) for s in args.seeds] for p in trained}
    source = runs[trained[-1]]
    for p in [*args.derive, *args.variants]:
        runs[p] = [derived_run(config, p, s, src, args) for s, src in zip(args.seeds, source)]
    return {p: runs[p] for p in [*args.protocols, *args.variants]}


def parse_variant(text: str) -> tuple[str, list[str]]:
    """`LABEL:a.b=c,d.e=f` -> (LABEL, ["a.b=c", "d.e=f"])."""
    label, sep, rest = text.partition(":")
    overrides = [o for o in rest.split(",") if o]
    if not sep or not label or not overrides or any("=" not in o for o in overrides):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected LABEL:a.b=c[,d.e=f]")
    return label, overrides


def spread(values: list[float], digits: int = 4) -> str:
    """mean ± std (min-max) of the values."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def paired(runs: list[RunMetrics], base: list[RunMetrics], metric: str) -> str:
    """Test difference to the base rule, paired by seed: mean ± std and the paired t-test's p."""
    diffs = [r.test[metric] - b.test[metric] for r, b in zip(runs, base)]
    if runs is base or len(diffs) < 2:
        return "-"
    std = statistics.stdev(diffs)
    p = stats.ttest_rel([r.test[metric] for r in runs], [b.test[metric] for b in base]).pvalue
    return f"{statistics.mean(diffs):+.4f} ± {std:.4f}" + (f", p {p:.3f}" if std > 0 else "")


def row(name: str, protocol: str, runs: list[RunMetrics], base: list[RunMetrics],
        metric: str) -> str:
    """One markdown row: test and valid metric spreads, the paired test difference to the
    first rule, best epochs, epochs run."""
    return (f"| {name} | {protocol} | {len(runs)} | {spread([r.test[metric] for r in runs])} | "
            f"{paired(runs, base, metric)} | {spread([r.valid[metric] for r in runs])} | "
            f"{', '.join(str(r.best_epoch) for r in runs)} | "
            f"{', '.join(str(r.epochs_run) for r in runs)} |")


def main(argv: list[str] | None = None) -> int:
    """Run (or reuse) every protocol x seed and print the table."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, nargs="+", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--protocols", nargs="+", default=["mmrec", "patient"],
                   choices=["mmrec", "patient"])
    p.add_argument("--derive", nargs="+", default=[], choices=["mmrec", "patient"],
                   help="protocols replayed from the last trained protocol's runs, not trained")
    p.add_argument("--variant", type=parse_variant, action="append", default=[],
                   metavar="LABEL:a.b=c[,d.e=f]",
                   help="another stopping rule, replayed like --derive (repeatable), e.g. "
                   "'r0.25:eval.protocol=patient,eval.patience_ratio=0.25'")
    p.add_argument("--metric", default="recall@20")
    p.add_argument("--set", action="append", default=[], metavar="a.b=c",
                   help="config override for every run (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "seeds")
    p.add_argument("--rerun", action="store_true", help="ignore finished runs")
    args = p.parse_args(argv)
    unknown = set(args.derive) - set(args.protocols)
    if unknown:
        p.error(f"--derive {sorted(unknown)} not among --protocols")
    args.variants = dict(args.variant)
    if set(args.variants) & set(args.protocols):
        p.error("a --variant label must differ from the protocol names")
    rows = []
    for c in args.config:
        derived = {*args.derive, *args.variants}
        table = config_runs(c, args)
        base = next(iter(table.values()))
        rows += [row(config_name(c), proto + (" (derived)" if proto in derived else ""), runs,
                     base, args.metric) for proto, runs in table.items()]
    m = args.metric
    print(f"\n| config | rule | seeds | test {m} mean ± std (min-max) | test vs first rule, "
          f"paired | valid {m} | best epochs | epochs run |\n" + "|---" * 8 + "|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
