"""Turn a ``--benchmark-json`` file into a markdown table of speedups, one row per benchmark group.

    python benchmarks/report.py bench.json

For every group (one shape and keep ratio) it prints each variant's median time and the ratios
``dense / variant`` (speedup over dense) and ``variant / ideal`` (overhead over perfect skipping).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def table(data: dict) -> str:
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        variant = bench.get("extra_info", {}).get("variant") or bench["name"].rsplit("-", 1)[-1].rstrip("]")
        groups[bench["group"]][variant] = bench["stats"]["median"]
    lines = [
        "| group | variant | median ms | dense / variant | variant / ideal |",
        "|---|---|---:|---:|---:|",
    ]
    for group, times in groups.items():
        dense, ideal = times.get("dense"), times.get("ideal")
        for variant, t in times.items():
            speedup = f"{dense / t:.2f}x" if dense else "-"
            overhead = f"{t / ideal:.2f}x" if ideal else "-"
            lines.append(f"| {group} | {variant} | {t * 1e3:.1f} | {speedup} | {overhead} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    args = parser.parse_args()
    with open(args.json_file) as f:
        data = json.load(f)
    info = data.get("machine_info", {})
    print(f"Machine: {info.get('cpu', {}).get('brand_raw', '?')}, {info.get('cpu', {}).get('count', '?')} cores; "
          f"python {info.get('python_version', '?')}\n")
    print(table(data))


if __name__ == "__main__":
    main()
