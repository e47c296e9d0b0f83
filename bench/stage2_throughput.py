"""Stage-2 encoder throughput: items per second through a tuned tower, forward and backward.

The issue-6 GPU target: a Baby-sized stage-2 epoch (119,674 training pairs, batch 128, so 935 tuning
steps) under 1 minute on one H100 for ViT-B/32 at 224 px with prompts, LoRA and an adapter (the
PTMRec paper: 8 minutes on a V100).

Per tower and method, the step timed is the one stage 2 runs (train/stage2.py `kt_step_loss`): the
tower with the PEFT method attached (train.stage2.build_towers, so exactly what stage 2 trains),
a content head (Linear to 64), the KT loss against detached ID targets, backward, an Adam step on
the trainable parameters; bf16 autocast on CUDA (fp32 on CPU unless --cpu-bf16), as stage 2 does.
"frozen" is the no-grad feature extraction of stage 1 / re-encoding, for reference. Inputs are
prepared once (images decoded and resized, texts tokenised): preprocessing is excluded, as
stage 2 can cache it (decoded Baby images: 7,050 x 3 x 224 x 224 uint8 = 1.1 GB).

Reported: items/s (median step), peak memory of the configuration (CUDA: peak allocated, reset
per configuration; CPU: peak RSS of the configuration's own process), trainable parameters and
their share of the tower, and the Baby epoch projection = 935 steps x batch / items per second,
summed over the towers of a pair (image + text) in the summary.

    python -m bench.stage2_throughput --towers vit-b-32 --methods frozen prompt lora ia3
    python -m bench.stage2_throughput --towers tiny --steps 2 --batch 8      # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path


from bench.common import spawned_row

BABY_PAIRS = 119_674
TARGET_EPOCH_S = 60.0
METHODS = {
    "frozen": None,
    "prompt": {"name": "prompt", "n_ctx": 2, "depth": 9},
    "lora": {"name": "lora", "r": 8, "alpha": 16},
    "ia3": {"name": "ia3"},
}
TOWERS = {  # name -> (modality, encoder config dict)
    "tiny": [("image", {"name": "openclip_image", "model": "ptmrec-tiny", "init_seed": 0}),
             ("text", {"name": "openclip_text", "model": "ptmrec-tiny", "init_seed": 0})],
    "vit-b-32": [("image", {"name": "openclip_image", "model": "ViT-B-32", "init_seed": 0}),
                 ("text", {"name": "openclip_text", "model": "ViT-B-32", "init_seed": 0})],
    "minilm": [("text", {"name": "minilm"})],
}
TEXT = ("Soft organic cotton baby sleeper with snap closures and fold-over mitts, machine washable, "
        "sizes newborn to 9 months. Brand: Example. Category: Baby > Clothing > Sleepwear.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--towers", nargs="+", default=["vit-b-32"], choices=list(TOWERS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--batch", type=int, default=128, help="distinct items per tuning step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on CPU too")
    p.add_argument("--compile", action="store_true", help="torch.compile the tower")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process (peak RSS then spans every configuration)")
    return p.parse_args(argv)


def prepared_inputs(tower, modality: str, batch: int):
    """One batch of prepared inputs: synthetic 224 px images decoded once, or tokenised texts."""
    import numpy as np
    from PIL import Image

    if modality == "image":
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
                  for _ in range(min(batch, 8))]
        return tower.prepare([images[j % len(images)] for j in range(batch)])
    return tower.prepare([f"{TEXT} Item {j}." for j in range(batch)])


def measure(tower_name: str, modality: str, enc: dict, method: str, args) -> dict:
    """Median step time and peak memory of one (tower, method) configuration, in this process."""
    import torch

    from bench.common import peak_memory_mib
    from train.encoders.prompts import count_trainable
    from train.features import EncodersConfig
    from train.losses import knowledge_transfer
    from train.config import Stage2Config
    from train.modules import build_towers

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    enc_cfg = EncodersConfig.model_validate({modality: enc})
    if METHODS[method] is None:
        from train.encoders import build_encoder
        tower = build_encoder(getattr(enc_cfg, modality))
    else:
        s2 = Stage2Config.model_validate({"method": METHODS[method], "modalities": [modality]})
        tower = build_towers(enc_cfg, s2)[modality]
    tower = tower.to(device)
    trainable, total = count_trainable(tower)
    trainable = 0 if METHODS[method] is None else trainable  # frozen: nothing is tuned
    prepared = prepared_inputs(tower, modality, args.batch)
    prepared = ({k: v.to(device) for k, v in prepared.items()} if isinstance(prepared, dict)
                else prepared.to(device))
    run = torch.compile(tower) if args.compile else tower
    with torch.no_grad():
        out_dim = tower(prepared[:1] if torch.is_tensor(prepared) else
                        {k: v[:1] for k, v in prepared.items()}).shape[1]
    head = torch.nn.Linear(out_dim, 64).to(device)
    params = [p for p in tower.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-4)
    users = torch.randn(args.batch, 64, device=device)
    items = torch.randn(args.batch, 64, device=device)
    bf16 = device.type == "cuda" or args.cpu_bf16

    def step() -> None:
        grad = METHODS[method] is not None
        tower.train(False)  # as stage 2 tunes (tower_dropout off): PEFT grads, no base dropout
        with torch.set_grad_enabled(grad), torch.autocast(device.type, dtype=torch.bfloat16,
                                                          enabled=bf16):
            feats = run(prepared).float()
        if not grad:
            return
        loss = knowledge_transfer(users, items, users, head(feats))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak_mib = peak_memory_mib()  # since the reset above on CUDA; the process's peak RSS on CPU
    step_s = statistics.median(times)
    return {"tower": tower_name, "modality": modality, "method": method,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "precision": "bf16" if bf16 else "fp32", "compiled": args.compile,
            "batch": args.batch, "step_s": step_s, "items_per_s": args.batch / step_s,
            "peak_mib": peak_mib, "peak_kind": "cuda allocated" if device.type == "cuda"
            else "process RSS", "trainable": trainable, "tower_params": total,
            "trainable_share": trainable / max(1, total)}


def _child(queue, tower_name, modality, enc, method, args) -> None:
    """A configuration in its own process, so CPU peak RSS is its own."""
    try:
        queue.put(measure(tower_name, modality, enc, method, args))
    except Exception as exc:  # reported in the table, the other configurations still run
        queue.put({"tower": tower_name, "modality": modality, "method": method,
                   "error": f"{type(exc).__name__}: {exc}"})


def run_isolated(tower_name: str, modality: str, enc: dict, method: str, args) -> dict:
    """measure() in a fresh spawned process."""
    return spawned_row(_child, (tower_name, modality, enc, method, args),
                       {"tower": tower_name, "modality": modality, "method": method})


def baby_epoch_s(items_per_s: float, batch: int) -> float:
    """Seconds for a Baby epoch's tuning steps (935 at batch 128) at this throughput."""
    return math.ceil(BABY_PAIRS / batch) * batch / items_per_s


