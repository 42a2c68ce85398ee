"""The `trapo` command line: every shipped config parses, typos fail loudly, and a tiny run goes end to end."""

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from trapo_lightning.callbacks import VLLMRolloutRefresh
from trapo_lightning.cli import build_cli, main
from trapo_lightning.data.datamodule import TrapoDataModule
from trapo_lightning.errors import ConfigError
from trapo_lightning.module import TrapoModule
from trapo_lightning.rollout import VLLMEngine

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("configs/*.yaml")) + sorted(ROOT.glob("tests/configs/*.yaml"))
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
# Overlays name no policy or data, so they parse only on top of a complete config: not in CONFIGS.
LAPTOP_VLLM = ROOT / "configs" / "overlays" / "laptop_vllm.yaml"


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


@pytest.mark.parametrize("base", [ROOT / "configs" / "trapo.yaml", TINY], ids=lambda p: p.name)
def test_the_laptop_vllm_overlay_swaps_the_engine_and_appends_the_refresh(base, in_tmp):
    alone = build_cli(["--config", str(base)], run=False)
    cli = build_cli(["--config", str(base), "--config", str(LAPTOP_VLLM)], run=False)
    engine = cli.model.rollout
    assert isinstance(engine, VLLMEngine)
    assert (engine.dtype, engine.enforce_eager, engine.kv_cache_gib) == ("float32", True, 1.0)
    # `callbacks+` appends: the base config's callbacks all stay, and the refresh comes once
    added = Counter(type(c) for c in cli.trainer.callbacks) - Counter(type(c) for c in alone.trainer.callbacks)
    assert added == Counter({VLLMRolloutRefresh: 1})
    assert len(cli.trainer.callbacks) == len(alone.trainer.callbacks) + 1
    # everything else is the base config's
    assert cli.config.model.policy == alone.config.model.policy and cli.config.data == alone.config.data
    assert list(in_tmp.iterdir()) == []


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


# -- scoring a model needs no training data (issue 15) ----------------------------------------------------------------
def write_benchmark(folder: Path, answers: list[str]) -> Path:
    path = folder / "bench.jsonl"
    rows = [{"problem": f"Compute {i} + 1.", "answer": answer} for i, answer in enumerate(answers)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def val_only_config(folder: Path, benchmark: Path) -> Path:
    """README's validate-only shape over the tiny config: a source with val_files only, and the completions table."""
    path = folder / "val_only.yaml"
    path.write_text(
        "data:\n"
        "  source:\n"
        "    class_path: trapo_lightning.data.sources.JsonlSource\n"
        f"    init_args: {{val_files: [{benchmark}]}}\n"
        "trainer:\n"
        "  callbacks: [{class_path: trapo_lightning.callbacks.CompletionsTable, init_args: {val_max_rows: null}}]\n"
    )
    return path


@pytest.mark.slow
def test_validate_and_test_run_on_a_val_only_data_config_and_write_the_answers(in_tmp, capsys):
    config = val_only_config(in_tmp, write_benchmark(in_tmp, ["1", "2", "3", "4"]))
    for version, (command, stage) in enumerate([("validate", "val"), ("test", "test")]):
        build_cli([command, "--config", str(TINY), "--config", str(config)])
        run_dir = in_tmp / "runs" / "tiny" / f"version_{version}"
        rows = [json.loads(line) for line in (run_dir / f"{stage}_completions.jsonl").open()]
        assert [(r["problem"], r["answer"], r["benchmark"]) for r in rows] == [
            (f"Compute {i} + 1.", str(i + 1), "val") for i in range(4)
        ]
        assert all(r["verdict"] in ("correct", "wrong", "unparseable", "timeout") for r in rows)
        with open(run_dir / "metrics.csv", newline="") as handle:
            assert f"{stage}/accuracy" in next(csv.reader(handle))
    # training does need the training split, and says so in one line
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(TINY), "--config", str(config)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "trapo: error: the train split has 0 usable records but one step across all ranks needs 2; add training data"
    )


