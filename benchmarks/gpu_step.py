"""The two GPU questions that decide the project's next step, at the size users train (ResNet-50,
224 px, bf16 autocast, channels_last, batch 128), each variant timed in turn (interleaved medians):

``ceiling``: can pruning win at all? Dense against the ideal (the finalized network of the kept
    widths), eager and captured in a CUDA graph, for ``prune_residual`` False/True and two
    ``round_to`` width multiples. Needs no extension.
``capacity``: the capacity-width DCP step (``backend="torch", static_shapes=True``) captured
    (:class:`dcp_kernels.cuda_graphs.GraphedStep`) against dense and two ideals captured (the
    finalized network of its exact kept widths, and of a ``round_to=8`` selection: odd widths make a
    slow cuDNN baseline), then all of them eager; the JSON is written after each pass. A kernel-time
    profile of one captured replay.

Writes one JSON (card, versions, date, shapes, kept widths, FLOPs ratio, capacity waste, medians in
ms). On a CPU it runs the same code at a tiny size without the captured variants (a smoke test,
tests/test_bench_tools.py), so the script does not rot between GPU leases.

    python benchmarks/gpu_step.py ceiling --json out.json            # on a GPU
    python benchmarks/gpu_step.py capacity --json out.json --profile out-profile.txt
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import dcp_kernels
from dcp_kernels.cuda_graphs import GraphedStep

torch.backends.cudnn.benchmark = True


def _plain_step(model, opt, amp_dtype):
    """Forward, loss, backward and SGD step on a batch (no zero_grad: the callers reset gradients)."""
    def step(x, y):
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None, cache_enabled=False):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        return (loss,)
    return step


def _graphed_plain(model, x, y, amp_dtype):
    """A dense network's step captured once (the PyTorch whole-network recipe: three warm-up steps on
    a side stream, then the capture); returns a callable that replays it."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    body = _plain_step(model, opt, amp_dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            body(x, y)
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        body(x, y)

    def replay():
        graph.replay()

    # A graph holds no reference to the tensors it reads and writes: keep the model, its optimizer
    # (momentum buffers) and the inputs alive as long as the replay is, or their memory gets reused.
    replay.keep_alive = (model, opt, x, y)
    return replay


def _eager_plain(model, x, y, amp_dtype):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    body = _plain_step(model, opt, amp_dtype)

    def step():
        opt.zero_grad(set_to_none=True)
        body(x, y)
    return step


def _model(name: str, num_classes: int = 1000) -> torch.nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(num_classes=num_classes)


def _batch(n: int, size: int, device: torch.device, seed: int, channels_last: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 1000, (n,), generator=g).to(device)


def _dcp(args, device, amp_dtype, *, prune_residual: bool, round_to: int, static: bool):
    """A converted model after two exploring steps and three selecting ones (on fresh batches)."""
    torch.manual_seed(0)
    model = _model(args.model).to(device).to(memory_format=torch.channels_last)
    prop = dcp_kernels.convert(model, args.ratio, explore_epochs=1, backend="torch", round_to=round_to,
                               prune_residual=prune_residual, static_shapes=static,
                               example_inputs=(torch.randn(2, 3, args.size, args.size, device=device),))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    step = _plain_step(model.train(), opt, amp_dtype)
    # Exact widths change from step to step: cuDNN's search would run for each (and fill its cache).
    torch.backends.cudnn.benchmark = static
    for seed in range(5):
        if seed == 2:
            prop.epoch_end()
        opt.zero_grad(set_to_none=True)
        step(*_batch(args.batch, args.size, device, seed, True))
    torch.backends.cudnn.benchmark = True
    return model, prop


def _widths(prop) -> dict:
    info = {"kept": prop.kept(), "flops_ratio": prop.flops_ratio(), "kept_fraction":
            sum(prop.kept().values()) / sum(layer.out_channels for layer in prop.layers)}
    if prop.capacity:
        info.update(capacities=prop.capacities(), capacity_waste=prop.capacity_waste())
    return info


