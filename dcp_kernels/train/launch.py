"""Where a ``dcp-train`` run executes: the device a flag names, the processes torchrun started, each
process's share of an epoch's batches, and the random state a checkpoint carries."""
from __future__ import annotations

import itertools
import math
import os
import random

import torch

from dcp_kernels.train.data import DataSpec
from dcp_kernels.train.errors import UsageError


def init_processes(device_type: str) -> tuple[int, int]:
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


def device_from_flag(name: str) -> torch.device:
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


def epoch_batches(spec: DataSpec, epoch: int, batch_size: int, rank: int, world: int, skip: int):
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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
