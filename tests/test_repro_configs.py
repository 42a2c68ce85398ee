"""The small-scale reproduction's configs (configs/repro/): each method is common.yaml plus its own small file, and
every combination parses and instantiates with the CLI (run=False), differing only in what it says it changes."""

from pathlib import Path

import pytest

from trapo_lightning.callbacks import PrefixSchedule
from trapo_lightning.cli import build_cli

REPRO = Path(__file__).resolve().parents[1] / "configs" / "repro"
METHODS = sorted(p for p in REPRO.glob("*.yaml") if p.name not in ("common.yaml", "base_sft.yaml"))


def test_every_method_is_there():
    assert {p.stem for p in METHODS} >= {"trapo", "grpo", "sft", "luffy", "trapo_plain_sft"}


@pytest.mark.parametrize("method", METHODS, ids=lambda p: p.stem)
def test_method_parses_on_top_of_common(method, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(REPRO / "common.yaml"), "--config", str(method)], run=False)
    schedules = [c for c in cli.trainer.callbacks if isinstance(c, PrefixSchedule)]
    assert len(schedules) == 1
    assert cli.trainer.logger.name == method.stem
    assert cli.trainer.max_steps == 150 and cli.datamodule.prompts_per_step == 8  # the same budget for all


def test_base_sft_config_parses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(REPRO / "base_sft.yaml")], run=False)
    assert cli.model.loss.sft.value == "plain"
