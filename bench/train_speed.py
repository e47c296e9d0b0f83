"""Training and evaluation speed of the backbones against the MMRec peer figures.

For each dataset × model: build the backbone with its default config (one-off graph building timed
apart), then time `--epochs` training epochs exactly as train/fit.py runs them (on_epoch_start, the
real sampler, batches of 2048, Adam) and `--epochs` full validation evaluations. Reports the median
seconds per epoch and per evaluation, the peak RSS of the run (each run is its own process) and
the speed-up over MMRec on the same 2-core kind of machine (reference/BENCHMARKS.md §1, Baby).
The Amazon sets carry no content features: multimodal models get random 4096-d image and 384-d
text features (fixed seed), as the MMRec peer figure did.

Usage: python -m bench.train_speed --datasets baby --models bpr lightgcn freedom mgcn smore
A model may carry overrides: `freedom:reg_weight=1e-4,dropout=0.9`.
"""
from __future__ import annotations

import argparse
import ctypes
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from pydantic import TypeAdapter


from bench.common import spawned_row
from train.backbones import MULTIMODAL, BackboneConfig, BackboneInputs, build_backbone
from train.data import load_dataset
from train.evaluate import Evaluator
from train.fit import evaluate_model
from train.sampling import NegativeSampler, epoch_batches

DATASETS = {"baby": "amazon_baby", "sports": "amazon_sports", "clothing": "amazon_clothing",
            "ml100k": "ml100k_mm"}
PEER = {"bpr": (0.5, 2.2), "lightgcn": (3.0, 2.5), "freedom": (15.5, 2.5)}   # Baby, 2 cores
FEATURE_DIMS = {"image": 4096, "text": 384}


def parse_model(spec: str) -> tuple[str, dict]:
    """`name` or `name:key=value,key=value` (values parsed as YAML)."""
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    return name, overrides


def make_inputs(ds, name: str) -> BackboneInputs:
    """Training tensors, plus fixed random features for multimodal models on featureless data."""
    train = torch.from_numpy(ds.train)
    feats = {m: torch.from_numpy(f).float() for m, f in ds.features.items()}
    if name in MULTIMODAL:
        gen = torch.Generator().manual_seed(0)
        for m, dim in FEATURE_DIMS.items():
            feats.setdefault(m, torch.randn(ds.n_items, dim, generator=gen))
    return BackboneInputs(ds.n_users, ds.n_items, train[:, 0], train[:, 1], feats)


def time_epochs(model, ds, epochs: int, fused_adam: bool) -> list[float]:
    """Seconds per training epoch, run as train/fit.py runs it."""
    generator = torch.Generator().manual_seed(999)
    pairs = torch.from_numpy(ds.train)
    sampler = NegativeSampler(ds.train, ds.n_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.0,
                                 **({"fused": True} if fused_adam else {}))
    seconds = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        model.on_epoch_start(generator)
        for batch in epoch_batches(pairs, sampler, 2048, generator):
            loss = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - t0)
    return seconds


def keep_freed_memory() -> None:
    """glibc: serve large blocks from the heap and never trim it, so freed blocks are reused.

    By default every block over 32 MiB is a fresh mmap whose pages fault in on first touch: a
    7050×4096 gradient costs ~45 ms per step that way instead of ~5 ms.
    """
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-4, 0)              # M_MMAP_MAX
    libc.mallopt(-1, 2 ** 31 - 1)    # M_TRIM_THRESHOLD


def run_one(data_dir: Path, spec: str, epochs: int, threads: int, fused_adam: bool,
            malloc_tuning: bool) -> dict:
    """Build, train and evaluate one model on one dataset; runs in its own process."""
    if malloc_tuning:
        keep_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(999)
    ds = load_dataset(data_dir, load_items=False)
    name, overrides = parse_model(spec)
    cfg = TypeAdapter(BackboneConfig).validate_python({"name": name, **overrides})
    inputs = make_inputs(ds, name)
    t0 = time.perf_counter()
    model = build_backbone(cfg, inputs)
    build_s = time.perf_counter() - t0
    train_s = time_epochs(model, ds, epochs, fused_adam)
    evaluator = Evaluator(ds, "valid", (10, 20, 50), 4096)
    eval_s = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        evaluate_model(model, evaluator)
        eval_s.append(time.perf_counter() - t0)
    return {"model": spec, "build": build_s, "epoch": statistics.median(train_s),
            "eval": statistics.median(eval_s),
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(queue, *args) -> None:
    """Process entry: put the result (or the error text) on the queue."""
    try:
        queue.put(run_one(*args))
    except Exception as err:  # noqa: BLE001 - reported in the table, the bench goes on
        queue.put({"model": args[1], "error": f"{type(err).__name__}: {err}"})


def row(dataset: str, r: dict) -> str:
    """One markdown table row with the ratio to the MMRec peer where one is known."""
    if "error" in r:
        return f"| {dataset} | {r['model']} | error: {r['error']} | | | | | |"
    peer = PEER.get(r["model"].split(":")[0]) if dataset == "baby" else None
    ours = r["epoch"] + r["eval"]
    peer_txt = f"{peer[0]} + {peer[1]}" if peer else "-"
    ratio = f"{(peer[0] + peer[1]) / ours:.2f}x (epoch {peer[0] / r['epoch']:.2f}x)" if peer else "-"
    return (f"| {dataset} | {r['model']} | {r['build']:.2f} | {r['epoch']:.2f} | {r['eval']:.2f} | "
            f"{r['rss_mib']:.0f} | {peer_txt} | {ratio} |")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every dataset × model in a fresh process, print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--datasets", nargs="+", default=["baby", "sports"], choices=DATASETS)
    parser.add_argument("--models", nargs="+", default=["bpr", "lightgcn", "freedom"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fused-adam", action="store_true",
                        help="torch.optim.Adam(fused=True) instead of fit.py's default Adam")
    parser.add_argument("--malloc-tuning", action="store_true",
                        help="reuse freed large blocks (glibc mallopt) instead of fresh mmaps")
    args = parser.parse_args(argv)
    lines = ["| dataset | model | build s | epoch s | eval s | peak RSS MiB | MMRec epoch + eval s "
             "| speed-up vs MMRec |", "|---|---|---|---|---|---|---|---|"]
    for dataset in args.datasets:
        for spec in args.models:
            result = spawned_row(_child, (args.data_root / DATASETS[dataset], spec, args.epochs,
                                          args.threads, args.fused_adam, args.malloc_tuning),
                                 {"model": spec})
            lines.append(row(dataset, result))
            print(lines[-1], file=sys.stderr, flush=True)
    print(f"\n{args.epochs} epochs, {args.threads} threads, "
          f"{'fused' if args.fused_adam else 'default'} Adam, "
          f"{'tuned' if args.malloc_tuning else 'default'} malloc; medians per epoch / evaluation\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
