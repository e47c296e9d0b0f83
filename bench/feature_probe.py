"""What other text features would do to a stage-1 backbone: the ceiling of stage 2 on a dataset.

Stage 2 can only change the item features a backbone reads. This probe retrains a finished stage-1
run from scratch (same config, same seed, so the only difference is the features; with identical
features the run reproduces stage 1 exactly) with its text features substituted:

- `control`: the stage-1 run's own metrics (the frozen pretrained features);
- `random`: unit Gaussian rows (the text carries nothing), the floor;
- `id`: the stage-1 model's own final item embeddings, L2-normalised: the collaborative signal of
  the training interactions itself, which is what KT pulls content features towards (p_id);
- `kt`: the text tower tuned with stage 2's KT loss against the frozen stage-1 model (the heads
  first fit on the frozen features, then `--kt-steps` joint steps of `--kt-batch` pairs with the
  PEFT method of `--method`, as `train.stage2` builds it), all items re-encoded.

    .venv/bin/python -m bench.feature_probe --backbones lightgcn_mm freedom \
        --seeds 999 1000 1001 --variants random id kt --threads 1 --jobs 2

Stage-1 runs are read from --stage1-root/<backbone>/<seed> (bench.ml100k_table's layout);
probe runs go to --out/<backbone>/<variant>/<seed> (kt: kt-<method>-<steps>x<batch>-lr<lr>[-dropout])
and are reused when finished.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import sys
import time
from pathlib import Path

from bench.common import ROOT
from train.run import CONFIG, read_metrics

from bench.common import fmt

VARIANTS = ["control", "random", "id", "kt"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=["lightgcn_mm", "freedom"])
    p.add_argument("--seeds", nargs="+", type=int, default=[999, 1000, 1001])
    p.add_argument("--variants", nargs="+", default=["random", "id", "kt"], choices=VARIANTS)
    p.add_argument("--stage1-root", type=Path, default=ROOT / "runs" / "bench" / "ml100k")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "feature_probe")
    p.add_argument("--method", choices=["prompt", "lora", "ia3"], default="lora")
    p.add_argument("--kt-steps", type=int, default=60)
    p.add_argument("--kt-batch", type=int, default=128)
    p.add_argument("--kt-lr", type=float, default=1e-3)
    p.add_argument("--head-steps", type=int, default=2000, help="head-only KT steps first")
    p.add_argument("--fp32", dest="bf16", action="store_false",
                   help="tune and re-encode in fp32 (default: bf16 autocast, as the ml100k "
                        "stage-2 configs on CPU)")
    p.add_argument("--tower-dropout", action="store_true",
                   help="tune with the tower's own dropout active (stage 2's tower_dropout)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    return p.parse_args(argv)


METHOD_CONFIGS = {"prompt": {"name": "prompt", "n_ctx": 2, "depth": 6},
                  "lora": {"name": "lora", "r": 8, "alpha": 16}, "ia3": {"name": "ia3"}}


def kt_tuned_text(cfg, dataset, model, args, device):
    """Text features re-encoded after KT-tuning the text tower against the frozen `model`."""
    import torch

    from train.heads import ContentHeads, HeadsConfig
    from train.losses import knowledge_transfer
    from train.config import Stage2Config
    from train.modules import build_towers
    from train.tuning import encode, head_vectors

    s2 = Stage2Config.model_validate({"method": METHOD_CONFIGS[args.method],
                                      "modalities": ["text"], "encode_batch_size": 16,
                                      "cpu_bf16": args.bf16, "tower_dropout": args.tower_dropout})
    tower = build_towers(cfg.encoders, s2)["text"].to(device)
    with torch.no_grad():
        users, items = model.embeddings()
    frozen = torch.from_numpy(dataset.features["text"]).to(device)
    heads = ContentHeads(HeadsConfig(modalities=["text"]), {"text": frozen.shape[1]},
                         users.shape[1]).to(device)
    train = torch.from_numpy(dataset.train)
    generator = torch.Generator().manual_seed(cfg.seed)

    def fit(params, lr: float, steps: int, item_vectors) -> list[float]:
        """Adam on the KT loss of random training pairs; item_vectors(pos) -> head outputs."""
        optimizer, losses = torch.optim.Adam(params, lr=lr), []
        for _ in range(steps):
            batch = train[torch.randint(len(train), (args.kt_batch,), generator=generator)]
            u = users[batch[:, 0]]
            loss = knowledge_transfer(u, items[batch[:, 1]], u, item_vectors(batch[:, 1]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    # the heads fit the frozen features first, so the tower's first steps see no random-head noise
    fit(heads.parameters(), 1e-3, args.head_steps, lambda pos: heads.heads["text"](frozen[pos]))
    tuned = [p for p in tower.parameters() if p.requires_grad] + list(heads.parameters())
    raw = {"text": dataset.items.texts}
    log = fit(tuned, args.kt_lr, args.kt_steps,  # stage 2's own step: dedup, encode, head
              lambda pos: head_vectors(heads, tower, "text", raw, pos, s2, device))
    tower.eval()
    out = encode(tower, dataset.items.texts, 16, device, grad=False, bf16=args.bf16)
    cosine = torch.nn.functional.cosine_similarity(out, frozen).mean().item()
    return out.cpu().numpy(), {"kt_first": log[0] if log else None,
                               "kt_last10": sum(log[-10:]) / max(1, len(log[-10:])),
                               "mean_cosine_to_frozen": cosine}


def substitute(variant: str, stage1_run: Path, args) -> tuple[dict, dict]:
    """The substituted text features of a variant, and what to record about them."""
    import numpy as np
    import torch

    from train.run import load_run

    run = load_run(stage1_run)  # data, features, backbone at its best epoch, as training had them
    if variant == "kt" and (run.cfg.encoders is None or run.cfg.encoders.text is None):
        raise ValueError(f"{stage1_run}: the kt variant tunes the text tower, but the run has "
                         "no text encoder configured")
    text = run.full.features["text"]
    if variant == "random":
        f = np.random.default_rng(run.cfg.seed).standard_normal(text.shape).astype(np.float32)
        return {"text": f / np.linalg.norm(f, axis=1, keepdims=True)}, {}
    if variant == "id":
        with torch.no_grad():
            items = run.model.embeddings()[1]
        ids = torch.nn.functional.normalize(items, dim=1).numpy()
        # the text slot keeps its width: the embedding, zero-padded (or cut) to it
        f = np.zeros_like(text)
        d = min(ids.shape[1], text.shape[1])
        f[:, :d] = ids[:, :d]
        return {"text": f}, {"id_dims": int(d)}
    tuned, info = kt_tuned_text(run.cfg, run.train, run.model, args, torch.device("cpu"))
    return {"text": tuned}, info


def run_name(variant: str, args) -> str:
    """Directory name of a variant's runs: the kt settings are part of it."""
    if variant != "kt":
        return variant
    return (f"kt-{args.method}-{args.kt_steps}x{args.kt_batch}-lr{args.kt_lr:g}"
            f"{'-dropout' if args.tower_dropout else ''}{'' if args.bf16 else '-fp32'}")


