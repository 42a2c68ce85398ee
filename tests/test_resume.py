"""Exact resume and preemption, on real `trapo fit` processes.

A straight run of N steps is the reference. Another run is held at step k, killed with SIGKILL (or sent the
scheduler's stop signal), and resumed with `--ckpt_path last`; its steps k..N-1 must log the same losses, rewards
and validation numbers, bit for bit, with no step skipped or repeated. The tiny epoch is 3 steps long, so k = 3
resumes exactly at an epoch boundary and k = 4 inside the second epoch.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
STEPS = 7
pytestmark = pytest.mark.slow


def write_config(folder: Path, extra_callbacks: list[dict] = ()) -> Path:
    config = yaml.safe_load(TINY.read_text())
    config["data"]["source"]["init_args"]["train_size"] = 6  # 3 steps of 2 prompts per epoch
    config["trainer"]["max_steps"] = STEPS
    # a decaying learning rate, so a scheduler that did not resume would change the losses after step k
    config["model"]["lr_scheduler"] = {"class_path": "torch.optim.lr_scheduler.LinearLR",
                                       "init_args": {"start_factor": 1.0, "end_factor": 0.1, "total_iters": STEPS}}
    config["trainer"]["callbacks"] = [
        {"class_path": "trapo_lightning.callbacks.ValidateOnStart"},
        {"class_path": "trapo_lightning.callbacks.PreemptionCheckpoint"},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "runs/checkpoints", "save_last": True, "every_n_train_steps": 1}},
        *extra_callbacks,
    ]
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def trapo(folder: Path, config: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"))
    command = [str(Path(sys.executable).with_name("trapo")), "fit", "--config", str(config), *args]
    return subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def logged(folder: Path, version: int) -> dict[int, dict[str, str]]:
    """step -> every non-empty metric logged at that step (train and val rows merged)."""
    rows: dict[int, dict[str, str]] = {}
    with open(folder / "runs" / "tiny" / f"version_{version}" / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(row.pop("step"))
            row.pop("epoch", None)  # Lightning's epoch counter is not data; our stream's position is
            merged = rows.setdefault(step, {})
            for key, value in row.items():
                if value and not key.startswith("time/"):  # wall-clock phase timings differ run to run
                    assert key not in merged, f"step {step} logged {key} twice (a repeated step)"
                    merged[key] = value
    return rows


def hold(folder: Path, step: int) -> tuple[subprocess.Popen, Path]:
    """Start a run that holds at `step`, and wait until it is there (its previous checkpoint is on disk)."""
    marker, release = folder / "held", folder / "release"
    config = write_config(folder, [{"class_path": "faults.HoldAtStep",
                                    "init_args": {"step": step, "marker": str(marker), "release": str(release)}}])
    process = trapo(folder, config)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "the run never reached the hold point"
        time.sleep(0.2)
    return process, release


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[int, dict[str, str]]:
    folder = tmp_path_factory.mktemp("straight")
    finish(trapo(folder, write_config(folder)))
    rows = logged(folder, 0)
    assert sorted(step for step, row in rows.items() if "train/loss" in row) == list(range(STEPS))
    return rows


def assert_continues_exactly(straight: dict, resumed: dict, k: int) -> None:
    train_steps = sorted(step for step, row in resumed.items() if "train/loss" in row)
    assert train_steps == list(range(k, STEPS)), "a step was skipped or repeated"
    for step in train_steps:
        assert resumed[step] == straight[step], f"step {step} differs after resume"
    assert any("val/accuracy" in row for row in resumed.values())


@pytest.mark.parametrize("k", [3, 4], ids=["at-epoch-boundary", "mid-epoch"])
def test_sigkill_then_resume_continues_bit_for_bit(straight, tmp_path, k):
    process, _ = hold(tmp_path, k)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    checkpoint = torch.load(tmp_path / "runs" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == k

    finish(trapo(tmp_path, write_config(tmp_path), "--ckpt_path", "last"))
    assert_continues_exactly(straight, logged(tmp_path, 1), k)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_stop_signal_checkpoints_the_step_and_exits_cleanly(straight, tmp_path, signum):
    k = 2
    process, release = hold(tmp_path, k)
    process.send_signal(signum)
    release.touch()  # the held step now runs to its end, where the callback acts
    finish(process)
    checkpoint = torch.load(tmp_path / "runs" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == k + 1  # the step that was running when the signal came is in it

    finish(trapo(tmp_path, write_config(tmp_path), "--ckpt_path", "last"))
    assert_continues_exactly(straight, logged(tmp_path, 1), k + 1)
