"""PNG plots of a run (matplotlib, headless): curves, kept channels per layer, utility heatmap."""
from __future__ import annotations

import math
from pathlib import Path

import torch


def save_plots(rows: list[dict], kept_history: list[dict[str, int]], utilities: dict[str, torch.Tensor],
               out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [r["loss"] for r in rows], marker="o")
    ax_loss.set_xlabel("epoch"), ax_loss.set_ylabel("training loss")
    ax_acc.plot(epochs, [r["train_acc"] for r in rows], marker="o", label="train")
    ax_acc.plot(epochs, [r["test_acc"] for r in rows], marker="o", label="test")
    ax_acc.set_xlabel("epoch"), ax_acc.set_ylabel("accuracy"), ax_acc.legend()
    fig.tight_layout()
    paths.append(out / "curves.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    if kept_history:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name in kept_history[0]:
            ax.plot(epochs[:len(kept_history)], [k[name] for k in kept_history], marker=".", label=name)
        ax.set_xlabel("epoch"), ax.set_ylabel("kept channels (end of epoch)")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        paths.append(out / "kept_channels.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

    if utilities:
        width = max(u.numel() for u in utilities.values())
        grid = torch.full((len(utilities), width), math.nan)
        for i, u in enumerate(utilities.values()):
            grid[i, : u.numel()] = u.float().cpu()
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(utilities) + 1.5))
        image = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_yticks(range(len(utilities)), list(utilities), fontsize=6)
        ax.set_xlabel("channel"), ax.set_title("utilities at the end of training")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        paths.append(out / "utilities.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
