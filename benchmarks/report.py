"""Turn a ``pytest benchmarks/ --benchmark-json=FILE`` result into markdown tables and a PNG plot.

    python benchmarks/report.py bench.json [--plot docs/benchmarks.png] > table.md

Op level, per group (one shape and keep ratio): each variant's median and ``dense / variant``
(speedup over dense) and ``variant / ideal`` (cost over perfect skipping).
Step level, per network and prune ratio: the time ratios ``torch/dense``, ``ideal/dense``,
``torch/ideal`` and ``reference/dense``, the selection's share of the ``torch`` step, and peak memory
(plus ``triton/dense``, ``triton/ideal``, ``triton/torch`` when the Triton backend was measured).
The plot shows speedup over dense against keep ratio (op level, one panel per shape) and against
prune ratio (step level, one panel per network), one line per variant.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def _collect(data: dict):
    """{level: {group key: {variant: median seconds}}} and the same for peak bytes, where measured."""
    levels: dict = defaultdict(lambda: defaultdict(dict))
    peaks: dict = defaultdict(lambda: defaultdict(dict))
    for bench in data["benchmarks"]:
        extra = bench.get("extra_info", {})
        level = extra.get("level", "op")
        if level == "op":
            model = f"{extra.get('model', '?')} {extra.get('passes', 'fwd+bwd')} {extra.get('dtype', 'float32')}"
            key = (model, tuple(extra.get("shape", ())), extra.get("keep"))
        else:
            key = (extra.get("model", "?"), extra.get("prune_ratio"))
        if level == "step-interleaved":
            levels[level][key] = dict(extra["interleaved"])
            continue
        variant = extra.get("variant", bench["name"])
        levels[level][key][variant] = bench["stats"]["median"]
        if "peak_bytes" in extra:
            peaks[level][key][variant] = extra["peak_bytes"]
    return levels, peaks


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def op_table(groups: dict) -> str:
    lines = ["| network, passes, dtype | N, C, H, k | keep | variant | median ms | dense / variant | variant / ideal |",
             "|---|---|---:|---|---:|---:|---:|"]
    for (model, shape, keep), times in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
        for variant, t in times.items():
            lines.append(f"| {model} | {', '.join(map(str, shape))} | {keep} | {variant} | {t * 1e3:.1f} | "
                         f"{_ratio(times.get('dense'), t)} | {_ratio(t, times.get('ideal'))} |")
    return "\n".join(lines)


def _ms(times: dict, variant: str) -> str:
    return f"{times[variant] * 1e3:.0f}" if variant in times else "-"


def step_table(groups: dict, selections: dict, peaks: dict) -> str:
    """Times are medians; the ratios are time ratios (lower is faster)."""
    lines = ["| network | prune | dense ms | reference ms | torch ms | ideal ms | torch/dense | ideal/dense "
             "| torch/ideal | reference/dense | selection / torch step | peak MB dense / torch / ideal |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (model, ratio), t in sorted(groups.items()):
        sel = selections.get((model, ratio), {}).get("selection")
        share = f"{100 * sel / t['torch']:.2f}%" if sel and t.get("torch") else "-"
        mem = peaks.get((model, ratio), {})
        mb = " / ".join(f"{mem[v] / 2**20:.1f}" if v in mem else "-" for v in ("dense", "torch", "ideal"))
        lines.append(
            f"| {model} | {ratio} | {_ms(t, 'dense')} | {_ms(t, 'reference')} | {_ms(t, 'torch')} | {_ms(t, 'ideal')} | "
            f"{_ratio(t.get('torch'), t.get('dense'))} | {_ratio(t.get('ideal'), t.get('dense'))} | "
            f"{_ratio(t.get('torch'), t.get('ideal'))} | {_ratio(t.get('reference'), t.get('dense'))} | {share} | {mb} |"
        )
    # Every other measured variant (triton, extension, ...): none is left out of the tables.
    others = sorted({v for t in groups.values() for v in t} - {"dense", "reference", "torch", "ideal"})
    if others:
        lines += ["", "| network | prune | variant | ms | variant/dense | variant/ideal | variant/torch |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for (model, ratio), t in sorted(groups.items()):
            for v in others:
                if v in t:
                    lines.append(f"| {model} | {ratio} | {v} | {_ms(t, v)} | {_ratio(t.get(v), t.get('dense'))} | "
                                 f"{_ratio(t.get(v), t.get('ideal'))} | {_ratio(t.get(v), t.get('torch'))} |")
    return "\n".join(lines)


def plot(levels: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    by_shape: dict = defaultdict(dict)
    for (model, shape, keep), times in levels.get("op", {}).items():
        by_shape[(model, shape)][keep] = times
    panels += [(f"op {m} N,C,H,k={','.join(map(str, s))}", "keep ratio (in = out)", v) for (m, s), v in by_shape.items()]
    by_net: dict = defaultdict(dict)
    for (model, ratio), times in (levels.get("step-interleaved") or levels.get("step", {})).items():
        by_net[model][ratio] = times
    panels += [(f"step {m}", "prune ratio", v) for m, v in by_net.items()]
    if not panels:
        return
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows + 0.6), squeeze=False)
    # One colour per variant in every panel, and one legend for the figure.
    every = sorted({v for _, _, series in panels for t in series.values() for v in t if v != "dense"})
    palette = plt.get_cmap("tab10").colors  # 10 distinct colours; the variants number at most 9
    colour = {v: palette[i % len(palette)] for i, v in enumerate(every)}
    for ax, (title, xlabel, series) in zip(axes.flat, panels):
        xs = sorted(series)
        variants = sorted({v for t in series.values() for v in t if v != "dense"})
        for variant in variants:
            ys = [series[x]["dense"] / series[x][variant] if variant in series[x] else float("nan") for x in xs]
            ax.plot(xs, ys, marker="o", label=variant, color=colour[variant])
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("speedup over dense", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colour[v], marker="o", label=v) for v in every]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(every), 6), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (3.2 * rows + 0.6), 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    parser.add_argument("--plot", help="write a PNG plot of speedups to this path")
    args = parser.parse_args()
    with open(args.json_file) as f:
        data = json.load(f)
    levels, peaks = _collect(data)
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    print(f"Machine: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} logical cores; "
          f"Python {machine.get('python_version', '?')}; run {data.get('datetime', '?')}\n")
    if levels.get("op"):
        print("### Op level\n")
        print(op_table(levels["op"]) + "\n")
    selections = levels.get("selection", {})
    if levels.get("step-interleaved"):
        print("### Step level, variants interleaved (one step of each in turn; medians)\n")
        print(step_table(levels["step-interleaved"], selections, peaks.get("step", {})) + "\n")
    if levels.get("step"):
        print("### Step level, each variant timed on its own\n")
        print(step_table(levels["step"], selections, peaks.get("step", {})) + "\n")
    if args.plot:
        plot(levels, args.plot)
        print(f"Plot: {args.plot}")


if __name__ == "__main__":
    main()
