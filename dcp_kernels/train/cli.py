"""``dcp-train``: train a network with DCP, finalize it, and report what happened.

With no arguments it trains a small VGG-style CNN on the digits dataset bundled with
scikit-learn (no downloads) at prune ratio 0.5, then prints accuracy, kept channels per layer,
parameters and FLOPs dense vs finalized, and the time of one training step dense vs DCP.
``--recipe cifar10-vgg16 --data DIR`` (and the other recipes) run the paper's settings.
Runs under ``torchrun --nproc_per_node N`` with DistributedDataParallel.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import functools
import inspect
import itertools
import json
import math
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import dcp_kernels
from dcp_kernels.cuda_graphs import GraphedStep
from dcp_kernels.models import resnet_cifar, vgg
from dcp_kernels.propagation import DecaySchedule
from dcp_kernels.rule import check_prune_ratio, check_round_to
from dcp_kernels.train import checkpoints
from dcp_kernels.train.checkpoints import load_checkpoint as _load_checkpoint  # noqa: F401  (tests' name)
from dcp_kernels.train.checkpoints import save_atomically as _save_atomically
from dcp_kernels.train.data import DataSpec, cifar10_spec, digits_spec, imagefolder_spec
from dcp_kernels.train.divergence import FP16_PATIENCE, LossWatch, Verdict
from dcp_kernels.train.errors import Diverged, UsageError
from dcp_kernels.train.recipes import RECIPES, Recipe

DIGITS_VGG = [32, 32, "M", 64, 64, "M", 128, 128]

DISPLAY_EVERY = 20  # progress-bar refresh and loss check (steps): each reads the device once


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


def load_data(recipe: Recipe, args: argparse.Namespace, batch_size: int) -> DataSpec:
    if recipe.data == "digits":
        return digits_spec(batch_size, args.image_size, seed=args.seed)
    if recipe.data == "cifar10":
        return cifar10_spec(args.data, batch_size, seed=args.seed)
    return imagefolder_spec(args.data, batch_size, seed=args.seed, workers=args.workers)


def build_model(name: str, spec: DataSpec) -> nn.Module:
    if name == "digits-vgg":
        return vgg(DIGITS_VGG, num_classes=spec.num_classes, in_channels=spec.in_channels)
    if name == "vgg16":
        return vgg("vgg16", num_classes=spec.num_classes, in_channels=spec.in_channels)
    if name == "resnet32":
        return resnet_cifar(32, num_classes=spec.num_classes, in_channels=spec.in_channels)
    if name == "resnet50":
        try:
            import torchvision
        except ImportError as exc:
            raise UsageError("the resnet50 recipe needs torchvision") from exc
        return torchvision.models.resnet50(num_classes=spec.num_classes)
    raise ValueError(f"unknown model {name!r}")


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
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total


def accuracy(model: nn.Module, spec: DataSpec, device: torch.device) -> float:
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for x, y in spec.test_batches():
            x, y = x.to(device), y.to(device)
            correct += int((model(x).argmax(1) == y).sum())
            seen += len(y)
    return correct / seen


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
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def _distributed(device_type: str) -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun.

    NCCL only for CUDA training: a ``--device cpu`` run on a GPU machine must use gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if (restart != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                and os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE")):
            # A worker group restarted by torchrun --max-restarts shares the first group's store (torch
            # 2.14), whose keys from the dead group's start (gloo addresses, NCCL ids) a rank can read
            # before their new values are written: it then connects to a dead process (pytorch/pytorch
            # #135712). One node's ranks agree on the restart count, so it names a fresh key space.
            store, rank, size = next(torch.distributed.rendezvous("env://"))
            store = torch.distributed.PrefixStore(f"dcp-train/restart-{restart}/", store)
            torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=size)
        else:
            torch.distributed.init_process_group(backend)
    if world > 1:
        return torch.distributed.get_rank(), world
    return 0, 1


def _device(name: str) -> torch.device:
    """``--device``, checked: a clear line instead of a driver error deep inside the first ``.to``."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"--device {name!r} is not a device (use cpu, cuda or cuda:N)") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                         "use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def _speed_words(dense: float, other: float) -> str:
    """'1.85x faster' or '1.20x slower' than dense (never 'faster' for a slower step)."""
    return f"{dense / other:.2f}x faster" if other <= dense else f"{other / dense:.2f}x slower"


