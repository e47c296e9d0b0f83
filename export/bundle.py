"""Bake a training run into a versioned bundle (DESIGN.md §7): vectors, ids, popularity, seen.

Users are those with training interactions; their vectors are the backbone's `user_embeddings()` at
the best-validation weights. Items with training interactions get `item_embeddings()`; items without
any (held out by the cold-start protocol, only in valid/test, or only in items.tsv) get the content
heads' fused cold vector when the run has heads, and are left out otherwise. External ids are the
dataset's userID / itemID. The cold-start encoders (export.onnx_export) are exported, checked for
parity and moved into the bundle, which `index.bundle.write_bundle` writes atomically.

A stage-2 run (train.stage2; export.tuned) exports its own best-validation backbone and heads, cold
vectors from the items re-encoded by its tuned towers, and ONNX towers with the tuning baked in
(prompts in the graph, LoRA / (IA)^3 merged), parity-checked against the tuned torch towers; the
manifest's `encoder.encoder_tuning` names the method. A PerPEFT run (stage 2 with `groups` > 1)
exports G-block vectors (train/perpeft.py) and records `user_groups` in the manifest.
"""
from __future__ import annotations

import copy
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export import onnx_export, tuned
from export.onnx_export import ExportError
from index import ann
from index.bundle import (ATTRIBUTES, ATTRIBUTES_HEAD, ITEM_IDS, ITEMS_INDEX, POPULARITY,
                          SEEN_INDPTR, SEEN_ITEMS, USER_IDS, USERS, load_bundle, publish,
                          write_bundle)
from index.attributes import AttributeHead, AttributesSpec
from index.manifest import Counts, EncoderSpec, Manifest
from train import perpeft
from train.data import Dataset
from train.encoders import build_encoder
from train.features import attribute_spec
from train.run import Run, load_run

log = logging.getLogger(__name__)
PARITY_ITEMS = 64
MAX_TOKENIZER_TEXTS = 5000


@dataclass
class BundleArrays:
    """Everything but the encoders, aligned by row with the id arrays."""

    users: np.ndarray        # (U, d) float32
    user_ids: np.ndarray     # (U,) int64
    items: np.ndarray        # (I, d) float32
    item_ids: np.ndarray     # (I,) int64
    popularity: np.ndarray   # (I,) float32
    seen_indptr: np.ndarray  # (U+1,) int64
    seen_items: np.ndarray   # (nnz,) int64 external item ids
    n_cold: int


def known_items(full: Dataset) -> np.ndarray:
    """Item ids that exist: in any interaction split, or with text or an image in items.tsv."""
    seen = np.zeros(full.n_items, dtype=bool)
    for pairs in (full.train, full.valid, full.test):
        seen[pairs[:, 1]] = True
    if full.items is not None:
        seen |= np.array([bool(t) or p is not None
                          for t, p in zip(full.items.texts, full.items.images)])
    return np.flatnonzero(seen)


def cold_vectors(run: Run, items: np.ndarray) -> np.ndarray | None:
    """Fused content-head vectors (C, d) of items, or None without heads."""
    if run.heads is None:
        return None
    with torch.no_grad():
        index = torch.from_numpy(items).to(next(run.heads.parameters()).device)
        return run.heads(run.heads.select(run.features, index)).float().cpu().numpy()  # (C, d)


