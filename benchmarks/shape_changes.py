"""Conv shape changes over one selecting epoch, counted on the CPU, and an **estimate** of what they
would cost a GPU step (stated assumptions, not measurements).

Exact widths give every step the convolution shapes of its own selection; capacity widths
(``static_shapes=True``) keep them while every layer's kept count fits its capacity. A GPU pays for
each new shape on the host: cuDNN builds an execution plan per new convolution shape and direction
(forward, data gradient, weight gradient), searches every algorithm under ``cudnn.benchmark``, and a
CUDA-graph step is captured again. This script trains a real selecting epoch (DCP ``torch`` backend,
prune 0.5, residual groups pruned, one exploring epoch first) and records every forward convolution's
(input, weight) shape each step, then counts, per variant:

* ``new_shapes``: convolution shapes seen for the first time during the epoch (after the first
  selecting step's): each costs three plan builds, or three searches under ``cudnn.benchmark``;
* ``changed_steps``: steps whose set of shapes differs from the step before (a CUDA graph of the step
  would be captured again; capacity widths: ``capacity_changes``);
* ``padding``: the capacity slots' share of the kept channels (``capacity_waste() - 1``, epoch mean).

Costs per event (:data:`COSTS`, assumptions with their sources) turn the counts into milliseconds per
step, averaged over the epoch, to set beside the roofline's step estimate (benchmarks/roofline.py).

Data: the embedded digits (the only data here without a download), upsampled to the network's
pixels, the grey channel repeated; one epoch is ``--steps`` batches cycling over it. The selection's
churn comes from the utilities, which depend on the data: digits stand in for CIFAR-10/ImageNet.

    python benchmarks/shape_changes.py --network resnet56 --steps 390 --batch 128 --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import dcp_kernels
from dcp_kernels import rule
from dcp_kernels.models import resnet_cifar, vgg
from dcp_kernels.train.data import load_digits

# How each variant converts (torch backend): (static_shapes, round_to, capacity_multiple, headroom).
# headroom: the capacity growth rule's spare share of the kept count (rule.capacity_for: 1/16); None
# keeps the library's rule, 0 fits each capacity to the epoch's largest count so far exactly.
VARIANTS: dict[str, tuple[bool, int, int, float | None]] = {
    "exact-round1": (False, 1, 8, None),
    "exact-round8": (False, 8, 8, None),
    "capacity-round8": (True, 8, 8, None),
    "capacity-round8-no-headroom": (True, 8, 8, 0.0),
    "capacity-round8-multiple16": (True, 8, 16, None),
}

# Host time per event on a GPU, in seconds: assumptions, not measurements (no GPU has timed them).
COSTS: dict[str, float] = {
    # A cuDNN execution plan from heuristics for a new shape (cudnn.benchmark off), per direction:
    # pytorch/pytorch#187212 measured 1.27 ms of CPU time per cold convolution on the v8 API.
    "plan_s": 1.3e-3,
    # An algorithm search for a new shape (cudnn.benchmark on), per direction: every candidate runs;
    # tens of milliseconds for a large conv (PaddlePaddle/PaddleX#5057 measured 0.3-1.3 s per new
    # input shape of a 6-conv model under ONNX Runtime's exhaustive search). 20 ms assumed.
    "search_s": 20e-3,
    # Capturing one training step in a CUDA graph again: one eager warm-up step and the capture
    # (about two steps' host time); 100 ms assumed for ResNet-50, 30 ms for the CIFAR networks.
    "capture_s": {"resnet50": 100e-3, "resnet56": 30e-3, "vgg16": 30e-3, "tiny-vgg": 30e-3},
}

NETWORKS = {
    "resnet56": (lambda: resnet_cifar(56), 32),
    "vgg16": (lambda: vgg("vgg16"), 32),
    "resnet50": (None, 64),  # torchvision, imported on use
    "tiny-vgg": (lambda: vgg([16, "M", 32, 32, "M", 64]), 16),  # for the tests
}


class _ConvShapes(TorchDispatchMode):
    """Collects every forward convolution's (input shape, weight shape, stride, padding, groups)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            x, w = args[0], args[1]
            self.shapes.append((tuple(x.shape), tuple(w.shape), tuple(args[3]), tuple(args[4]), args[8]))
        return func(*args, **(kwargs or {}))


def _model(network: str) -> torch.nn.Module:
    factory, _ = NETWORKS[network]
    if factory is None:
        import torchvision

        return torchvision.models.resnet50(num_classes=10)
    return factory()


