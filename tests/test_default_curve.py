"""`benchmarks/default_curve.py`'s table from a hand-made metrics.csv (the rows Lightning's CSVLogger writes)."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from default_curve import curve_rows  # noqa: E402

HEADER = "step,train/reward,train/guided_fraction,time/rollout_s,time/forward_s,time/backward_s,time/optimizer_s,val/accuracy\n"
ROWS = [
    "0,,,,,,,0.0",  # ValidateOnStart
    "0,0.0,0.5,0.2,0.1,0.1,0.0,",
    "1,0.5,0.25,0.4,0.1,0.1,0.0,",
    "1,,,,,,,0.25",  # validation after step 1
    "2,1.0,0.0,0.3,0.1,0.1,0.0,",
    "2,,,,,,,0.75",
]


def test_each_validation_gets_the_means_of_the_training_steps_since_the_last_one(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(HEADER + "\n".join(ROWS) + "\n")
    first, second, third = curve_rows(path)
    assert first["step"] == 0 and first["val_accuracy"] == 0.0 and math.isnan(first["reward"])
    # steps 0-1: reward (0 + 0.5) / 2, guided (0.5 + 0.25) / 2, step time (0.4 + 0.6) / 2
    assert (second["step"], second["val_accuracy"]) == (1, 0.25)
    assert (second["reward"], second["guided"], second["step_s"]) == pytest.approx((0.25, 0.375, 0.5))
    # step 2 alone
    assert (third["step"], third["val_accuracy"]) == (2, 0.75)
    assert (third["reward"], third["guided"], third["step_s"]) == pytest.approx((1.0, 0.0, 0.5))