def main(argv: list[str] | None = None) -> int:
    """Measure every (tower, method) and print the table and the Baby-epoch summary."""
    args = parse_args(argv)
    one = measure if args.in_process else run_isolated
    rows = [one(name, modality, enc, method, args)
            for name in args.towers for modality, enc in TOWERS[name] for method in args.methods]
    print("| tower | modality | method | precision | items/s | Baby epoch s | peak MiB | "
          "trainable | share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['tower']} | {r['modality']} | {r['method']} | error: {r['error']} |")
            continue
        print(f"| {r['tower']} | {r['modality']} | {r['method']} | {r['precision']}"
              f"{' compiled' if r['compiled'] else ''} | {r['items_per_s']:.1f} | "
              f"{baby_epoch_s(r['items_per_s'], r['batch']):.1f} | {r['peak_mib']:.0f} | "
              f"{r['trainable']:,} | {r['trainable_share']:.3%} |")
    ok = [r for r in rows if "error" not in r]
    device = ok[0]["device"] if ok else "n/a"
    print(f"\ndevice: {device}; batch {args.batch}; peak memory: "
          f"{ok[0]['peak_kind'] if ok else 'n/a'}; preprocessing excluded")
    for name in args.towers:
        for method in args.methods:
            if method == "frozen":
                continue
            parts = [r for r in ok if r["tower"] == name and r["method"] == method]
            if len(parts) != len(TOWERS[name]):
                continue
            epoch = sum(baby_epoch_s(r["items_per_s"], r["batch"]) for r in parts)
            towers = " + ".join(r["modality"] for r in parts)
            print(f"{name} {method} ({towers}): Baby stage-2 epoch {epoch:.1f} s "
                  f"(target < {TARGET_EPOCH_S:.0f} s on one H100: "
                  f"{'met' if epoch < TARGET_EPOCH_S else 'not met'} on {device})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 1 if len(ok) < len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