# -- user errors in one line (issue 15) --------------------------------------------------------------------------------
def one_line_error(capsys, argv: list[str]) -> str:
    """What `trapo <argv>` prints for a user error: exit status 1, one `trapo: error:` line, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("trapo: error: ") and line.endswith("(TRAPO_DEBUG=1 shows the traceback)")
    return line


def test_a_missing_data_file_is_one_line(in_tmp, capsys):
    config = val_only_config(in_tmp, in_tmp / "missing.jsonl")
    line = one_line_error(capsys, ["validate", "--config", str(TINY), "--config", str(config)])
    assert f"data file {in_tmp / 'missing.jsonl'} does not exist" in line


def test_an_unparseable_reference_answer_is_one_line_naming_file_and_line(in_tmp, capsys):
    benchmark = write_benchmark(in_tmp, ["1", "\\frac{1}{", "3"])
    config = val_only_config(in_tmp, benchmark)
    line = one_line_error(capsys, ["validate", "--config", str(TINY), "--config", str(config)])
    assert f'{benchmark}:2: field \'answer\' is "\\frac{{1}}{{": math-verify cannot parse it' in line


def test_a_value_a_component_refuses_is_one_line(in_tmp, capsys):
    line = one_line_error(capsys, ["fit", "--config", str(TINY), "--data.prompts_per_step", "0"])
    assert line.startswith("trapo: error: prompts_per_step and val_batch_size must be >= 1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_trainer_setting_lightning_refuses_is_one_line(in_tmp, capsys):
    line = one_line_error(capsys, ["fit", "--config", str(TINY), "--trainer.accelerator", "gpu"])
    assert line.startswith("trapo: error: No supported gpu backend found!")


@pytest.mark.parametrize("key, value", [("gradient_clip_val", "0.5"), ("gradient_clip_algorithm", "value")])
def test_trainer_gradient_clipping_points_to_the_model_setting(in_tmp, capsys, key, value):
    line = one_line_error(capsys, ["fit", "--config", str(TINY), f"--trainer.{key}", value])
    assert f"trainer.{key} is not supported: TRAPO optimizes manually and clips its own gradients" in line
    assert "model.gradient_clip_val" in line
    # the same in a config file
    clipped = in_tmp / "clipped.yaml"
    clipped.write_text(f"trainer:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=r"model\.gradient_clip_val"):
        build_cli(["--config", str(TINY), "--config", str(clipped)], run=False)


def test_trapo_debug_shows_the_traceback(in_tmp, monkeypatch):
    monkeypatch.setenv("TRAPO_DEBUG", "1")
    with pytest.raises(ConfigError, match="prompts_per_step and val_batch_size must be >= 1") as raised:
        main(["fit", "--config", str(TINY), "--data.prompts_per_step", "0"])
    assert isinstance(raised.value.__cause__, ValueError)  # the component's own error, where it was raised


@pytest.mark.parametrize("bug", [KeyError("policy.lm_head.weight"), ValueError("shapes do not match")])
def test_an_error_that_is_not_the_users_keeps_its_traceback(monkeypatch, bug):
    # a KeyError, or a ValueError raised while running rather than while building the config, is a bug in trapo
    def run_command(argv):
        raise bug

    monkeypatch.setattr("trapo_lightning.cli.run_command", run_command)
    with pytest.raises(type(bug)):
        main(["fit"])


@pytest.mark.parametrize("where", ["command line", "config file"])
def test_a_loss_setting_under_its_old_key_names_the_new_one(in_tmp, capsys, where):
    if where == "command line":
        args = ["fit", "--config", str(TINY), "--model.sft_loss", "plain"]
    else:
        old = in_tmp / "old.yaml"
        old.write_text("model:\n  loss_normalizer: token_mean\n")
        args = ["fit", "--config", str(TINY), "--config", str(old)]
    line = one_line_error(capsys, args)
    key, new = ("sft_loss", "sft") if where == "command line" else ("loss_normalizer", "normalizer")
    assert f"model.{key} (in " in line and f"write it as model.loss.init_args.{new}" in line


@pytest.mark.slow
def test_trapo_test_scores_a_plain_model_folder_with_the_papers_protocol(in_tmp, tiny_policy_dir):
    """A plain Hugging Face folder (no checkpoint), two benchmarks with their own answer counts and an average over
    them, as configs/eval_paper_protocol.yaml lays it out."""
    for name, count in (("aime", 2), ("math", 3)):
        rows = [{"problem": f"Compute {i} + 1.", "answer": str(i + 1)} for i in range(count)]
        (in_tmp / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = in_tmp / "eval.yaml"
    config.write_text(
        "model:\n"
        f"  policy: {{class_path: trapo_lightning.models.PretrainedFolder, init_args: {{path: {tiny_policy_dir.resolve()}}}}}\n"
        "  evaluation:\n"
        "    class_path: trapo_lightning.evaluation.EvalProtocol\n"
        "    init_args: {samples: 1, samples_per_benchmark: {aime: 4}, pass_at_k: [1, 4], averages: {math_avg: [aime, math]}}\n"
        "data:\n"
        "  source: {class_path: trapo_lightning.data.sources.JsonlSource, init_args: {val_files: []}}\n"
        "  benchmarks:\n"
        f"    aime: {{class_path: trapo_lightning.data.sources.JsonlSource, init_args: {{val_files: [{in_tmp / 'aime.jsonl'}]}}}}\n"
        f"    math: {{class_path: trapo_lightning.data.sources.JsonlSource, init_args: {{val_files: [{in_tmp / 'math.jsonl'}]}}}}\n"
    )
    build_cli(["test", "--config", str(TINY), "--config", str(config)])
    with open(in_tmp / "runs" / "tiny" / "version_0" / "metrics.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert {"test/aime/avg@4", "test/aime/pass@4", "test/math/avg@1", "test/math_avg"} <= set(row)
    assert "test/math/pass@4" not in row
    averaged = (float(row["test/aime/avg@4"]) + float(row["test/math/avg@1"])) / 2
    assert float(row["test/math_avg"]) == pytest.approx(averaged)