def _interleaved(steps: dict, rounds: int, device: torch.device) -> dict[str, float]:
    """Median ms per variant over ``rounds`` rounds of one step each (after one warm-up round)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    samples: dict[str, list[float]] = {v: [] for v in steps}
    for r in range(rounds + 1):
        for variant, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            if r:
                samples[variant].append((time.perf_counter() - start) * 1e3)
    return {v: statistics.median(t) for v, t in samples.items()}


def _plain_steps(name: str, model, x, y, amp_dtype, captured: bool) -> dict:
    """``name``-eager and, on a GPU, ``name``-captured steps of a plain network."""
    model = model.train()
    steps = {f"{name}-eager": _eager_plain(model, x, y, amp_dtype)}
    if captured:
        steps[f"{name}-captured"] = _graphed_plain(copy.deepcopy(model), x, y, amp_dtype)
    return steps


def _dense_steps(args, device, amp_dtype, x, y, captured: bool) -> dict:
    torch.manual_seed(0)
    dense = _model(args.model).to(device).to(memory_format=torch.channels_last)
    return _plain_steps("dense", dense, x, y, amp_dtype, captured)


def ceiling(args, device, amp_dtype, captured: bool, save) -> list[dict]:
    x, y = _batch(args.batch, args.size, device, 99, True)
    dense_steps = _dense_steps(args, device, amp_dtype, x, y, captured)  # built once, timed in every round
    results = []
    for prune_residual in (True, False):  # the decisive rows first: a run cut short keeps them
        for round_to in args.round_to:
            _, prop = _dcp(args, device, amp_dtype, prune_residual=prune_residual, round_to=round_to, static=False)
            ideal = copy.deepcopy(prop.finalize())
            steps = {**dense_steps, **_plain_steps("ideal", ideal, x, y, amp_dtype, captured)}
            ms = _interleaved(steps, args.rounds, device)
            row = {"prune_residual": prune_residual, "round_to": round_to, "ms": ms, **_widths(prop),
                   "params_ideal": sum(p.numel() for p in ideal.parameters())}
            results.append(row)
            save(results)
            ratios = {k.split("-")[1]: ms[f"ideal-{k.split('-')[1]}"] / ms[k] for k in ms if k.startswith("dense")}
            print(f"ceiling prune_residual={prune_residual} round_to={round_to}: FLOPs {row['flops_ratio']:.2f}, "
                  + ", ".join(f"{k} dense {ms['dense-' + k]:.1f} ms ideal {ms['ideal-' + k]:.1f} ms "
                              f"({r:.2f}x)" for k, r in ratios.items()), flush=True)
            del steps, ideal, prop
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def capacity(args, device, amp_dtype, captured: bool, save) -> list[dict]:
    x, y = _batch(args.batch, args.size, device, 99, True)
    model, prop = _dcp(args, device, amp_dtype, prune_residual=True, round_to=1, static=True)
    row = {"prune_residual": True, "round_to": 1, "capacity_multiple": prop.capacity_multiple, "ms": {},
           **_widths(prop), "capacity_changes": prop.capacity_changes}
    save([row])
    ideal = copy.deepcopy(prop.finalize())
    _, prop8 = _dcp(args, device, amp_dtype, prune_residual=True, round_to=8, static=False)
    ideal8 = copy.deepcopy(prop8.finalize())
    row["flops_ratio_round8"] = prop8.flops_ratio()
    del prop8
    plain = {"dense": _dense_steps(args, device, amp_dtype, x, y, captured),
             "ideal": _plain_steps("ideal", ideal, x, y, amp_dtype, captured),
             "ideal-round8": _plain_steps("ideal-round8", ideal8, x, y, amp_dtype, captured)}
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    body = _plain_step(model, opt, amp_dtype)

    def eager():
        opt.zero_grad(set_to_none=True)
        body(x, y)

    passes = {"eager": {f"{n}-eager": steps[f"{n}-eager"] for n, steps in plain.items()}}
    passes["eager"]["dcp-capacity-eager"] = eager
    graphed = None
    if captured:
        graph_model, graph_prop = _dcp(args, device, amp_dtype, prune_residual=True, round_to=1, static=True)
        graph_opt = torch.optim.SGD(graph_model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        graphed = GraphedStep(_plain_step(graph_model, graph_opt, amp_dtype), graph_model, graph_prop, graph_opt,
                              warmup=2)
        for _ in range(4):
            graphed(x, y)
        # The decisive pass first: captured against captured.
        passes = {"captured": {**{f"{n}-captured": steps[f"{n}-captured"] for n, steps in plain.items()},
                               "dcp-capacity-captured": lambda: graphed(x, y)}, **passes}
    for name, steps in passes.items():
        row["ms"].update(_interleaved(steps, args.rounds, device))
        if graphed is not None:
            row.update(captures=graphed.captures, replays=graphed.replays)
        save([row])
        print(f"capacity ({name}): " + ", ".join(f"{k} {row['ms'][k]:.1f} ms" for k in steps)
              + f"; waste {prop.capacity_waste():.3f}, FLOPs {row['flops_ratio']:.2f}", flush=True)
    if args.profile and graphed is not None:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            graphed(x, y)
            torch.cuda.synchronize()
        with open(args.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    return [row]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["ceiling", "capacity"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=None, help="default 128 on a GPU, 2 on a CPU")
    p.add_argument("--size", type=int, default=None, help="default 224 on a GPU, 32 on a CPU")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--round-to", type=int, nargs="+", default=[8, 32])
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15 on a GPU, 1 on a CPU)")
    p.add_argument("--json", default=None)
    p.add_argument("--profile", default=None, help="capacity: kernel-time table of one captured replay")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (128 if gpu else 2)
    args.size = args.size or (224 if gpu else 32)
    args.rounds = args.rounds or (15 if gpu else 1)
    amp_dtype = torch.bfloat16 if gpu else None  # the CPU smoke run: fp32
    record = {
        "stage": args.stage, "date": datetime.date.today().isoformat(), "device": str(device),
        "card": torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "model": args.model, "batch": args.batch, "size": args.size, "prune_ratio": args.ratio,
        "precision": "bf16-autocast-channels_last" if gpu else "fp32-channels_last", "results": [],
    }

    def save(results: list[dict]) -> None:
        """Written after every configuration: a run cut short keeps what it measured."""
        record["results"] = results
        if args.json:
            with open(args.json, "w") as f:
                json.dump(record, f, indent=1)

    run = ceiling if args.stage == "ceiling" else capacity
    run(args, device, amp_dtype, captured=gpu, save=save)


if __name__ == "__main__":
    main()
