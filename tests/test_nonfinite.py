"""The non-finite step rule (skip and count, reset on a good step, stop after K in a row), alone and in a real run."""

import csv
from pathlib import Path

import pytest
import torch
import yaml

from helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from trapo_lightning.cli import build_cli
from trapo_lightning.nonfinite import NonFiniteGuard, NonFiniteLossError, StepAction

TINY = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return tmp_path


def test_a_finite_step_steps():
    assert NonFiniteGuard().update(True) is StepAction.step


def test_bad_steps_are_skipped_then_the_third_in_a_row_stops():
    guard = NonFiniteGuard(max_consecutive=3)
    # bad, bad -> skip, skip (consecutive 1, 2); bad -> consecutive 3 = K -> stop
    assert [guard.update(False) for _ in range(3)] == [StepAction.skip, StepAction.skip, StepAction.stop]
    assert (guard.skipped, guard.consecutive) == (3, 3)


def test_a_good_step_resets_the_run_but_not_the_total():
    guard = NonFiniteGuard(max_consecutive=2)
    # bad (1 in a row) -> skip; good -> 0 in a row; bad -> 1 in a row -> skip again, total 2
    assert [guard.update(f) for f in (False, True, False)] == [StepAction.skip, StepAction.step, StepAction.skip]
    assert (guard.skipped, guard.consecutive) == (2, 1)


def test_k_of_one_stops_on_the_first_bad_step():
    assert NonFiniteGuard(max_consecutive=1).update(False) is StepAction.stop


def test_state_round_trip():
    guard = NonFiniteGuard(max_consecutive=5)
    guard.update(False), guard.update(False)
    restored = NonFiniteGuard(max_consecutive=5)
    restored.load_state_dict(guard.state_dict())
    assert (restored.skipped, restored.consecutive) == (2, 2)
    assert restored.update(False) is StepAction.skip and restored.consecutive == 3


def test_k_below_one_is_rejected():
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(max_consecutive=0)


# -- in a real run: a NaN is injected into the policy's training forward (tests/faults.py) ----------------------------
def run_with_nan_at(folder, batches, max_consecutive=3):
    config = yaml.safe_load(TINY.read_text())
    config["trainer"]["max_steps"] = 4
    config["model"]["max_consecutive_nonfinite"] = max_consecutive
    config["trainer"]["callbacks"] = [
        {"class_path": "faults.NonFiniteLogitsAt", "init_args": {"batches": batches}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "runs/checkpoints", "save_last": True, "every_n_train_steps": 1}},
    ]
    path = folder / "nan.yaml"
    path.write_text(yaml.safe_dump(config))
    return build_cli(["fit", "--config", str(path)])


@pytest.mark.slow
def test_a_nan_step_is_skipped_counted_and_named(in_tmp):
    with pytest.warns(UserWarning, match=r"training batch 1 \(optimizer step 1\): non-finite loss nan"):
        cli = run_with_nan_at(in_tmp, [1])
    assert cli.trainer.global_step == 4  # max_steps counts updates: the skipped batch did not take one
    assert cli.model.train_batches == 5
    with open(in_tmp / "runs" / "tiny" / "version_0" / "metrics.csv", newline="") as handle:
        skipped = [float(r["train/nonfinite_skipped"]) for r in csv.DictReader(handle) if r["train/loss"]]
    assert skipped == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert all(torch.isfinite(p).all() for p in cli.model.policy.parameters())


@pytest.mark.slow
def test_k_nan_steps_in_a_row_stop_with_the_last_good_weights_saved(in_tmp):
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row") as error:
        with pytest.warns(UserWarning, match="non-finite"):
            run_with_nan_at(in_tmp, [1, 2, 3])
    saved = in_tmp / "runs" / "checkpoints" / "nonfinite-stop-step1.ckpt"
    assert str(saved) in str(error.value) or saved.name in str(error.value)
    stop = torch.load(saved, weights_only=True)
    good = torch.load(in_tmp / "runs" / "checkpoints" / "last.ckpt", weights_only=True)  # after step 0's update
    assert stop["global_step"] == good["global_step"] == 1
    assert stop["state_dict"].keys() == good["state_dict"].keys()
    assert all(torch.equal(stop["state_dict"][k], v) for k, v in good["state_dict"].items())
    assert all(torch.isfinite(v).all() for v in stop["state_dict"].values())
