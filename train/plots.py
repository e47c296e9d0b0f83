"""Figures of a run directory: training curves, and t-SNE + KDE of item features (PTMRec Fig. 4).

`python -m train.plots RUN_DIR` on a stage-2 run (train.stage2) draws, per tuned modality, the item
features before stage 2 (the frozen encoder's, from the feature cache) and after it (the tuned
towers' at the best validation epoch: the backbone's feature table in best.pt, or, for backbones
without one, the items re-encoded with the tuned towers loaded from best.pt). Each set is
L2-normalised and embedded in 2-D with scikit-learn's t-SNE; the panels show the points over a
Gaussian kernel density estimate (scipy), and the KDE of the points' angles around the centre
(how uniformly the items spread, as in uniformity analyses of representations).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch

from train import checkpoint
from train.data import load_dataset
from train.features import item_features
from train.modules import build_towers
from train.run import BEST, PLOTS, STAGE1_CONFIG, STAGE2, TSNE, read_stage2
from train.tuning import encode

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger(__name__)


def plot_curves(history: list[dict], path: Path, metric: str = "recall@20") -> None:
    """Loss and validation metric per epoch, with the test metric where it was measured."""
    if not history:
        return
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["loss"] for h in history])
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_metric.plot(epochs, [h["valid"][metric] for h in history], label=f"valid {metric}")
    tested = [h for h in history if h.get("test")]
    ax_metric.plot([h["epoch"] for h in tested], [h["test"][metric] for h in tested], "o",
                   label=f"test {metric} (at new best valid)")
    ax_metric.set_xlabel("epoch")
    ax_metric.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tsne_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of L2-normalised rows (perplexity capped for small sets), (N, 2)."""
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 5:
        raise ValueError(f"t-SNE needs at least 5 feature rows, got shape {x.shape}")
    x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    perplexity = float(min(30.0, (len(x) - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(x)


def density(points: np.ndarray, grid: int = 80) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian KDE of 2-D points on a grid over their bounding box: (xx, yy, zz)."""
    from scipy.stats import gaussian_kde

    lo, hi = points.min(0), points.max(0)
    pad = 0.05 * (hi - lo + 1e-9)
    xx, yy = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], grid),
                         np.linspace(lo[1] - pad[1], hi[1] + pad[1], grid))
    kde = gaussian_kde(points.T)
    return xx, yy, kde(np.vstack([xx.ravel(), yy.ravel()])).reshape(xx.shape)


def angle_density(points: np.ndarray, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """KDE of the angles of the centred, normalised 2-D points on [-pi, pi]: (angles, density)."""
    from scipy.stats import gaussian_kde

    centred = points - points.mean(0)
    angles = np.arctan2(centred[:, 1], centred[:, 0])
    grid = np.linspace(-np.pi, np.pi, n)
    return grid, gaussian_kde(angles)(grid)


def plot_tsne_kde(sets: dict[str, tuple[np.ndarray, np.ndarray]], path: Path,
                  seed: int = 0, title: str = "") -> None:
    """Per modality: t-SNE + KDE of the features before and after stage 2, and their angle KDEs."""
    if not sets:
        raise ValueError("no feature sets to plot")
    fig, axes = plt.subplots(len(sets), 3, figsize=(15, 4.6 * len(sets)), squeeze=False)
    for row, (modality, (before, after)) in zip(axes, sets.items()):
        for ax, name, feats in ((row[0], "before stage 2 (frozen)", before),
                                (row[1], "after stage 2 (tuned)", after)):
            pts = tsne_2d(feats, seed)
            xx, yy, zz = density(pts)
            ax.contourf(xx, yy, zz, levels=12, cmap="Blues")
            ax.scatter(pts[:, 0], pts[:, 1], s=2, c="k", alpha=0.35)
            ax.set_title(f"{modality}: {name}")
            ax.set_xticks([])
            ax.set_yticks([])
            grid, dens = angle_density(pts)
            row[2].plot(grid, dens, label=name)
        row[2].set_title(f"{modality}: KDE of t-SNE angles")
        row[2].set_xlabel("angle (rad)")
        row[2].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stage2_feature_sets(run_dir: Path, device=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per tuned modality of a stage-2 run: (frozen features, tuned features at best valid)."""
    device = device or torch.device("cpu")
    for name in (STAGE2, STAGE1_CONFIG, BEST):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name}: not a finished stage-2 run "
                                    "(python -m train.stage2 --run STAGE1_RUN --out RUN_DIR)")
    cfg, s2 = read_stage2(run_dir)
    dataset = load_dataset(cfg.data.path)
    before = item_features(cfg.encoders, dataset, device)
    state = checkpoint.load(run_dir / BEST)
    groups = s2.perpeft.groups  # PerPEFT: one set of tuned features per user group
    after, missing = {}, []
    for m in s2.modalities:
        # a grouped (PerPEFT) backbone keeps one table per group
        names = ([f"backbone.features.{m}"] if groups == 1 else
                 [f"backbone.tables.{g}.{m}" for g in range(groups)])
        tables = [state.get(name) for name in names]
        if all(t is not None and tuple(t.shape) == before[m].shape for t in tables):
            after |= {_label(m, g, groups): t.float().cpu().numpy() for g, t in enumerate(tables)}
        else:
            missing.append(m)
    if missing:
        after |= _reencode(run_dir, cfg, s2, dataset, state, missing, device)
    return {_label(m, g, groups): (np.asarray(before[m]), after[_label(m, g, groups)])
            for m in s2.modalities for g in range(groups)}


def _label(modality: str, group: int, groups: int) -> str:
    """A feature set's name: the modality, and the user group of a PerPEFT run."""
    return modality if groups == 1 else f"{modality}, user group {group}"


def _reencode(run_dir, cfg, s2, dataset, state, modalities, device) -> dict[str, np.ndarray]:
    """Re-encode every item with the tuned towers stored in best.pt (each group's, PerPEFT)."""
    raw = {"image": dataset.items.images, "text": dataset.items.texts}
    out = {}
    for g in range(s2.perpeft.groups):
        member = "" if s2.perpeft.groups == 1 else f"members.{g}."
        tuned = _reencode_group(run_dir, cfg, s2, state, modalities, device, raw, member)
        out |= {_label(m, g, s2.perpeft.groups): f for m, f in tuned.items()}
    return out


def _reencode_group(run_dir, cfg, s2, state, modalities, device, raw,
                    member: str) -> dict[str, np.ndarray]:
    """Every item encoded by the towers stored under towers.<m>.<member> in best.pt."""
    towers = build_towers(cfg.encoders, s2.model_copy(update={"modalities": modalities}))
    out = {}
    for m, tower in towers.items():
        prefix = f"towers.{m}.{member}"
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not own:
            raise KeyError(f"{run_dir / BEST} has no {prefix}* parameters to re-encode {m} with")
        result = tower.load_state_dict(own, strict=False)
        tuned = {n for n, q in tower.named_parameters() if q.requires_grad}
        if result.unexpected_keys or tuned & set(result.missing_keys):
            raise KeyError(f"{run_dir / BEST} does not match the {m} tower of its stage2.yaml: "
                           f"unexpected {result.unexpected_keys[:3]}, missing tuned "
                           f"{sorted(tuned & set(result.missing_keys))[:3]}")
        tower.to(device).eval()
        out[m] = encode(tower, raw[m], s2.encode.batch_size, device, grad=False).cpu().numpy()
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: `python -m train.plots RUN_DIR [--out PNG] [--seed S]` for a stage-2 run."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m train.plots", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="stage-2 run directory")
    p.add_argument("--out", type=Path, help="PNG path (default RUN_DIR/plots/tsne_kde.png)")
    p.add_argument("--seed", type=int, default=0, help="t-SNE random state")
    args = p.parse_args(argv)
    out = args.out or args.run / PLOTS / TSNE
    plot_tsne_kde(stage2_feature_sets(args.run), out, args.seed, title=str(args.run))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