def _read_dense_run(directory: str) -> list[dict]:
    """The per-epoch rows of a dense baseline run (its metrics.csv), for the accuracy plot."""
    path = Path(directory) / "metrics.csv"
    if not path.is_file():
        raise UsageError(f"--dense-run {directory}: no metrics.csv there (give the --out directory of a "
                         "finished 'dcp-train --dense' run)")
    try:
        with open(path, newline="") as f:
            return [{"epoch": int(r["epoch"]), "test_acc": float(r["test_acc"])} for r in csv.DictReader(f)]
    except (KeyError, ValueError) as error:
        raise UsageError(f"--dense-run {directory}: {path.name} is not a dcp-train metrics file ({error})") from None


def _epoch_batches(spec: DataSpec, epoch: int, batch_size: int, rank: int, world: int, skip: int):
    """(steps, batches): this rank's batches of the epoch, the first ``skip`` steps left out.

    Every rank takes the same number of batches (DDP's collectives must pair up): the last
    ``len % world`` batches of the epoch are dropped on several processes. Batches are read lazily
    (an ImageNet epoch never sits in memory); skipped ones are still drawn from the loader, so the
    data order and augmentation after a mid-epoch resume are exactly those of an unbroken run.
    """
    total = math.ceil(spec.train_size / batch_size)
    usable = total - total % world
    steps = usable // world

    def batches():
        for i, batch in enumerate(itertools.islice(spec.train_batches(epoch), usable)):
            if i % world == rank and i // world >= skip:
                yield batch

    return steps, batches()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


@dataclass
class TrainingRun:
    """Everything one ``dcp-train`` run holds, built by :func:`_build` and advanced by the steps of
    :func:`train` (resume, one epoch at a time, finish). ``summary`` is filled at the end."""

    args: argparse.Namespace
    recipe: Recipe
    hp: dict
    spec: DataSpec
    device: torch.device
    rank: int
    world: int
    out: Path
    model: nn.Module  # the converted model (the dense one with --dense)
    dense_model: nn.Module  # same architecture and init, never converted (timing)
    probe: torch.Tensor  # one test image, for FLOPs
    dense_params: int
    dense_flops: int
    prop: "dcp_kernels.Propagation | None"
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    train_model: nn.Module  # the model, or its DDP wrapper
    dense_rows: list[dict] | None = None  # a dense run's metrics, for the plot
    rows: list[dict] = field(default_factory=list)
    kept_history: list[dict[str, int]] = field(default_factory=list)
    start_epoch: int = 0
    resumed_step: dict | None = None  # where a mid-epoch checkpoint left its epoch
    last_checkpoint_at: str | None = None  # where in the run the checkpoint on disk was taken ("epoch 2, step 40")
    loss_watch: LossWatch | None = None
    graphed: GraphedStep | None = None
    extension_status: str = ""
    summary: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        # Under CUDA graphs autocast must not cache casts across the capture (PyTorch's graph rule).
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=not self.args.cuda_graphs)


