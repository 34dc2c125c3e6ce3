"""dcp-train under faults: a diverging loss, damaged checkpoints, ``--resume auto``, a rank killed under
``torchrun --max-restarts``. Each fault ends in one line (or resumes by itself) and leaves the checkpoint
on disk whole and good."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcp_kernels.train import checkpoints, cli
from dcp_kernels.train import run as training

FAST = ["--image-size", "8", "--timing-steps", "0", "--no-progress", "--no-plots"]
# digits at the default batch of 64: 23 steps per epoch (one process), 11 per rank under 2 ranks.


def _nan_loss_from(monkeypatch, call: int, until: int | None = None) -> None:
    """Make the training loss NaN on its ``call``-th computation (counted from 1) and after, up to
    ``until`` (inclusive; None: for good)."""
    real = training.F.cross_entropy
    calls = [0]

    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        if value.requires_grad:  # training steps only (accuracy runs under no_grad)
            calls[0] += 1
            if calls[0] >= call and (until is None or calls[0] <= until):
                return value * float("nan")
        return value

    monkeypatch.setattr(training.F, "cross_entropy", loss)


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    common = ["--epochs", "3", "--explore-epochs", "1", "--checkpoint-every", "5", "--out", str(tmp_path), *FAST]
    with monkeypatch.context() as m:
        _nan_loss_from(m, call=23 + 7)  # epoch 2, step 7
        assert cli.main(common + ["--resume", "auto"]) == 1
    ckpt_path = tmp_path / "checkpoint.pt"
    line = _one_line(capsys.readouterr().err)
    assert "training diverged: the loss is not finite (epoch 2, from step 7)" in line, line
    assert f"{ckpt_path} (epoch 2, step 5): continue with --resume {ckpt_path}" in line, line
    assert "a lower --lr (this run's: 0.05)" in line, line
    ckpt = checkpoints.load_checkpoint(ckpt_path, torch.device("cpu"))
    assert (ckpt["epoch"], ckpt["within_epoch"]["step"]) == (1, 5)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    # A restart with the same command (torchrun --max-restarts) does not diverge again from there.
    assert cli.main(common + ["--resume", "auto"]) == 2
    assert f"--resume auto: the run in {tmp_path} diverged" in _one_line(capsys.readouterr().err)
    # Continued by name with a lower rate: the optimizer's saved rates are scaled to it.
    done = cli.train(common + ["--resume", str(ckpt_path), "--lr", "0.01"])
    assert "learning rates scaled by 0.2" in capsys.readouterr().out
    assert done.sched.base_lrs == [pytest.approx(0.01)] and not (tmp_path / "DIVERGED").exists()


def test_fp16_overflow_steps_are_skipped_but_a_loss_that_stays_nan_stops_the_run(tmp_path, monkeypatch, capsys):
    common = ["--epochs", "2", "--explore-epochs", "1", "--amp", "fp16", *FAST]
    with monkeypatch.context() as m:
        _nan_loss_from(m, call=4, until=6)  # three steps skipped by the GradScaler: not divergence
        done = cli.train(common + ["--out", str(tmp_path / "skips")])
    assert done.prop.skipped_steps.scaler is done.scaler and done.scaler.is_enabled()  # DCP follows its skips
    capsys.readouterr()
    _nan_loss_from(monkeypatch, call=5)  # for good: 19 in a row by the end of epoch 1, so stopped in epoch 2
    assert cli.main(common + ["--out", str(tmp_path / "stuck")]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "not been finite for 39 steps in a row under the fp16 loss scaler (epoch 2, step 20)" in line, line
    assert "(end of epoch 1)" in line  # that checkpoint's weights: unchanged by the skipped steps, finite


def test_resume_auto_starts_then_continues_where_the_run_stopped(tmp_path, monkeypatch, capsys):
    common = ["--epochs", "3", "--explore-epochs", "1", "--checkpoint-every", "5", "--resume", "auto", *FAST]
    full = cli.run(common + ["--out", str(tmp_path / "full")])
    assert "no checkpoint in" in capsys.readouterr().out  # a first start: nothing to continue

    class Killed(Exception):
        pass

    real_save = training._save_atomically

    def save_then_die(state, path):
        real_save(state, path)
        if state["epoch"] == 1 and (state["within_epoch"] or {}).get("step") == 15:
            raise Killed

    run = tmp_path / "restarted"
    with monkeypatch.context() as m:
        m.setattr(training, "_save_atomically", save_then_die)
        with pytest.raises(Killed):
            cli.run(common + ["--out", str(run)])
    (run / ".checkpoint.pt.99999.tmp").write_bytes(b"half")  # what a SIGKILL during a save leaves
    resumed = cli.run(common + ["--out", str(run)])  # the same command line
    assert f"resumed from {run / 'checkpoint.pt'} (epoch 2, step 15)" in capsys.readouterr().out
    assert not list(run.glob("*.tmp"))
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (tmp_path / "full", run))
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert [r["loss"] for r in a["rows"]] == [r["loss"] for r in b["rows"]]
    assert full["kept"] == resumed["kept"]


def test_resume_auto_refuses_a_damaged_or_foreign_checkpoint_in_one_line(tmp_path, capsys):
    common = ["--epochs", "1", "--explore-epochs", "0", "--resume", "auto", "--out", str(tmp_path), *FAST]
    assert cli.main(common) == 0
    ckpt = tmp_path / "checkpoint.pt"
    whole = ckpt.read_bytes()
    capsys.readouterr()
    assert cli.main(common[:-len(FAST)] + ["--lr", "0.2", *FAST]) == 2  # another run's settings
    line = _one_line(capsys.readouterr().err)
    assert f"{ckpt} belongs to a run with other settings (lr 0.05 there, 0.2 here)" in line, line
    assert cli.main(common[:-len(FAST)] + ["--amp", "bf16", *FAST]) == 2
    assert "(amp off there, bf16 here)" in _one_line(capsys.readouterr().err)
    for damage in (whole[: len(whole) // 2], b"\0" * 64 + whole[64:], b"not a checkpoint"):
        ckpt.write_bytes(damage)
        assert cli.main(common) == 2
        line = _one_line(capsys.readouterr().err)
        assert f"--resume auto {ckpt}: not " in line and "this run needs a whole checkpoint.pt" in line, line
    torch.save({"model": {}}, ckpt)  # loadable, but not a dcp-train checkpoint
    assert cli.main(common) == 2
    assert "not a dcp-train checkpoint (it lacks" in _one_line(capsys.readouterr().err)


def test_resume_by_name_keeps_the_checkpoints_learning_rate_unless_lr_is_given(tmp_path, capsys):
    first = ["--epochs", "1", "--explore-epochs", "0", "--out", str(tmp_path), *FAST]
    cli.run(first + ["--lr", "0.2"])
    ckpt = str(tmp_path / "checkpoint.pt")
    kept = cli.train(["--epochs", "2", "--explore-epochs", "0", "--resume", ckpt, "--out", str(tmp_path / "a"), *FAST])
    assert kept.sched.base_lrs == [pytest.approx(0.2)] and kept.hp["lr"] == 0.2
    assert "scaled" not in capsys.readouterr().out


_ELASTIC_ENTRY = """
import os, signal, sys
from pathlib import Path
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from dcp_kernels.train import cli

