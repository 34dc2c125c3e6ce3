"""``dcp-train``: train a network with DCP, finalize it, and report what happened.

With no arguments it trains a small VGG-style CNN on the digits dataset bundled with
scikit-learn (no downloads) at prune ratio 0.5, then prints accuracy, kept channels per layer,
parameters and FLOPs dense vs finalized, and the time of one training step dense vs DCP.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import dcp_kernels
from dcp_kernels.models import vgg
from dcp_kernels.train.data import load_digits

DIGITS_VGG = [32, 32, "M", 64, 64, "M", 128, 128]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dcp-train", description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    p.add_argument("--explore-epochs", type=int, default=2, help="epochs with every channel selected (default 2)")
    p.add_argument("--prune-ratio", type=float, default=0.5, help="fraction of prunable channels switched off")
    p.add_argument("--decay", type=float, default=0.6, help="utility decay factor (default 0.6)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--image-size", type=int, default=32, help="digits are upsampled from 8x8 to this size (default 32)")
    p.add_argument("--backend", default="auto", help="auto | reference | torch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing-steps", type=int, default=10, help="steps timed for the dense-vs-DCP comparison")
    p.add_argument("--out", default="runs/digits", help="directory for metrics, summary and the finalized model")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.epochs < 1:
        raise SystemExit("dcp-train: --epochs must be >= 1")
    if not 0 <= args.explore_epochs < args.epochs:
        raise SystemExit("dcp-train: --explore-epochs must be in [0, --epochs)")
    if not 0 <= args.prune_ratio < 1:
        raise SystemExit("dcp-train: --prune-ratio must be in [0, 1)")
    if args.batch_size < 1 or args.lr <= 0:
        raise SystemExit("dcp-train: --batch-size must be >= 1 and --lr > 0")


def conv_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every Conv2d and Linear for one sample shaped like ``x[0]``."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.shape[1] * output.shape[2] * output.shape[3] * module.in_channels // module.groups * kh * kw
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            model(x[:1])
            model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return total


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / len(y)


def compare_step_times(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, SGD step) per model on (x, y).

    The models take turns step by step, so a noisy machine slows them all alike and the ratios
    stay meaningful. Two warm-up rounds are not counted.
    """
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m.train()
    for i in range(steps + 2):
        for name, model in models.items():
            start = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``dcp-train``): returns the process exit status."""
    run(argv)
    return 0


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv``, train, finalize, report; returns the summary that is also saved as JSON."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = (t.to(device) for t in load_digits(args.image_size, seed=args.seed))
    model = vgg(DIGITS_VGG, num_classes=10, in_channels=1).to(device)
    dense_model = copy.deepcopy(model)  # same architecture and init, never converted
    dense_params = sum(p.numel() for p in model.parameters())
    dense_flops = conv_flops(model, x_test)

    prop = dcp_kernels.convert(
        model, args.prune_ratio, explore_epochs=args.explore_epochs, decay=args.decay, backend=args.backend
    )
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    print(f"dcp-train: digits {tuple(x_train.shape[1:])}, {len(y_train)} train / {len(y_test)} test images, "
          f"{len(prop.layers)} prunable layers, prune ratio {args.prune_ratio}, backend "
          f"{dcp_kernels.ops.resolve_backend(args.backend, device)}")
    rows = []
    g = torch.Generator().manual_seed(args.seed)
    start_time = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=g).to(device)
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(range(0, len(order), args.batch_size), desc=f"epoch {epoch + 1}/{args.epochs}",
                   disable=True if args.no_progress else None, leave=False)  # None: off when not a terminal
        t0 = time.perf_counter()
        for i in bar:
            idx = order[i:i + args.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            loss_sum += float(loss.detach()) * len(yb)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                            kept=sum(prop.kept().values()), img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        sched.step()
        row = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": correct / seen,
               "test_acc": accuracy(model, x_test, y_test), "kept": sum(prop.kept().values()),
               "decay": prop.decay, "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"epoch {epoch + 1:>3}: loss {row['loss']:.3f}  train {row['train_acc']:.3f}  "
              f"test {row['test_acc']:.3f}  kept {row['kept']}/{prop.total_channels}  {row['seconds']:.1f}s")
        prop.epoch_end()
    train_seconds = time.perf_counter() - start_time

    gated_acc = accuracy(model, x_test, y_test)
    final = prop.finalize()
    final_acc = accuracy(final, x_test, y_test)
    final_params = sum(p.numel() for p in final.parameters())
    final_flops = conv_flops(final, x_test)

    # Dense vs DCP step time, measured side by side on one batch, after training (final selection).
    xb, yb = x_train[: args.batch_size], y_train[: args.batch_size]
    prop.explore_epochs = 0  # keep selecting (not exploring) while timing
    timed = compare_step_times({"dense": dense_model, "dcp": model, "finalized": copy.deepcopy(final)},
                               xb, yb, args.timing_steps)
    dense_step, dcp_step, ideal_step = timed["dense"], timed["dcp"], timed["finalized"]

    print("\nkept channels per layer:")
    for name, layer in zip(prop.layer_names, prop.layers):
        print(f"  {name:<10} {int(layer.selected.sum()):>4} / {layer.out_channels}")
    summary = {
        "test_accuracy_gated": gated_acc,
        "test_accuracy_finalized": final_acc,
        "params_dense": dense_params, "params_finalized": final_params,
        "flops_dense": dense_flops, "flops_finalized": final_flops,
        "step_seconds_dense": dense_step, "step_seconds_dcp": dcp_step, "step_seconds_finalized": ideal_step,
        "train_seconds": train_seconds, "kept": prop.kept(), "args": vars(args),
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    print(f"\ntest accuracy: gated {gated_acc:.4f}, finalized {final_acc:.4f}")
    print(f"parameters: dense {dense_params:,} -> finalized {final_params:,} ({final_params / dense_params:.2f}x)")
    print(f"FLOPs/image: dense {dense_flops:,} -> finalized {final_flops:,} ({final_flops / dense_flops:.2f}x)")
    print(f"training step (batch {len(yb)}, {device}, {torch.get_num_threads()} threads): dense {dense_step * 1e3:.1f} ms, "
          f"DCP {dcp_step * 1e3:.1f} ms ({dense_step / dcp_step:.2f}x faster), "
          f"finalized model {ideal_step * 1e3:.1f} ms")

    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    torch.save(final, out / "finalized_model.pt")
    torch.save(final.state_dict(), out / "finalized_state_dict.pt")
    print(f"outputs: {os.fspath(out)}/ (metrics.csv, summary.json, finalized_model.pt, finalized_state_dict.pt)")
    return summary


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