def run(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv``, train, finalize, report; returns the summary that is also saved as JSON."""
    return train(argv).summary


def train(argv: Sequence[str] | None = None) -> TrainingRun:
    """:func:`run`, returning the whole run (model, controller, summary) for callers in the same process."""
    state = _build(build_parser().parse_args(argv))
    source = _resume_source(state)
    if source is not None:
        _resume(state, source)
    _announce(state)
    start_time = time.perf_counter()
    for epoch in range(state.start_epoch, state.hp["epochs"]):
        _train_epoch(state, epoch)
    state.summary = _finish(state, time.perf_counter() - start_time)
    if state.world > 1:
        torch.distributed.barrier()
    return state


def _build(args: argparse.Namespace) -> TrainingRun:
    """Check the inputs, load the data, build and convert the model, make the optimizer."""
    extension_status = dcp_kernels.ops.extension.status()  # printed by _announce: the run's one "not built" notice
    recipe, hp = resolve(args)
    if args.data and not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: no such directory")
    if args.resume and args.resume != "auto" and not Path(args.resume).is_file():
        raise UsageError(f"--resume {args.resume}: no such file (or 'auto': --out's checkpoint when there is one)")
    dense_rows = _read_dense_run(args.dense_run) if args.dense_run else None
    device = _device(args.device)
    rank, world = _distributed(device.type)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    if args.cuda_graphs and (device.type != "cuda" or world > 1):
        raise UsageError("--cuda-graphs needs --device cuda and a single process")
    if not args.dense:
        try:
            dcp_kernels.ops.resolve_backend(args.backend, device)
        except RuntimeError as error:
            raise UsageError(f"--backend {args.backend}: {error}") from error
    try:
        spec = load_data(recipe, args, hp["batch_size"])
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise UsageError(f"--data {args.data}: {error}") from error
    model = build_model(recipe.model, spec).to(device)
    dense_model = copy.deepcopy(model)
    probe = next(spec.test_batches())[0][:1].to(device)
    dense_params = sum(p.numel() for p in model.parameters())
    dense_flops = conv_flops(model, probe)
    prop = None
    if not args.dense:
        schedule = DecaySchedule(hp["decay"], recipe.decay_step, hp["milestones"][:-1], hp["milestones"][-1])
        prop = dcp_kernels.convert(model, hp["prune_ratio"], explore_epochs=hp["explore_epochs"], decay=schedule,
                                   backend=args.backend, round_to=args.round_to,
                                   static_shapes=args.static_shapes or args.cuda_graphs)
    opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    train_model: nn.Module = model
    if world > 1:
        # Buffers are not broadcast from rank 0 at every forward (utilities are averaged over the ranks
        # before each selection whatever DDP broadcasts: convert() excludes them).
        # Newer torch deprecates broadcast_buffers for forward_sync_buffers, which still syncs once at
        # init: harmless here, every rank starts from the same seed (or the same checkpoint).
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync
        )
    state = TrainingRun(
        args=args, recipe=recipe, hp=hp, spec=spec, device=device, rank=rank, world=world,
        out=Path(args.out),  # created once the inputs are known good (no empty directory for a failed start)
        model=model, dense_model=dense_model, probe=probe, dense_params=dense_params, dense_flops=dense_flops,
        prop=prop, opt=opt, sched=torch.optim.lr_scheduler.MultiStepLR(opt, list(hp["milestones"]), gamma=0.1),
        scaler=torch.amp.GradScaler(device.type, enabled=args.amp == "fp16"),
        amp_dtype={"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.amp), train_model=train_model,
        dense_rows=dense_rows, extension_status=extension_status,
        loss_watch=LossWatch(device, FP16_PATIENCE if args.amp == "fp16" else 1),
    )
    if prop is not None:
        prop.use_grad_scaler(state.scaler)  # fp16: a step the scaler skips leaves the utilities alone
    if args.cuda_graphs:
        state.graphed = GraphedStep(functools.partial(_graph_step, state), model, prop, opt)
    return state


def _graph_step(state: TrainingRun, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The step GraphedStep captures (no zero_grad: it resets the gradients itself)."""
    with state.autocast():
        logits = state.train_model(xb)
        loss = F.cross_entropy(logits.float(), yb)
    loss.backward()
    state.opt.step()
    return loss, logits


def _resume_source(state: TrainingRun) -> Path | None:
    """The checkpoint to continue from: ``--resume PATH``, or with ``--resume auto`` the run
    directory's (None on a first start: nothing to continue)."""
    args = state.args
    if not args.resume:
        return None
    if args.resume != "auto":
        return Path(args.resume)
    if state.out.is_dir() and state.is_main:
        checkpoints.remove_stale_temporaries(state.out)
    found = checkpoints.auto_checkpoint(state.out)
    if state.world > 1:  # every rank must take the same path, or their collectives never pair up
        seen = torch.tensor([found is not None], dtype=torch.int64, device=state.device)
        torch.distributed.all_reduce(seen)
        if 0 < int(seen) < state.world:
            raise UsageError(f"--resume auto: only {int(seen)} of {state.world} processes see "
                             f"{state.out / checkpoints.CHECKPOINT}; give every node the same --out (a shared directory)")
    diverged = state.out / checkpoints.DIVERGED
    if diverged.is_file() and found is not None:
        raise UsageError(f"--resume auto: the run in {state.out} diverged ({diverged}); continue it by name with a "
                         f"lower learning rate (--resume {found} --lr ...), or delete {diverged.name} to go on as it was")
    if found is None and state.is_main:
        print(f"dcp-train: --resume auto: no checkpoint in {state.out} yet, starting the run")
    return found


def _resume(state: TrainingRun, path: Path) -> None:
    """Load the checkpoint at ``path``: weights, optimizer, schedule, DCP state, RNG, history."""
    args = state.args
    flag = "--resume auto" if args.resume == "auto" else "--resume"
    ckpt = _load_checkpoint(path, state.device, flag)
    checkpoints.check_same_run(ckpt, recipe=state.recipe.name, dense=args.dense, hyperparameters=state.hp,
                               processes=state.world, flag=flag, path=path)
    try:
        state.model.load_state_dict(ckpt["model"])
    except RuntimeError as error:  # another model (or a version that named its layers differently)
        raise UsageError(f"{flag} {path}: its model does not fit this run's: "
                         f"{str(error).splitlines()[0]}") from error
    state.opt.load_state_dict(ckpt["optimizer"])
    state.sched.load_state_dict(ckpt["scheduler"])
    saved_lr = (ckpt.get("hyperparameters") or {}).get("lr")
    if args.lr is not None:
        _rescale_learning_rate(state, saved_lr)
    elif saved_lr is not None:
        state.hp["lr"] = saved_lr  # no --lr given: the run goes on at its own rate (the optimizer's state)
    state.scaler.load_state_dict(ckpt["scaler"])
    if state.prop is not None:
        state.prop.load_state_dict(ckpt["dcp"])
    _set_rng_state(ckpt["rng"])
    state.rows, state.kept_history, state.start_epoch = ckpt["rows"], ckpt["kept_history"], ckpt["epoch"]
    state.resumed_step = ckpt.get("within_epoch")
    state.last_checkpoint_at = _where(state.start_epoch, state.resumed_step)
    if state.is_main:
        print(f"dcp-train: resumed from {path} ({state.last_checkpoint_at})")


def _rescale_learning_rate(state: TrainingRun, saved_lr: float | None) -> None:
    """``--resume PATH --lr X``: the optimizer's state holds the saved run's learning rates; scale them
    (and the schedule's base) by X over the saved ``--lr``, so the schedule goes on from the new rate."""
    new_lr = state.hp["lr"]
    if not saved_lr or saved_lr == new_lr:
        return
    factor = new_lr / saved_lr
    for group in state.opt.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    state.sched.base_lrs = [lr * factor for lr in state.sched.base_lrs]
    if state.is_main:
        print(f"dcp-train: --lr {new_lr:g} (the checkpoint's run had {saved_lr:g}): learning rates scaled by {factor:g}")


def _announce(state: TrainingRun) -> None:
    """Print what runs (rank 0) and create the output directory."""
    if not state.is_main:
        return
    args, spec, hp = state.args, state.spec, state.hp
    mode = "dense baseline" if args.dense else (
        f"{len(state.prop.layers)} prunable layers, prune ratio {hp['prune_ratio']}, backend "
        f"{dcp_kernels.ops.resolve_backend(args.backend, state.device)}")
    print(f"dcp-train: {state.recipe.name}: {spec.name} {spec.in_channels}x{spec.image_size}x{spec.image_size}, "
          f"{spec.train_size} train / {spec.test_size} test images, {mode}, {state.world} process(es)")
    print(f"dcp-train: C++/CUDA extension {state.extension_status}")
    state.out.mkdir(parents=True, exist_ok=True)
    (state.out / checkpoints.DIVERGED).unlink(missing_ok=True)  # a run that starts is a new attempt


def _where(epoch_done: int, within_epoch: dict | None) -> str:
    """Where in the run a checkpoint was taken, in words ("end of epoch 2", "epoch 3, step 40")."""
    return f"epoch {epoch_done + 1}, step {within_epoch['step']}" if within_epoch else f"end of epoch {epoch_done}"


def _check_loss(state: TrainingRun, epoch: int, step: int, *, weights: bool = False) -> None:
    """Stop with :class:`Diverged` when the loss went non-finite since the last check (one device read;
    under DDP one all-reduce, so every rank stops at the same step). ``weights``: also check that every
    parameter is finite (before a checkpoint: the file on disk must stay the last good one)."""
    counts = state.loss_watch.counts()
    if weights:
        tensors = [*state.model.parameters(), *(b for b in state.model.buffers() if b.is_floating_point())]
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
        counts = torch.cat([counts, (~finite).long().unsqueeze(0)])
    if state.world > 1:
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
    values = counts.tolist()
    verdict = state.loss_watch.take_verdict(values[:2])
    if verdict is None and weights and values[2]:
        verdict = Verdict(0, None, weights=True)
    if verdict is not None:
        message = _divergence_message(state, epoch, step, verdict)
        if state.is_main and state.out.is_dir():  # --resume auto (a torchrun restart) will not go on from it
            (state.out / checkpoints.DIVERGED).write_text(message + "\n")
        raise Diverged(message)


def _divergence_message(state: TrainingRun, epoch: int, step: int, verdict: Verdict) -> str:
    where = f"end of epoch {epoch + 1}" if step == 0 else f"epoch {epoch + 1}, step {step}"
    if verdict.weights:
        what = f"weights or buffers (BatchNorm statistics, utilities) are not finite ({where})"
    elif state.loss_watch.patience > 1:
        what = f"the loss has not been finite for {verdict.longest} steps in a row under the fp16 loss scaler ({where})"
    else:
        what = f"the loss is not finite (epoch {epoch + 1}, from step {verdict.first_step})"
    ckpt = state.out / checkpoints.CHECKPOINT
    if state.last_checkpoint_at:
        advice = (f"the last good checkpoint is {ckpt} ({state.last_checkpoint_at}): continue with --resume {ckpt} "
                  f"and a lower --lr (this run's: {state.hp['lr']:g})")
    else:
        advice = f"no checkpoint had been written yet: start again with a lower --lr (this run's: {state.hp['lr']:g})"
    return f"training diverged: {what}; stopped. {advice[0].upper()}{advice[1:]}"


def _checkpoint(state: TrainingRun, epoch_done: int, within_epoch: dict | None) -> None:
    """Every rank: stop if the run diverged, bring the utilities to what every rank will select from
    (a skipped fp16 step undone, averaged over the ranks: a resumed rank loads rank 0's); rank 0
    writes the checkpoint."""
    step = within_epoch["step"] if within_epoch else 0  # 0: the epoch's end
    _check_loss(state, epoch_done if within_epoch else epoch_done - 1, step, weights=True)
    if state.prop is not None:
        state.prop.skipped_steps.restore_if_skipped()
        if state.world > 1 and state.prop.distributed:
            state.prop.sync_utilities()
    if state.is_main:
        _save_checkpoint(state, epoch_done, within_epoch)
    state.last_checkpoint_at = _where(epoch_done, within_epoch)


def _save_checkpoint(state: TrainingRun, epoch_done: int, within_epoch: dict | None) -> None:
    _save_atomically({"model": state.model.state_dict(), "optimizer": state.opt.state_dict(),
                      "scheduler": state.sched.state_dict(), "scaler": state.scaler.state_dict(),
                      "dcp": state.prop.state_dict() if state.prop else None, "rng": _rng_state(),
                      "epoch": epoch_done, "within_epoch": within_epoch, "rows": state.rows,
                      "kept_history": state.kept_history, "dense": state.args.dense, "recipe": state.recipe.name,
                      "hyperparameters": state.hp, "processes": state.world},
                     state.out / checkpoints.CHECKPOINT)


def _train_epoch(state: TrainingRun, epoch: int) -> None:
    """One epoch: the steps (from a mid-epoch checkpoint's step when resuming), the epoch's row,
    the controller's epoch end, a checkpoint."""
    from tqdm.auto import tqdm

    args, hp, prop, device = state.args, state.hp, state.prop, state.device
    state.train_model.train()
    # Accumulated on the device: reading loss and accuracy every step would sync every step.
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, correct
    seen, step, earlier_seconds = 0, 0, 0.0
    if state.resumed_step is not None:  # continue the epoch a mid-epoch checkpoint left
        totals = state.resumed_step["totals"].to(device)
        seen, step, earlier_seconds = (state.resumed_step[k] for k in ("seen", "step", "seconds"))
        state.resumed_step = None
    steps, batches = _epoch_batches(state.spec, epoch, hp["batch_size"], state.rank, state.world, skip=step)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{hp['epochs']}", leave=False, total=steps, initial=step,
               disable=True if (args.no_progress or not state.is_main) else None)  # None: off when not a terminal
    t0 = time.perf_counter() - earlier_seconds
    for xb, yb in bar:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        if state.graphed is not None:
            loss, logits = state.graphed(xb, yb)
        else:
            with state.autocast():
                logits = state.train_model(xb)
                loss = F.cross_entropy(logits.float(), yb)
            state.opt.zero_grad(set_to_none=True)
            state.scaler.scale(loss).backward()
            state.scaler.step(state.opt)
            state.scaler.update()
        seen += len(yb)
        step += 1
        state.loss_watch.update(loss, step)
        with torch.no_grad():
            totals += torch.stack([loss.detach().double() * len(yb), (logits.argmax(1) == yb).sum().double()])
        if step % DISPLAY_EVERY == 0:
            _check_loss(state, epoch, step)
        if not bar.disable and (step % DISPLAY_EVERY == 0 or step == steps):
            loss_sum, correct = totals.tolist()  # one read every DISPLAY_EVERY steps
            postfix = {"loss": f"{loss_sum / seen:.3f}", "acc": f"{correct / seen:.3f}",
                       "img_s": f"{seen * state.world / (time.perf_counter() - t0):.0f}"}
            if prop is not None:
                postfix["kept"] = sum(prop.kept().values())  # host counts: no device read
            bar.set_postfix(postfix)
        if args.checkpoint_every and step % args.checkpoint_every == 0 and step < steps:
            _checkpoint(state, epoch, {"step": step, "seen": seen, "totals": totals.cpu(),
                                       "seconds": time.perf_counter() - t0})
    _check_loss(state, epoch, step)
    state.sched.step()
    loss_sum, correct = totals.tolist()
    row = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": correct / seen,
           "test_acc": accuracy(state.model, state.spec, device), "lr": state.opt.param_groups[0]["lr"],
           "kept": sum(prop.kept().values()) if prop else None, "decay": prop.decay if prop else None,
           "seconds": time.perf_counter() - t0}
    state.rows.append(row)
    if prop is not None:
        state.kept_history.append(prop.kept())
        prop.epoch_end()
    if state.is_main:
        kept = f"  kept {row['kept']}/{prop.total_channels}" if prop else ""
        print(f"epoch {epoch + 1:>3}: loss {row['loss']:.3f}  train {row['train_acc']:.3f}  "
              f"test {row['test_acc']:.3f}{kept}  {row['seconds']:.1f}s")
    _checkpoint(state, epoch + 1, None)


