"""The `trapo` command line: every shipped config parses, typos fail loudly, and a tiny run goes end to end."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from trapo_lightning.cli import build_cli
from trapo_lightning.data.datamodule import TrapoDataModule
from trapo_lightning.module import TrapoModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("configs/*.yaml")) + sorted(ROOT.glob("tests/configs/*.yaml"))
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run from an empty temporary folder (configs write relative paths: runs/...), never touching the network."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("COLUMNS", "200")  # help text wraps at the terminal width
    return tmp_path


def test_there_are_configs_to_check():
    assert ROOT / "configs" / "trapo.yaml" in CONFIGS and TINY in CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_parses_and_instantiates(config, in_tmp):
    cli = build_cli(["--config", str(config)], run=False)  # run=False: no subcommand
    assert isinstance(cli.model, TrapoModule)
    assert isinstance(cli.datamodule, TrapoDataModule)
    # linked, not repeated: the data side gets the model's policy and lengths
    fit = cli.config
    assert fit.data.policy == fit.model.policy
    assert cli.datamodule.max_prompt_tokens == cli.model.max_prompt_tokens
    assert cli.datamodule.max_response_tokens == cli.model.max_response_tokens
    assert list(in_tmp.iterdir()) == []  # parsing writes nothing


def test_an_unknown_key_fails_and_names_it(in_tmp, capsys):
    bad = in_tmp / "typo.yaml"
    typo = "  max_prompt_tokens: 256\n  trust_region_alfa: 0.2"  # a misspelt model key
    bad.write_text(TINY.read_text().replace("  max_prompt_tokens: 256", typo))
    assert "trust_region_alfa" in bad.read_text()
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["--config", str(bad)], run=False)
    assert exit_info.value.code != 0
    assert "trust_region_alfa" in capsys.readouterr().err


def test_a_wrong_type_fails_and_names_the_key(in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["--config", str(TINY), "--model.micro_batch_size", "many"], run=False)
    assert exit_info.value.code != 0
    assert "micro_batch_size" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_config_trains_end_to_end(in_tmp):
    cli = build_cli(["fit", "--config", str(TINY)])
    trainer = cli.trainer
    assert trainer.global_step == 3
    run_dir = in_tmp / "runs" / "tiny" / "version_0"

    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {"train/reward", "val/accuracy", "train/loss"} <= set(rows[0])
    train_steps = [int(r["step"]) for r in rows if r["train/reward"]]
    val_steps = [int(r["step"]) for r in rows if r["val/accuracy"]]
    assert train_steps == [0, 1, 2]
    assert val_steps[0] == 0 and len(val_steps) == 2  # ValidateOnStart at step 0, then after 2 steps

    checkpoint_path = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint_path.is_file()
    checkpoint = torch.load(checkpoint_path, weights_only=True)  # plain tensors and containers only
    assert checkpoint["global_step"] == 3  # saved after every step, so last.ckpt is the final state
    state = checkpoint["state_dict"]
    assert state and all(key.startswith("policy.") for key in state)
    assert not any(key.startswith("reference.") for key in state)
    # three steps moved the policy away from the weights it started from; without a KL term no reference is loaded
    start = load_file(in_tmp / "runs" / "tiny_qwen2" / "model.safetensors")
    assert any(not torch.equal(state[f"policy.{k}"], v) for k, v in start.items() if f"policy.{k}" in state)
    assert cli.model.reference is None


def test_trapo_help_exits_zero():
    script = Path(sys.executable).with_name("trapo")
    env = dict(os.environ, WANDB_MODE="offline")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "fit" in result.stdout and "validate" in result.stdout


def test_fit_help_shows_the_argument_docstrings(in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--model.loss" in text
    assert "Most sequences per forward/backward micro-batch within one optimizer step" in text
    assert "--data.prompts_per_step" in text
    assert "Prompts per optimizer step on each rank" in text


def test_the_loss_settings_are_documented_under_model_loss(in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--model.loss.help", "trapo_lightning.losses.TrapoLoss"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "TrSFT threshold alpha: tokens with p < alpha get gradient weight p / alpha (paper: 0.1)" in text