def assemble(run: Run) -> BundleArrays:
    """User and item vectors, ids, popularity and the seen-items CSR of a run."""
    with torch.no_grad():
        users_all, items_all = (t.float().cpu().numpy() for t in run.model.embeddings())
    pairs = run.train.train
    user_ids = np.unique(pairs[:, 0]).astype(np.int64)
    warm = np.unique(pairs[:, 1]).astype(np.int64)
    cold = np.setdiff1d(known_items(run.full), warm).astype(np.int64)
    vectors, ids = [items_all[warm]], [warm]
    fused = cold_vectors(run, cold) if len(cold) else None
    if fused is not None:
        vectors.append(fused)
        ids.append(cold)
    elif len(cold):
        log.warning("%d items without training interactions are left out (the run has no "
                    "content heads)", len(cold))
    item_ids = np.concatenate(ids)
    order = np.argsort(item_ids, kind="stable")
    indptr, indices = run.train.train_csr
    counts = np.diff(indptr)[user_ids]
    popularity = np.bincount(pairs[:, 1], minlength=run.full.n_items).astype(np.float32)
    return BundleArrays(
        users=np.ascontiguousarray(users_all[user_ids], dtype=np.float32), user_ids=user_ids,
        items=np.ascontiguousarray(np.concatenate(vectors)[order], dtype=np.float32),
        item_ids=item_ids[order], popularity=popularity[item_ids[order]],
        seen_indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        seen_items=indices.astype(np.int64),
        n_cold=len(cold) if fused is not None else 0)


