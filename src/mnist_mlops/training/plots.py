"""Pictures of training and evaluation, written as PNG files (headless, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def learning_curves(rows: list[dict], path: Path) -> Path:
    """Train/val loss and accuracy per epoch, side by side."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=False):
        ax.plot(epochs, [r.get(metric) for r in rows], "o-", label=f"train {metric}")
        ax.plot(epochs, [r.get(f"val_{metric}") for r in rows], "s-", label=f"val {metric}")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def confusion_matrix(matrix: np.ndarray, path: Path) -> Path:
    """Counts of true (rows) against predicted (columns) digits."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.4))
    im = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (test)")
    threshold = matrix.max() / 2
    for i in range(10):
        for j in range(10):
            if matrix[i, j]:
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[i, j] > threshold else "black")
    return _save(fig, path)


def misclassified(x: np.ndarray, y: np.ndarray, probs: np.ndarray, limit: int, path: Path) -> Path:
    """The worst mistakes first (highest confidence in a wrong digit), with true/pred labels."""
    plt = _pyplot()
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][:limit]
    cols = max(1, min(9, len(wrong)))
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong, strict=False):
        ax.imshow(x[i].squeeze(), cmap="gray_r")
        ax.set_title(f"true {y[i]} / pred {pred[i]}\n{probs[i, pred[i]]:.0%}", fontsize=7)
    if not len(wrong):
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center")
    fig.suptitle("worst misclassified test digits", fontsize=9)
    return _save(fig, path)


def conv_filters(kernel: np.ndarray, path: Path) -> Path:
    """The 3×3 filters of the first Conv2D layer: what the network looks for first."""
    plt = _pyplot()
    k = kernel[:, :, 0, :]  # (3, 3, filters)
    n = k.shape[-1]
    cols = min(8, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in zip(range(n), axes.flat, strict=False):
        ax.imshow(k[:, :, i], cmap="RdBu_r", vmin=-np.abs(k).max(), vmax=np.abs(k).max())
    fig.suptitle("first Conv2D layer filters (3×3)", fontsize=9)
    return _save(fig, path)


def robustness(metrics: dict[str, float], clean_accuracy: float, path: Path) -> Path:
    """Accuracy per corruption of the robustness slice (one colour per family), against the
    clean test accuracy and the slice's mean (`robust_accuracy`)."""
    plt = _pyplot()
    names = [k.removeprefix("robust_") for k in metrics if k != "robust_accuracy"]
    values = [metrics[f"robust_{n}"] for n in names]
    families = list(dict.fromkeys(n.split("_")[0] for n in names))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(10, 3.8))
    ax.bar(names, values, color=[colours(families.index(n.split("_")[0]) % 10) for n in names])
    ax.axhline(clean_accuracy, color="black", linestyle="--", linewidth=1, label=f"clean test {clean_accuracy:.3f}")
    mean = metrics.get("robust_accuracy", float("nan"))
    ax.axhline(mean, color="tab:red", linewidth=1, label=f"robust accuracy {mean:.3f}")
    ax.set_ylim(max(0.0, min([*values, clean_accuracy]) - 0.05), 1.0)
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy per corruption (robustness slice, through the upload conversion)")
    ax.tick_params(axis="x", rotation=60)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower left")
    return _save(fig, path)
