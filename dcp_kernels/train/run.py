"""One ``dcp-train`` run: building it (device, processes, data, model, controller, optimizer),
resuming it from a checkpoint, its epochs (the training loop, divergence checks, checkpoints) and
its results (finalize, measure, save). The command line and the console are ``cli.py``'s."""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import functools
import inspect
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import dcp_kernels
from dcp_kernels.cuda_graphs import GraphedStep
from dcp_kernels.propagation import DecaySchedule
from dcp_kernels.train import checkpoints, launch
from dcp_kernels.train.checkpoints import load_checkpoint as _load_checkpoint
from dcp_kernels.train.checkpoints import save_atomically as _save_atomically
from dcp_kernels.train.data import DataSpec
from dcp_kernels.train.divergence import FP16_PATIENCE, LossWatch, Verdict
from dcp_kernels.train.errors import Diverged, UsageError
from dcp_kernels.train.recipes import Recipe
from dcp_kernels.train.zoo import accuracy, build_model, compare_step_times, conv_flops, load_data

DISPLAY_EVERY = 20  # progress-bar refresh and loss check (steps): each reads the device once


@dataclass
class TrainingRun:
    """Everything one ``dcp-train`` run holds, built by :func:`build` and advanced by
    :func:`resume_if_asked`, :func:`start`, :func:`train_epoch` (one epoch at a time) and
    :func:`finish`. ``summary`` is filled at the end."""

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


def build(args: argparse.Namespace, recipe: Recipe, hp: dict, extension_status: str) -> TrainingRun:
    """Check the inputs, load the data, build and convert the model, make the optimizer (``recipe`` and
    ``hp``: the parsed arguments' recipe and effective hyperparameters, ``cli.resolve``;
    ``extension_status``: ``ops.extension.status()``, which the console prints)."""
    if args.data and not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: no such directory")
    if args.resume and args.resume != "auto" and not Path(args.resume).is_file():
        raise UsageError(f"--resume {args.resume}: no such file (or 'auto': --out's checkpoint when there is one)")
    dense_rows = _read_dense_run(args.dense_run) if args.dense_run else None
    device = launch.device_from_flag(args.device)
    rank, world = launch.init_processes(device.type)
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


def _graph_step(state: TrainingRun, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The step GraphedStep captures (no zero_grad: it resets the gradients itself)."""
    with state.autocast():
        logits = state.train_model(xb)
        loss = F.cross_entropy(logits.float(), yb)
    loss.backward()
    state.opt.step()
    return loss, logits


def resume_if_asked(state: TrainingRun) -> None:
    """``--resume PATH`` or ``--resume auto``: continue from the checkpoint (nothing on a first start)."""
    source = _resume_source(state)
    if source is not None:
        _resume(state, source)


def start(state: TrainingRun) -> None:
    """Create the output directory (rank 0; only once the inputs are known good) and clear a
    divergence marker: a run that starts is a new attempt."""
    if state.is_main:
        state.out.mkdir(parents=True, exist_ok=True)
        (state.out / checkpoints.DIVERGED).unlink(missing_ok=True)


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
    launch.set_rng_state(ckpt["rng"])
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
                      "dcp": state.prop.state_dict() if state.prop else None, "rng": launch.rng_state(),
                      "epoch": epoch_done, "within_epoch": within_epoch, "rows": state.rows,
                      "kept_history": state.kept_history, "dense": state.args.dense, "recipe": state.recipe.name,
                      "hyperparameters": state.hp, "processes": state.world},
                     state.out / checkpoints.CHECKPOINT)


def train_epoch(state: TrainingRun, epoch: int) -> None:
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
    steps, batches = launch.epoch_batches(state.spec, epoch, hp["batch_size"], state.rank, state.world, skip=step)
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


def finish(state: TrainingRun, train_seconds: float) -> tuple[dict, nn.Module]:
    """Finalize and measure: (the run's summary, the finalized model)."""
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
    return summary, final


def save_outputs(state: TrainingRun, summary: dict, final: nn.Module) -> list[str]:
    """Write the run's files into ``--out`` (rank 0): metrics, summary, the finalized model, plots;
    returns their names."""
    args, prop, out = state.args, state.prop, state.out
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
    return written
