"""``dcp-train``'s checkpoint files: written atomically, read safely, found again after a restart.

A run directory holds one ``checkpoint.pt``, replaced at each epoch end (and every
``--checkpoint-every`` steps). ``--resume auto`` continues from it when it is there: what a worker
group restarted by ``torchrun --max-restarts`` needs, since it is started with the same command line.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UsageError

CHECKPOINT = "checkpoint.pt"
DIVERGED = "DIVERGED"  # written beside it when the run diverged: --resume auto then refuses to go on
REQUIRED = {"model", "optimizer", "scheduler", "scaler", "dcp", "rng", "epoch", "rows", "kept_history", "dense",
            "recipe"}
# Hyperparameters a continued run may change: a longer schedule, and (--resume PATH only) the learning
# rate, which dcp-train rescales; any other difference is another run.
MAY_CHANGE = {"epochs", "milestones"}
MAY_CHANGE_BY_NAME = MAY_CHANGE | {"lr"}


def save_atomically(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``: a run killed
    while writing (OOM, preemption, Ctrl-C, a torchrun restart) leaves the previous checkpoint whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(directory: Path) -> None:
    """Delete the half-written temporaries of processes killed while saving (SIGKILL skips cleanup)."""
    for tmp in directory.glob(f".{CHECKPOINT}.*.tmp"):
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, device: torch.device, flag: str = "--resume") -> dict:
    """A checkpoint written by dcp-train, loaded with ``weights_only=True``: tensors and plain
    containers only, so a file from elsewhere cannot run code when it is loaded. A truncated,
    corrupted or foreign file is one :class:`UsageError` line naming ``flag`` and the file."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch/pickle raise many types for truncated or foreign files
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"{flag} {path}: not a readable dcp-train checkpoint ({first[:200]})"
                         f"{_damaged_hint(flag, path)}") from error
    if not isinstance(ckpt, dict) or not REQUIRED <= set(ckpt):
        lacks = sorted(REQUIRED - set(ckpt)) if isinstance(ckpt, dict) else "a dict of run state"
        raise UsageError(f"{flag} {path}: not a dcp-train checkpoint (it lacks {lacks}){_damaged_hint(flag, path)}")
    return ckpt


def _damaged_hint(flag: str, path: str | Path) -> str:
    if flag != "--resume auto":
        return ""
    return (f"; this run needs a whole {CHECKPOINT} of its own in {Path(path).parent} to continue: put one back "
            "(e.g. from a copy), or delete this one to start the run from scratch")


def auto_checkpoint(directory: Path) -> Path | None:
    """``--resume auto``: the run directory's checkpoint, or None when it has none yet (a first start)."""
    path = directory / CHECKPOINT
    return path if path.is_file() else None


def check_same_run(ckpt: dict, *, recipe: str, dense: bool, hyperparameters: dict, processes: int, flag: str,
                   path: Path) -> None:
    """A checkpoint continues this run only if it is of the same kind, with the same hyperparameters
    (bar a longer schedule, and a new learning rate when the file is named), and a mid-epoch one only
    on as many processes (the data position is counted in steps per process)."""
    if ckpt["dense"] != dense or ckpt["recipe"] != recipe:
        raise UsageError(f"{flag} {path} is a checkpoint of another kind of run "
                         f"(recipe {ckpt['recipe']}, dense={ckpt['dense']})")
    saved = ckpt.get("hyperparameters")
    if isinstance(saved, dict):
        allowed = MAY_CHANGE if flag == "--resume auto" else MAY_CHANGE_BY_NAME
        differ = sorted(k for k in set(saved) & set(hyperparameters)
                        if k not in allowed and saved[k] != hyperparameters[k])
        if differ:
            shown = ", ".join(f"{k} {saved[k]} there, {hyperparameters[k]} here" for k in differ)
            named = " (a new --lr or --epochs is taken when you --resume the file by name)" if "lr" in differ else ""
            raise UsageError(f"{flag}: {path} belongs to a run with other settings ({shown}): give the flags it was "
                             f"started with{named}, or start a new run in another --out")
    saved_processes = ckpt.get("processes", 1)
    if ckpt.get("within_epoch") and saved_processes != processes:
        raise UsageError(f"{flag}: {path} was written mid-epoch by a run of {saved_processes} process(es); continue it "
                         f"on {saved_processes} (this run has {processes}), or from an epoch-end checkpoint")
