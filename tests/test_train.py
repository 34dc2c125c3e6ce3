"""The dcp-train command line on the embedded digits data (shortened schedule)."""
import json

import pytest
import torch

from dcp_kernels.train import cli
from dcp_kernels.train.data import load_digits


def test_digits_loader_is_embedded_and_deterministic():
    x_train, y_train, x_test, y_test = load_digits(image_size=16, seed=0)
    assert x_train.shape[1:] == (1, 16, 16) and len(x_train) + len(x_test) == 1797
    assert set(y_train.tolist()) == set(range(10))
    again = load_digits(image_size=16, seed=0)
    assert torch.equal(again[0], x_train) and torch.equal(again[3], y_test)


def test_short_run_writes_outputs_and_reports(tmp_path, capsys):
    summary = cli.run(["--epochs", "3", "--explore-epochs", "1", "--image-size", "16", "--timing-steps", "2",
                        "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "kept channels per layer" in out and "training step" in out
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["params_finalized"] < saved["params_dense"]
    assert saved["flops_finalized"] < saved["flops_dense"]
    # The finalized model computes what the gated model computes.
    assert saved["test_accuracy_finalized"] == pytest.approx(saved["test_accuracy_gated"])
    assert saved["test_accuracy_finalized"] > 0.5  # far above chance (0.1) after three epochs
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 4
    model = torch.load(tmp_path / "finalized_model.pt", weights_only=False)
    assert not any(type(m).__module__.startswith("dcp_kernels.modules") for m in model.modules())
    assert summary["kept"] == saved["kept"]


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--prune-ratio", "1.0"], ["--epochs", "2", "--explore-epochs", "2"]])
def test_bad_arguments(argv, tmp_path):
    with pytest.raises(SystemExit):
        cli.run(argv + ["--out", str(tmp_path)])


def test_console_entry_point_exits_zero(tmp_path):
    assert cli.main(["--epochs", "1", "--explore-epochs", "0", "--image-size", "8", "--timing-steps", "1",
                     "--out", str(tmp_path), "--no-progress"]) == 0
