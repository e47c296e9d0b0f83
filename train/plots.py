"""Figures of a run directory: training curves (and, later, feature t-SNE)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
