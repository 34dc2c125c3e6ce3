"""The benchmark tooling itself: the report's arithmetic and the CPU peak-memory probe."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peak_memory  # noqa: E402
import report  # noqa: E402
from peak_memory import peak_bytes  # noqa: E402


def _bench(level, variant, median, **extra):
    return {"name": f"t[{variant}]", "group": "g", "stats": {"median": median},
            "extra_info": {"level": level, "variant": variant, **extra}}


def test_report_ratios(tmp_path, capsys):
    data = {"benchmarks": [
        _bench("op", "dense", 0.4, model="m", shape=[1, 2, 3, 3], keep=0.5),
        _bench("op", "torch", 0.125, model="m", shape=[1, 2, 3, 3], keep=0.5),
        _bench("op", "ideal", 0.1, model="m", shape=[1, 2, 3, 3], keep=0.5),
        _bench("step", "dense", 2.0, model="net", prune_ratio=0.5, peak_bytes=4 * 2**20),
        _bench("step", "torch", 1.0, model="net", prune_ratio=0.5, peak_bytes=2 * 2**20),
        _bench("step", "ideal", 0.8, model="net", prune_ratio=0.5),
        _bench("step", "extension", 0.5, model="net", prune_ratio=0.5),
        _bench("selection", "selection", 0.01, model="net", prune_ratio=0.5),
    ]}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    sys.argv = ["report.py", str(path), "--plot", str(tmp_path / "p.png")]
    report.main()
    out = capsys.readouterr().out
    assert "| m fwd+bwd float32 | 1, 2, 3, 3 | 0.5 | torch | 125.0 | 3.20x | 1.25x |" in out
    assert "| net | 0.5 | 2000 | - | 1000 | 800 | 0.50x | 0.40x | 1.25x | - | 1.00% | 4.0 / 2.0 / - |" in out
    assert "| net | 0.5 | extension | 500 | 0.25x | 0.62x | 0.50x |" in out  # every measured variant is listed
    assert (tmp_path / "p.png").stat().st_size > 0


def _allocate_two(n):
    a = torch.ones(n)
    b = a * 2  # both alive at once
    return float(b[0])


def test_peak_bytes_sees_a_known_allocation():
    n = 4 * 2**20  # 16 MiB of float32
    assert peak_bytes(lambda: _allocate_two(n), torch.device("cpu")) >= 2 * 4 * n
    assert peak_bytes(lambda: None, torch.device("cpu")) == 0
    # Off glibc, the profiler's replay: the same check.
    assert peak_memory._profiler_peak_bytes(lambda: _allocate_two(n)) >= 2 * 4 * n


def test_peak_bytes_on_glibc_is_the_heap_and_repeats():
    if peak_memory._glibc_heap_in_use() is None:
        pytest.skip("no glibc >= 2.33 here: peak_bytes replays the profiler's events instead")
    n = 4 * 2**20
    # Two 16 MiB tensors, then one more after the first is freed: the peak is two, plus the small
    # allocations anything in the process makes meanwhile (measured: 0-50 KB over 32 MiB).
    def step():
        a = torch.ones(n)
        b = a * 2
        del a
        c = b + 1
        return float(c[0])

    peaks = [peak_bytes(step, torch.device("cpu")) for _ in range(3)]
    assert all(2 * 4 * n <= p < 2 * 4 * n + 2**20 for p in peaks), peaks


@pytest.mark.parametrize("stage", ["ceiling", "capacity"])
def test_gpu_step_script_runs_on_the_cpu(tmp_path, stage):
    """benchmarks/gpu_step.py (stages a and b of gpu_check.sh) at a tiny size on the CPU, without its
    captured variants: the script a GPU lease runs does not rot between leases."""
    import gpu_step

    out = tmp_path / "r.json"
    gpu_step.main([stage, "--device", "cpu", "--model", "resnet18", "--round-to", "8", "--json", str(out)])
    record = json.loads(out.read_text())
    assert record["stage"] == stage and record["model"] == "resnet18" and record["results"]
    for row in record["results"]:
        assert {"dense-eager", "ideal-eager"} <= set(row["ms"]) and 0 < row["flops_ratio"] < 1
        if stage == "capacity":
            assert {"dcp-capacity-eager", "ideal-round8-eager"} <= set(row["ms"]) and row["capacity_waste"] >= 1.0
    if stage == "ceiling":  # residual groups pruned: the ideal is smaller
        by_residual = {row["prune_residual"]: row["flops_ratio"] for row in record["results"]}
        assert by_residual[True] < by_residual[False]