def _finish(state: TrainingRun, train_seconds: float) -> dict:
    """Finalize, measure, print and save the run's results (rank 0 writes files)."""
    args, prop, model, device, spec = state.args, state.prop, state.model, state.device, state.spec
    gated_acc = accuracy(model, spec, device)
    final = prop.finalize() if prop is not None else model
    final_acc = accuracy(final, spec, device)
    summary = {
        "recipe": state.recipe.name, "hyperparameters": state.hp, "dense_baseline": args.dense,
        "test_accuracy_gated": gated_acc, "test_accuracy_finalized": final_acc,
        "params_dense": state.dense_params, "params_finalized": sum(p.numel() for p in final.parameters()),
        "flops_dense": state.dense_flops, "flops_finalized": conv_flops(final, state.probe),
        "train_seconds": train_seconds, "kept": prop.kept() if prop else None, "args": vars(args),
        "device": str(device), "processes": state.world, "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        # Capacity widths (--static-shapes on torch): slots per layer and their waste (slots / kept).
        "capacities": prop.capacities() if prop else None, "capacity_waste": prop.capacity_waste() if prop else None,
    }
    if args.timing_steps > 0 and prop is not None and state.is_main:
        # Dense vs DCP vs the finalized network, side by side on one batch (final selection).
        xb, yb = next(spec.train_batches(0))
        xb, yb = xb.to(device), yb.to(device)
        prop.explore_epochs = 0  # keep selecting (not exploring) while timing
        prop.distributed = False  # only this rank times: no collective calls
        timed = compare_step_times({"dense": state.dense_model, "dcp": model, "finalized": copy.deepcopy(final)},
                                   xb, yb, args.timing_steps)
        summary.update(step_seconds_dense=timed["dense"], step_seconds_dcp=timed["dcp"],
                       step_seconds_finalized=timed["finalized"], timing_batch=len(yb))
    if not state.is_main:
        return summary
    _print_summary(state, summary)
    out = state.out
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(state.rows[0]))
        writer.writeheader()
        writer.writerows(state.rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    torch.save(final, out / "finalized_model.pt")
    torch.save(final.state_dict(), out / "finalized_state_dict.pt")
    written = ["metrics.csv", "summary.json", "checkpoint.pt", "finalized_model.pt", "finalized_state_dict.pt"]
    if not args.no_plots:
        from dcp_kernels.train.plots import save_plots

        paths = save_plots(state.rows, state.kept_history, prop.utilities() if prop else {}, out,
                           dense_rows=state.dense_rows)
        written += [p.name for p in paths]
    print(f"outputs: {os.fspath(out)}/ ({', '.join(written)})")
    return summary


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


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
