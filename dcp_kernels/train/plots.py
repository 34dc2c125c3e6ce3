"""PNG plots of a run (matplotlib, headless): curves, kept channels per layer, utility heatmap."""
from __future__ import annotations

import math
from pathlib import Path

import torch

FONT = 9  # readable at 100 dpi without zooming


def layer_labels(names: list[str]) -> list[str]:
    """Legend labels: the layer's number in forward order and its module path in the model (a
    ``Sequential`` index such as ``0.3`` alone says little; the number gives the depth)."""
    return [f"{i + 1}. {name}" for i, name in enumerate(names)]


def save_plots(rows: list[dict], kept_history: list[dict[str, int]], utilities: dict[str, torch.Tensor],
               out: Path, dense_rows: list[dict] | None = None) -> list[Path]:
    """Write ``curves.png`` (loss; train/test accuracy, with the dense baseline's test accuracy when
    ``dense_rows`` is given), ``kept_channels.png`` and ``utilities.png`` into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plt.rcParams.update({"font.size": FONT})
    paths = []
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["loss"] for r in rows], marker="o")
    ax_loss.set_xlabel("epoch"), ax_loss.set_ylabel("training loss")
    ax_acc.plot(epochs, [r["train_acc"] for r in rows], marker="o", label="train")
    ax_acc.plot(epochs, [r["test_acc"] for r in rows], marker="o", label="test")
    if dense_rows:
        ax_acc.plot([r["epoch"] for r in dense_rows], [r["test_acc"] for r in dense_rows], color="gray",
                    linestyle="--", marker=".", label="dense baseline (test)")
    ax_acc.set_xlabel("epoch"), ax_acc.set_ylabel("accuracy"), ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    paths.append(out / "curves.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    if kept_history:
        names = list(kept_history[0])
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for name, label in zip(names, layer_labels(names)):
            ax.plot(epochs[:len(kept_history)], [k[name] for k in kept_history], marker=".", label=label)
        ax.set_xlabel("epoch"), ax.set_ylabel("kept channels (end of epoch)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("kept output channels per prunable layer (numbered in forward order)")
        # Outside the axes, so the legend never hides a curve, in as many columns as it needs.
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=max(1, math.ceil(len(names) / 18)),
                  fontsize=FONT - 1, title="layer")
        fig.tight_layout()
        paths.append(out / "kept_channels.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

    if utilities:
        names = list(utilities)
        width = max(u.numel() for u in utilities.values())
        grid = torch.full((len(utilities), width), math.nan)
        for i, u in enumerate(utilities.values()):
            grid[i, : u.numel()] = u.float().cpu()
        fig, ax = plt.subplots(figsize=(10, 0.3 * len(utilities) + 2))
        image = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_yticks(range(len(names)), layer_labels(names), fontsize=FONT - 1)
        ax.set_xlabel("output channel"), ax.set_ylabel("layer")
        ax.set_title("utilities at the end of training (blank: the layer has fewer channels)")
        bar = fig.colorbar(image, ax=ax)
        bar.set_label("utility (decayed sum)")
        fig.tight_layout()
        paths.append(out / "utilities.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
