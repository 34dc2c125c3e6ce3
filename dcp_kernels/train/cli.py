"""``dcp-train``: train a network with DCP, finalize it, and report what happened.

With no arguments it trains a small VGG-style CNN on the digits dataset bundled with
scikit-learn (no downloads) at prune ratio 0.5, then prints accuracy, kept channels per layer,
parameters and FLOPs dense vs finalized, and the time of one training step dense vs DCP.
``--recipe cifar10-vgg16 --data DIR`` (and the other recipes) run the paper's settings.
Runs under ``torchrun --nproc_per_node N`` with DistributedDataParallel.

This module is the command line and the console; the run itself is ``run.py``, what it trains and
measures ``zoo.py``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence

import torch

import dcp_kernels
from dcp_kernels.rule import check_prune_ratio, check_round_to
from dcp_kernels.train import checkpoints
from dcp_kernels.train import run as training
from dcp_kernels.train.errors import Diverged, UsageError
from dcp_kernels.train.recipes import RECIPES, Recipe
from dcp_kernels.train.run import TrainingRun


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dcp-train", description=__doc__.splitlines()[0].replace("``", ""))
    p.add_argument("--recipe", default="digits", choices=sorted(RECIPES),
                   help="preset of data, model and schedule (default: digits, the embedded run)")
    p.add_argument("--data", help="dataset directory (CIFAR-10 python batches, or an ImageFolder tree)")
    p.add_argument("--epochs", type=int, help="training epochs (recipe default)")
    p.add_argument("--explore-epochs", type=int, help="epochs with every channel selected (recipe default)")
    p.add_argument("--prune-ratio", type=float, help="fraction of prunable channels switched off")
    p.add_argument("--decay", type=float, help="initial utility decay factor (recipe default 0.6)")
    p.add_argument("--batch-size", type=int, help="images per step (recipe default)")
    p.add_argument("--lr", type=float, help="initial SGD learning rate (recipe default)")
    p.add_argument("--image-size", type=int, default=32, help="digits: upsampled from 8x8 to this size (default 32)")
    p.add_argument("--backend", default="auto", help="auto | reference | torch | triton | extension")
    p.add_argument("--round-to", type=int, default=8,
                   help="keep each layer's width a multiple of this (default 8 on every device: tensor cores, and few "
                        "distinct conv shapes for cuDNN and oneDNN to plan; 1: the paper's exact rule)")
    p.add_argument("--static-shapes", action="store_true",
                   help="train at shapes that stay the same from step to step: capacity widths on --backend "
                        "torch/auto (ATen convs, one host read per step), full width on --backend triton "
                        "(no host read)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture each training step in a CUDA graph and replay it (implies --static-shapes; "
                        "--backend torch/auto or triton, on a CUDA device, one process, --amp off or bf16)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--amp", default="off", choices=["off", "fp16", "bf16"], help="autocast precision")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense", action="store_true", help="train the same model without DCP (baseline)")
    p.add_argument("--resume", metavar="PATH|auto",
                   help="checkpoint to continue from (a run directory's checkpoint.pt); 'auto': --out's checkpoint "
                        "when there is one, else start (for torchrun --max-restarts, which restarts the same command)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also write checkpoint.pt every N training steps, not only at the end of each epoch "
                        "(long epochs); a resumed run continues mid-epoch exactly as if never stopped")
    p.add_argument("--dense-run", metavar="DIR",
                   help="output directory of a 'dcp-train --dense' run of the same recipe: its test accuracy "
                        "is drawn on the accuracy plot as the baseline")
    p.add_argument("--timing-steps", type=int, default=10,
                   help="steps timed for the dense-vs-DCP comparison at the end (0: skip)")
    p.add_argument("--workers", type=int, default=4, help="data loader workers (ImageFolder only)")
    p.add_argument("--out", default="runs/digits", help="directory for metrics, plots, checkpoint and models")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    p.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    return p


def resolve(args: argparse.Namespace) -> tuple[Recipe, dict]:
    """The recipe, and the effective hyperparameters (recipe values overridden by flags)."""
    recipe = RECIPES[args.recipe]
    hp = {
        "epochs": args.epochs if args.epochs is not None else recipe.epochs,
        "explore_epochs": args.explore_epochs if args.explore_epochs is not None else recipe.explore_epochs,
        "prune_ratio": args.prune_ratio if args.prune_ratio is not None else recipe.prune_ratio,
        "decay": args.decay if args.decay is not None else recipe.decay,
        "batch_size": args.batch_size if args.batch_size is not None else recipe.batch_size,
        "lr": args.lr if args.lr is not None else recipe.lr,
        "amp": args.amp,
        "round_to": args.round_to,
    }
    if hp["epochs"] < 1:
        raise UsageError("--epochs must be >= 1")
    if not 0 <= hp["explore_epochs"] < hp["epochs"] and not args.dense:
        raise UsageError("--explore-epochs must be in [0, epochs)")
    _library_check("--prune-ratio", check_prune_ratio, hp["prune_ratio"])
    if hp["batch_size"] < 1 or hp["lr"] <= 0:
        raise UsageError("--batch-size must be >= 1 and --lr > 0")
    if args.checkpoint_every < 0:
        raise UsageError("--checkpoint-every must be >= 0 (0: only at the end of each epoch)")
    if recipe.data != "digits" and not args.data:
        raise UsageError(f"recipe {recipe.name} needs --data DIR ({recipe.data} layout)")
    _library_check("--round-to", check_round_to, args.round_to)
    _library_check(f"--backend {args.backend!r}", dcp_kernels.ops.resolve_backend, args.backend)
    for flag, on in (("--static-shapes", args.static_shapes), ("--cuda-graphs", args.cuda_graphs)):
        if on and args.dense:
            raise UsageError(f"{flag} is for DCP training; drop it with --dense")
    for flag, on in (("--static-shapes", args.static_shapes), ("--cuda-graphs", args.cuda_graphs)):
        if on and dcp_kernels.ops.capabilities(args.backend).static_shapes is None:
            raise UsageError(f"{flag} needs --backend {dcp_kernels.ops.static_shape_backends()}, got {args.backend}")
    if args.cuda_graphs and args.amp == "fp16":
        raise UsageError("--cuda-graphs does not support --amp fp16 (its loss scaler reads the device every step); "
                         "use --amp bf16 or off")
    # Milestones scale with a shortened schedule so --epochs keeps the recipe's shape.
    scale = hp["epochs"] / recipe.epochs
    hp["milestones"] = tuple(sorted({max(1, round(m * scale)) for m in recipe.milestones}))
    return recipe, hp


def _library_check(flag: str, check, *values) -> None:
    """Run the library's own check of an argument (one place per rule) and answer a bad value with
    a one-line usage error naming the flag."""
    try:
        check(*values)
    except ValueError as error:
        raise UsageError(f"{flag}: {error}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``dcp-train``): returns the process exit status.

    A user error (a bad flag value, a missing or unreadable file, a device that is not there) prints
    one line ``dcp-train: ...`` naming the argument and exits with status 2; ``--debug`` shows the
    traceback too. Anything else is a bug and keeps its traceback.
    """
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        run(argv)
    except (UsageError, Diverged) as error:
        if debug:
            traceback.print_exc()
        print(f"dcp-train: {error}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"dcp-train: interrupted. {_resume_hint(argv)}", file=sys.stderr)
        return 130
    return 0


def _resume_hint(argv: Sequence[str] | None) -> str:
    """Where the last checkpoint of the run that ``argv`` started is, and how to continue it."""
    args, _ = build_parser().parse_known_args(argv)
    ckpt = Path(args.out) / checkpoints.CHECKPOINT
    if not ckpt.is_file():
        return "No checkpoint had been written yet, so there is nothing to resume from."
    given = list(sys.argv[1:] if argv is None else argv)
    if args.resume == "auto":
        return f"The last checkpoint is {ckpt}; continue with the same command (it has --resume auto)."
    if "--resume" in given:  # resuming again: drop the old --resume and its value
        at = given.index("--resume")
        del given[at:at + 2]
    return f"The last checkpoint is {ckpt}; continue with: dcp-train {' '.join(given + ['--resume', str(ckpt)])}"


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv``, train, finalize, report; returns the summary that is also saved as JSON."""
    return train(argv).summary


def train(argv: Sequence[str] | None = None) -> TrainingRun:
    """:func:`run`, returning the whole run (model, controller, summary) for callers in the same process."""
    args = build_parser().parse_args(argv)
    # Asked first: the answer counts as the extension's "not built" notice, which resolving "auto"
    # would otherwise give as a warning (before a usage error's one line, too).
    extension_status = dcp_kernels.ops.extension.status()
    state = training.build(args, *resolve(args), extension_status)
    training.resume_if_asked(state)
    _announce(state)
    training.start(state)
    start_time = time.perf_counter()
    for epoch in range(state.start_epoch, state.hp["epochs"]):
        training.train_epoch(state, epoch)
    state.summary, final = training.finish(state, time.perf_counter() - start_time)
    if state.is_main:
        _print_summary(state, state.summary)
        written = training.save_outputs(state, state.summary, final)
        print(f"outputs: {os.fspath(state.out)}/ ({', '.join(written)})")
    if state.world > 1:
        torch.distributed.barrier()
    return state


def _announce(state: TrainingRun) -> None:
    """Print what runs (rank 0)."""
    if not state.is_main:
        return
    args, spec, hp = state.args, state.spec, state.hp
    mode = "dense baseline" if args.dense else (
        f"{len(state.prop.layers)} prunable layers, prune ratio {hp['prune_ratio']}, backend "
        f"{dcp_kernels.ops.resolve_backend(args.backend, state.device)}")
    print(f"dcp-train: {state.recipe.name}: {spec.name} {spec.in_channels}x{spec.image_size}x{spec.image_size}, "
          f"{spec.train_size} train / {spec.test_size} test images, {mode}, {state.world} process(es)")
    print(f"dcp-train: C++/CUDA extension {state.extension_status}")


def _print_summary(state: TrainingRun, summary: dict) -> None:
    prop = state.prop
    if prop is not None:
        print("\nkept channels per layer:")
        for name, layer in zip(prop.layer_names, prop.layers):
            print(f"  {name:<24} {int(layer.selected.sum()):>5} / {layer.out_channels}")
    if summary["capacity_waste"] is not None:
        print(f"capacity widths: {summary['capacity_waste']:.2f}x the kept channels (slots / kept)")
    print(f"\ntest accuracy: gated {summary['test_accuracy_gated']:.4f}, "
          f"finalized {summary['test_accuracy_finalized']:.4f}")
    p_d, p_f, f_d, f_f = (summary[k] for k in ("params_dense", "params_finalized", "flops_dense", "flops_finalized"))
    print(f"parameters: dense {p_d:,} -> finalized {p_f:,} ({p_f / p_d:.2f}x)")
    print(f"FLOPs/image: dense {f_d:,} -> finalized {f_f:,} ({f_f / f_d:.2f}x)")
    if "step_seconds_dcp" in summary:
        d, c, f = summary["step_seconds_dense"], summary["step_seconds_dcp"], summary["step_seconds_finalized"]
        print(f"training step (batch {summary['timing_batch']}, {state.device}, {torch.get_num_threads()} threads): "
              f"dense {d * 1e3:.1f} ms, DCP {c * 1e3:.1f} ms ({_speed_words(d, c)}), finalized model {f * 1e3:.1f} ms")


def _speed_words(dense: float, other: float) -> str:
    """'1.85x faster' or '1.20x slower' than dense (never 'faster' for a slower step)."""
    return f"{dense / other:.2f}x faster" if other <= dense else f"{other / dense:.2f}x slower"


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
