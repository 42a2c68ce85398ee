"""The small-scale reproduction's configs (configs/repro/): each method is common.yaml plus its own small file, and
every combination parses and instantiates with the CLI (run=False), differing only in what it says it changes."""

from pathlib import Path

import pytest
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from trapo_lightning.callbacks import CompletionsTable, PrefixSchedule

from trapo_lightning.cli import build_cli

REPRO = Path(__file__).resolve().parents[1] / "configs" / "repro"
NOT_METHODS = ("common.yaml", "base_sft.yaml", "sft_stage.yaml", "test.yaml", "four_operands.yaml")
METHODS = sorted(p for p in REPRO.glob("*.yaml") if p.name not in NOT_METHODS)


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


def test_sft_stage_stops_on_the_held_out_sft_loss(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(REPRO / "common.yaml"), "--config", str(REPRO / "sft_stage.yaml")], run=False)
    stopping = [c for c in cli.trainer.callbacks if isinstance(c, EarlyStopping)]
    best = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
    assert [c.monitor for c in stopping] == ["val/expert_nll"] and [c.monitor for c in best] == ["val/expert_nll"]
    assert cli.model.loss.sft.value == "plain"


def test_four_operands_task_changes_only_the_task(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = ["common.yaml", "four_operands.yaml", "trapo.yaml"]
    cli = build_cli([arg for c in configs for arg in ("--config", str(REPRO / c))], run=False)
    task = cli.datamodule.source.task
    assert (task.num_operands, task.digits, task.operations) == (4, 1, "+-")
    assert cli.datamodule.source.sizes == {"train": 20000, "val": 256} and cli.trainer.logger.name == "trapo"


def test_test_config_keeps_every_answer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", str(REPRO / "common.yaml"), "--config", str(REPRO / "test.yaml")], run=False)
    tables = [c for c in cli.trainer.callbacks if isinstance(c, CompletionsTable)]
    assert len(tables) == 1 and tables[0].val_max_rows is None
    assert cli.model.evaluation.samples == 8 and cli.model.evaluation.temperature == 0.6