def flatten_metrics(tree: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict as {"a.b.c": value} (lists and text skipped)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten_metrics(value, name + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def parity_sample(full: Dataset, n: int, seed: int = 0) -> np.ndarray:
    """Up to n items with content, including one without image and one without text if any."""
    has_text = np.array([bool(t) for t in full.items.texts], dtype=bool)
    has_image = np.array([p is not None for p in full.items.images], dtype=bool)
    pool = np.flatnonzero(has_text | has_image)
    drawn = np.random.default_rng(seed).choice(pool, size=min(n, len(pool)), replace=False)
    lacking = [*np.flatnonzero(has_text & ~has_image)[:1],
               *np.flatnonzero(has_image & ~has_text)[:1]]
    chosen = lacking + [int(i) for i in drawn if i not in lacking]
    return np.sort(np.asarray(chosen[:max(n, len(lacking))], dtype=np.int64))


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """Metric names under a prefix."""
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def fused_parity(run: Run, sample: np.ndarray, vectors: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean of the ONNX modality vectors vs the heads on the run's training features."""
    served = np.mean([vectors[m] for m in run.heads.heads], axis=0)  # (n, d)
    bundled = cold_vectors(run, sample)
    cos = float(onnx_export.cosines(served, bundled).min(initial=1.0))
    diff = float(np.abs(served - bundled).max(initial=0.0))
    if cos < onnx_export.INT8_MIN_COS:
        raise ExportError(f"fused ONNX cold vectors disagree with the run's own features (min "
                          f"cosine {cos:.4f}): the towers are not the ones that trained the heads")
    return {"parity.fused.cos_min": cos, "parity.fused.max_abs": diff}


def export_encoders(run: Run, workdir: Path, quantize: str | None, exporter: str,
                    n_items: int = PARITY_ITEMS) -> tuple[EncoderSpec | None, dict[str, float]]:
    """ONNX encoders, tokenizer.json, preprocess.json and the attribute encoder into workdir, all
    parity-checked."""
    if run.heads is None or run.cfg.encoders is None:
        return None, {}
    configs = {m: getattr(run.cfg.encoders, m) for m in run.heads.heads if m != "attributes"}
    missing = [m for m, c in configs.items() if c is None]
    if missing:
        log.warning("no cold-start encoders: the %s head reads precomputed features", missing)
        return None, {}
    sample = parity_sample(run.full, n_items)
    towers = {m: run.towers[m] if m in run.towers else build_encoder(c)
              for m, c in configs.items()}
    if run.groups > 1:  # an untuned tower feeds the same features to every group's head
        towers = {m: t if m in run.towers else perpeft.GroupedTower.tiled(t, run.groups)
                  for m, t in towers.items()}
    exported = {m: tuned.deployable(t, run.tuning) if m in run.towers else t
                for m, t in towers.items()}
    references = {m: towers[m] if exported[m] is not towers[m] else None for m in towers}
    heads = {m: copy.deepcopy(run.heads.heads[m]).cpu() for m in towers}  # the run's stay put
    metrics, vectors, schemes, kind, names = {}, {}, {}, "bert", []
    if "image" in towers:
        images = [run.full.items.images[i] for i in sample]
        stats, vectors["image"] = onnx_export.export_image(
            exported["image"], heads["image"], images, workdir, quantize, exporter,
            references["image"])
        metrics |= _prefixed("parity.image.", stats)
        schemes["image"] = onnx_export.scheme(stats, quantize)
    if "text" in towers:
        texts = [run.full.items.texts[i] for i in sample]
        every = [t for t in run.full.items.texts if t][:MAX_TOKENIZER_TEXTS]
        stats, vectors["text"], kind, names = onnx_export.export_text(
            exported["text"], heads["text"], texts, every, workdir, quantize, exporter,
            references["text"])
        metrics |= _prefixed("parity.text.", stats)
        schemes["text"] = onnx_export.scheme(stats, quantize)
    attribute_files = {}
    if "attributes" in run.heads.heads:
        stats, vectors["attributes"] = export_attributes(run, sample, workdir)
        metrics |= _prefixed("parity.attributes.", stats)
        attribute_files = {"attributes_file": ATTRIBUTES, "attributes_head": ATTRIBUTES_HEAD}
    metrics |= fused_parity(run, sample, vectors)
    spec = onnx_export.encoder_spec(towers.get("image"), towers.get("text"), kind, names, schemes,
                                    run.tuning.manifest_fields(towers) | attribute_files)
    return spec, metrics


def export_attributes(run: Run, sample: np.ndarray, workdir: Path) -> tuple[dict, np.ndarray]:
    """attributes.json (the fitted spec) and attributes_head.npy (the head as one matrix) into
    workdir; the numpy path serving runs must reproduce the head on the run's own features."""
    spec = attribute_spec(run.cfg.encoders.attributes, run.full)
    head = run.heads.heads["attributes"]
    # PerPEFT: every group's head reads the same slots, so side by side they are one matrix
    members = head.members if isinstance(head, perpeft.GroupedHead) else [head]
    with torch.no_grad():
        matrix = torch.cat([torch.cat([h.weight.T, h.bias[None]]) for h in members],
                           dim=1).float().cpu().numpy()  # (D + 1, G·d)
    (workdir / ATTRIBUTES).write_text(spec.model_dump_json(indent=2), encoding="utf-8")
    np.save(workdir / ATTRIBUTES_HEAD, matrix, allow_pickle=False)
    served = AttributeHead(AttributesSpec.model_validate_json(
        (workdir / ATTRIBUTES).read_text(encoding="utf-8")), np.load(workdir / ATTRIBUTES_HEAD))
    vectors = served([run.full.items.texts[i] for i in sample])
    with torch.no_grad():
        index = torch.from_numpy(sample).to(members[0].weight.device)
        expected = head(run.features["attributes"].index_select(0, index).float()).cpu().numpy()
    diff = float(np.abs(vectors - expected).max(initial=0.0))
    if diff > onnx_export.FP32_TOL:
        raise ExportError(f"attribute encoder parity failed: max abs difference {diff:.2e} > "
                          f"{onnx_export.FP32_TOL} (the refitted attribute spec differs from "
                          f"the one training used)")
    return {"max_abs": diff, "slots": float(spec.dim)}, vectors


def build_manifest(run: Run, arrays: BundleArrays, factory: str, spec: EncoderSpec | None,
                   extra: dict[str, float]) -> Manifest:
    """The manifest of a run's bundle (version and files are filled in by write_bundle)."""
    metrics = flatten_metrics(run.metrics) | extra | {
        "export.cold_items": float(arrays.n_cold), "export.warm_items": float(
            len(arrays.item_ids) - arrays.n_cold)}
    return Manifest(
        source_run=str(run.path.resolve()), config_hash=run.config_hash or run.cfg.config_hash(),
        backbone=run.cfg.backbone.name, dim=int(arrays.users.shape[1]), metric="ip",
        user_groups=run.groups,
        normalized=False, faiss_factory=factory,
        counts=Counts(users=len(arrays.user_ids), items=len(arrays.item_ids),
                      cold_start=spec is not None),
        encoder=spec, metrics=metrics)


def _write_arrays(tmp: Path, arrays: BundleArrays) -> None:
    """The .npy files of a bundle (never pickled)."""
    for name, value in ((USERS, arrays.users), (USER_IDS, arrays.user_ids),
                        (ITEM_IDS, arrays.item_ids), (POPULARITY, arrays.popularity),
                        (SEEN_INDPTR, arrays.seen_indptr), (SEEN_ITEMS, arrays.seen_items)):
        np.save(tmp / name, value, allow_pickle=False)


def export_run(run_dir: Path, bundles_dir: Path, factory: str = "Flat",
               quantize: str | None = None, publish_bundle: bool = False,
               exporter: str = "dynamo", parity_items: int = PARITY_ITEMS,
               stage1_config: Path | None = None, event_watermark: int = 0) -> Path:
    """Write bundles_dir/vN from a stage-1 or stage-2 run (optionally publishing it); returns the
    bundle path. `stage1_config`: the stage-1 config of a stage-2 run that lacks its copy;
    `event_watermark`: the last event-store id the run's training data included."""
    run_dir, bundles_dir = Path(run_dir), Path(bundles_dir)
    run = load_run(run_dir, stage1_config=stage1_config)
    arrays = assemble(run)
    index = ann.build(arrays.items, arrays.item_ids, factory)
    bundles_dir.mkdir(parents=True, exist_ok=True)
    scratch = bundles_dir / f".export-{uuid.uuid4().hex}"
    scratch.mkdir()
    try:
        spec, parity = export_encoders(run, scratch, quantize, exporter, parity_items)
        manifest = build_manifest(run, arrays, factory, spec, parity).model_copy(
            update={"event_watermark": event_watermark})

        def write_files(tmp: Path) -> None:
            _write_arrays(tmp, arrays)
            ann.save(index, tmp / ITEMS_INDEX)
            for produced in sorted(scratch.iterdir()):
                produced.replace(tmp / produced.name)

        path = write_bundle(bundles_dir, write_files, manifest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    check_bundle(path)
    if publish_bundle:
        publish(bundles_dir, path.name, verify=False)
    log.info("bundle %s: %d users, %d items (%d cold), encoders %s (tuning: %s)", path,
             len(arrays.user_ids), len(arrays.item_ids), arrays.n_cold, "yes" if spec else "no",
             run.tuning.method)
    return path


def check_bundle(path: Path) -> None:
    """Re-read a written bundle and check that its arrays agree with each other and the manifest."""
    bundle = load_bundle(path)
    m = bundle.manifest
    users, user_ids = bundle.load_npy(USERS), bundle.load_npy(USER_IDS)
    item_ids, popularity = bundle.load_npy(ITEM_IDS), bundle.load_npy(POPULARITY)
    indptr, seen = bundle.load_npy(SEEN_INDPTR), bundle.load_npy(SEEN_ITEMS)
    index = ann.load(bundle.file(ITEMS_INDEX))
    problems = [
        (users.shape != (m.counts.users, m.dim), f"users.npy {users.shape}"),
        (user_ids.shape != (m.counts.users,), f"user_ids.npy {user_ids.shape}"),
        (item_ids.shape != (m.counts.items,) or popularity.shape != item_ids.shape,
         f"item_ids.npy {item_ids.shape}, popularity.npy {popularity.shape}"),
        (index.d != m.dim or ann.ntotal(index) != m.counts.items, f"items.faiss d={index.d}"),
        (not np.array_equal(np.sort(ann.live_ids(index)), item_ids), "index ids != item_ids.npy"),
        (indptr.shape != (m.counts.users + 1,) or indptr[-1] != len(seen), "seen CSR"),
    ]
    bad = [what for failed, what in problems if failed]
    if bad:
        raise ExportError(f"{path}: inconsistent bundle: {'; '.join(bad)}")