def _run(job: tuple) -> dict:
    """One probe run in its own process: substitute the features, retrain stage 1."""
    backbone, seed, variant, args = job
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    from train.config import load_config
    from train.stage1 import run_stage1

    stage1_run = args.stage1_root / backbone / str(seed)
    out = args.out / backbone / run_name(variant, args) / str(seed)
    if variant == "control":
        metrics = read_metrics(stage1_run).model_dump()
        return {"backbone": backbone, "seed": seed, "variant": variant,
                "test": metrics["test"], "valid": metrics["valid"],
                "best_epoch": metrics["best_epoch"]}
    done = out / "probe.json"
    if done.is_file():
        return json.loads(done.read_text())
    start = time.perf_counter()
    features, info = substitute(variant, stage1_run, args)
    cfg = load_config(stage1_run / CONFIG)
    metrics = run_stage1(cfg, out, torch.device("cpu"), features=features)
    row = {"backbone": backbone, "seed": seed, "variant": variant, "test": metrics["test"],
           "valid": metrics["valid"], "best_epoch": metrics["best_epoch"], "info": info,
           "seconds": time.perf_counter() - start,
           "kt": {k: getattr(args, k) for k in ("method", "kt_steps", "kt_batch", "kt_lr",
                                                 "head_steps", "tower_dropout", "bf16")}
           if variant == "kt" else None}
    done.write_text(json.dumps(row, indent=2), encoding="utf-8")
    return row


def main(argv: list[str] | None = None) -> int:
    """Run every (backbone, seed, variant) and print test Recall@20 against the control."""
    args = parse_args(argv)
    variants = ["control"] + [v for v in args.variants if v != "control"]
    jobs = [(b, s, v, args) for b in args.backbones for v in variants for s in args.seeds]
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            rows = pool.map(_run, jobs, chunksize=1)
    else:
        rows = [_run(j) for j in jobs]
    print("| backbone | text features | test R@20 (mean ± std) | per seed | vs control | "
          "valid R@20 | best epochs |")
    print("|---|---|---|---|---|---|---|")
    for b in args.backbones:
        control = [r["test"]["recall@20"] for r in rows if r["backbone"] == b
                   and r["variant"] == "control"]
        for v in variants:
            got = [r for r in rows if r["backbone"] == b and r["variant"] == v]
            test = [r["test"]["recall@20"] for r in got]
            valid = [r["valid"]["recall@20"] for r in got]
            delta = sum(test) / len(test) - sum(control) / len(control)
            print(f"| {b} | {v} | {fmt(test)} | {' / '.join(f'{t:.4f}' for t in test)} | "
                  f"{delta:+.4f} | {fmt(valid)} | {', '.join(str(r['best_epoch']) for r in got)} |")
    for r in rows:
        if r.get("info"):
            print(f"{r['backbone']} {r['variant']} seed {r['seed']}: {r['info']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