# Fault injection for the test (not the product's): rank 1 kills itself (SIGKILL, no cleanup) after
# its DCP_TEST_KILL_AT-th optimizer step, once (a marker file remembers it across the restart).
kill_at, marker = os.environ.get("DCP_TEST_KILL_AT"), Path(sys.argv[1]) / "killed-once"
if kill_at and os.environ["RANK"] == "1" and not marker.exists():
    steps = [0]

    def die(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] == int(kill_at):
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    register_optimizer_step_post_hook(die)
sys.exit(cli.main(sys.argv[2:]))
"""


def _torchrun(tmp_path: Path, name: str, kill_at: int | None) -> subprocess.CompletedProcess:
    entry = tmp_path / "entry.py"
    entry.write_text(_ELASTIC_ENTRY)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    env.pop("DCP_TEST_KILL_AT", None)
    if kill_at is not None:
        env["DCP_TEST_KILL_AT"] = str(kill_at)
    (tmp_path / name).mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.5", str(entry), str(tmp_path / name),
           "--epochs", "2", "--explore-epochs", "1", "--checkpoint-every", "3", "--resume", "auto",
           "--out", str(tmp_path / name / "run"), *FAST]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_restart_after_a_killed_rank_equals_an_uninterrupted_run(tmp_path):
    """2 gloo ranks under torchrun --max-restarts 1; rank 1 is killed once, mid-epoch 2 (its 16th step of
    22): torchrun restarts both, --resume auto continues from the step-3 checkpoint of epoch 2, and the
    finished run equals one never interrupted: weights, utilities, selections, metrics."""
    whole = _torchrun(tmp_path, "whole", None)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _torchrun(tmp_path, "killed", kill_at=11 + 5)
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert (tmp_path / "killed" / "killed-once").exists()  # the fault did happen
    assert "resumed from" in killed.stdout and "(epoch 2, step 3)" in killed.stdout, killed.stdout[-2000:]
    a, b = (torch.load(tmp_path / d / "run" / "checkpoint.pt", weights_only=True) for d in ("whole", "killed"))
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():  # weights, utilities, selections, BatchNorm statistics
        assert torch.equal(value, b["model"][key]), key
    assert a["dcp"] == b["dcp"] and a["kept_history"] == b["kept_history"]

    def metrics(d):
        with open(tmp_path / d / "run" / "metrics.csv") as f:
            return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]

    assert metrics("whole") == metrics("killed")