def _batches(batch: int, pixels: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled digits batches at ``pixels`` px, 3 channels."""
    x, y, _, _ = load_digits(pixels, seed=seed)
    x = x.expand(-1, 3, -1, -1).contiguous()
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            yield x[idx], y[idx]


def count_epoch(network: str, variant: str, steps: int, batch: int, explore_steps: int = 20,
                prune_ratio: float = 0.5, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train one exploring epoch of ``explore_steps`` and one selecting epoch of ``steps``; count
    the selecting epoch's conv shape changes (see the module docstring)."""
    static, round_to, multiple, headroom = VARIANTS[variant]
    with _capacity_rule(headroom):
        return _count_epoch(network, static, round_to, multiple, steps, batch, explore_steps, prune_ratio, seed,
                            progress, variant)


@contextlib.contextmanager
def _capacity_rule(headroom: float | None) -> Iterator[None]:
    """The controller's capacity growth rule with another ``headroom`` (None: as it is)."""
    if headroom is None:
        yield
        return
    library_rule = rule.capacity_for

    def capacity_for(count: int, size: int, multiple: int) -> int:
        return min(size, -(-(count + int(count * headroom)) // multiple) * multiple)

    rule.capacity_for = capacity_for
    try:
        yield
    finally:
        rule.capacity_for = library_rule


def _count_epoch(network: str, static: bool, round_to: int, multiple: int, steps: int, batch: int,
                 explore_steps: int, prune_ratio: float, seed: int, progress: bool, variant: str) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = _model(network)
    prop = dcp_kernels.convert(model, prune_ratio, explore_epochs=1, backend="torch", prune_residual=True,
                               round_to=round_to, static_shapes=static, capacity_multiple=multiple)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    data = _batches(batch, NETWORKS[network][1], seed)
    model.train()

    def step() -> None:
        x, y = next(data)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(explore_steps):
        step()
    prop.epoch_end()
    seen: set[tuple] = set()
    previous: tuple | None = None
    new_shapes = changed_steps = 0
    waste: list[float] = []
    started = time.perf_counter()
    for i in range(steps):
        with _ConvShapes() as mode:
            step()
        shapes = tuple(mode.shapes)
        fresh = set(shapes) - seen
        if previous is not None:  # the first selecting step's shapes are the epoch's starting point
            new_shapes += len(fresh)
            changed_steps += shapes != previous
        seen |= fresh
        previous = shapes
        if static and prop.capacity_waste() is not None:
            waste.append(prop.capacity_waste())
        if progress and (i + 1) % 10 == 0:
            rate = (i + 1) / (time.perf_counter() - started)
            print(f"\r{network} {variant}: step {i + 1}/{steps} ({rate:.1f} steps/s)", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    kept = sum(prop.kept().values())
    return {"new_shapes": new_shapes, "changed_steps": changed_steps, "distinct_shapes": len(seen),
            "convs_per_step": len(previous or ()), "capacity_changes": prop.capacity_changes if static else None,
            "padding": (sum(waste) / len(waste) - 1.0) if waste else 0.0, "kept_channels_end": kept}


def host_cost_per_step(counts: dict[str, Any], network: str, steps: int, static: bool) -> dict[str, float]:
    """Milliseconds per step, averaged over the epoch, of the counted events under :data:`COSTS`:
    plan builds (cudnn.benchmark off), searches (on), and re-captures of a CUDA-graph step."""
    plans = 3 * counts["new_shapes"]
    captures = counts["capacity_changes"] if static else counts["changed_steps"]
    return {"plans_ms": 1e3 * plans * COSTS["plan_s"] / steps,
            "searches_ms": 1e3 * plans * COSTS["search_s"] / steps,
            "captures_ms": 1e3 * captures * COSTS["capture_s"][network] / steps}


def run(network: str, variants: Sequence[str], steps: int, batch: int, explore_steps: int, seed: int
        ) -> dict[str, Any]:
    report: dict[str, Any] = {
        "what": "conv shape changes over one selecting epoch (counted on the CPU) and their host cost on a "
                "GPU under assumed per-event costs: an ESTIMATE, not a measurement",
        "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "network": network, "pixels": NETWORKS[network][1], "batch": batch,
        "steps": steps, "explore_steps": explore_steps, "seed": seed, "prune_ratio": 0.5,
        "data": "embedded digits, upsampled, 3 channels", "costs": COSTS, "variants": {},
    }
    for variant in variants:
        counts = count_epoch(network, variant, steps, batch, explore_steps, seed=seed)
        counts.update(host_cost_per_step(counts, network, steps, VARIANTS[variant][0]))
        report["variants"][variant] = counts
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"Shape changes over one selecting epoch: {report['network']} {report['pixels']} px batch "
             f"{report['batch']}, {report['steps']} steps ({report['data']}); host cost per step is an "
             "ESTIMATE from assumed per-event costs", "",
             "| variant | new conv shapes | steps with new shapes | capacity changes | padding | "
             "plans ms/step | searches ms/step | re-captures ms/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, v in report["variants"].items():
        caps = "" if v["capacity_changes"] is None else v["capacity_changes"]
        lines.append(f"| {name} | {v['new_shapes']} | {v['changed_steps']} | {caps} | {100 * v['padding']:.1f}% | "
                     f"{v['plans_ms']:.2f} | {v['searches_ms']:.2f} | {v['captures_ms']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", choices=sorted(NETWORKS), default="resnet56")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=390, help="steps of the selecting epoch (CIFAR-10 at 128: 390)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--explore-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.explore_steps < 0:
        p.error("--steps and --batch must be >= 1, --explore-steps >= 0")
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    report = run(args.network, variants, args.steps, args.batch, args.explore_steps, args.seed)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
