"""benchmarks/shape_changes.py: it sees every convolution of a step, and under capacity widths the
conv shapes change only at steps where a capacity changed (the static shapes CUDA graphs rely on)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import shape_changes  # noqa: E402


def test_every_convolution_of_a_step_is_recorded():
    model = shape_changes._model("tiny-vgg")
    with shape_changes._ConvShapes() as mode:
        model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert [s[1] for s in mode.shapes] == [(16, 3, 3, 3), (32, 16, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3)]


def test_capacity_widths_change_shapes_only_with_their_capacities():
    """Over 12 selecting steps of a small VGG: exact widths (round_to 1) move their shapes, capacity
    widths change shapes at most at the steps their capacities grew, and pad."""
    exact = shape_changes.count_epoch("tiny-vgg", "exact-round1", 12, 16, explore_steps=3, progress=False)
    capacity = shape_changes.count_epoch("tiny-vgg", "capacity-round8-no-headroom", 12, 16, explore_steps=3,
                                         progress=False)
    assert exact["convs_per_step"] == capacity["convs_per_step"] == 4
    assert exact["changed_steps"] > 0 and exact["capacity_changes"] is None
    assert capacity["changed_steps"] <= capacity["capacity_changes"]
    assert 0.0 < capacity["padding"] < 1.0
    costs = shape_changes.host_cost_per_step(exact, "tiny-vgg", 12, static=False)
    assert costs["plans_ms"] == 1e3 * 3 * exact["new_shapes"] * shape_changes.COSTS["plan_s"] / 12
