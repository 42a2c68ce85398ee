"""`CompletionsTable` in real runs: training rows every N steps in the logger's folder, guidance and verdicts
included; validation and test answers with their reference answer, verdict and benchmark, up to a limit."""

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.loggers import Logger, WandbLogger

from helpers import ScriptedEngine, one_torch_thread  # noqa: F401 (autouse fixture)
from test_evaluation import EveryFirstCorrect, RecordingEngine, benchmark_file
from trapo_lightning.evaluation import EvalProtocol
from test_evaluation import make_data as make_eval_data
from test_evaluation import make_module as make_eval_module
from test_module import make_data, make_module, source  # noqa: F401 (fixture)
from test_prefix_schedules import AlwaysWrong
from trapo_lightning.callbacks import CompletionsTable
from trapo_lightning.callbacks.completions import EVAL_COLUMNS
from trapo_lightning.data.sources import JsonlSource

TINY = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


def test_rows_every_n_steps_with_prefix_and_completion(source, tmp_path):
    table = CompletionsTable(every_n_steps=2, max_rows=8)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=3, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[table],
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run"),
    )
    # every continuation is the scripted ids [5, 6]; every grade is wrong, so prompt 0 gets all guidance levels
    trainer.fit(make_module(source, rollout=ScriptedEngine([5, 6]), reward=AlwaysWrong()), datamodule=make_data(source))
    rows = [json.loads(line) for line in (tmp_path / "run" / "version_0" / "completions.jsonl").open()]
    assert [r["step"] for r in rows] == [0] * 8 + [2] * 8  # steps 0 and 2 of 0, 1, 2
    first = rows[:8]
    assert [r["prefix_ratio"] for r in first] == [0.0] * 4 + [0.25] * 2 + [0.5, 1.0]
    assert [r["micro_group"] for r in first] == [0, 0, 0, 0, 1, 1, 2, 3]
    assert all(r["problem"].startswith("Compute ") and r["verdict"] == "wrong" for r in rows)
    assert all(r["expert_prefix"] == "" for r in first[:4]) and all(r["expert_prefix"] for r in first[4:])
    assert first[0]["completion"] == source.load_tokenizer().decode([5, 6])
    assert first[7]["completion"] == ""  # the whole expert solution: nothing of the policy's own
    assert table.state_dict() == {"steps_seen": 3}


# -- validation and test: what the model answered, per benchmark, with the reference and the verdict ------------------
class RecordingWandbLogger(WandbLogger):
    """A `WandbLogger` that records its tables instead of starting a W&B run (wandb is not what is tested here)."""

    def __init__(self, save_dir):
        Logger.__init__(self)
        self._save_dir_path = str(save_dir)
        self.tables = []

    @property
    def save_dir(self):
        return self._save_dir_path

    @property
    def experiment(self):
        return None

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, *args, **kwargs):
        pass

    def finalize(self, status):
        pass

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables.append((key, list(columns), [list(row) for row in data]))


def eval_trainer(tmp_path, table, logger=None, **overrides):
    options = dict(accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[table],
                   logger=logger or L.pytorch.loggers.CSVLogger(tmp_path, name="run"))
    return L.Trainer(**(options | overrides))


def read_rows(path):
    return [json.loads(line) for line in path.open(encoding="utf-8")]


@pytest.fixture
def benchmarks(write_jsonl):
    return {
        "aime24": JsonlSource(val_files=[benchmark_file(write_jsonl, "aime24", 3)]),
        "math500": JsonlSource(val_files=[benchmark_file(write_jsonl, "math500", 4)]),
    }


def test_validate_and_test_write_every_answer_with_reference_and_verdict(source, benchmarks, tmp_path):
    table = CompletionsTable(val_max_rows=None)
    trainer = eval_trainer(tmp_path, table)
    # 2 answers per problem, the first of each pair graded correct; every answer is the scripted tokens [7, 8, 9]
    module = make_eval_module(source, rollout=RecordingEngine(), reward=EveryFirstCorrect(2), evaluation=EvalProtocol(samples=2))
    data = make_eval_data(source, benchmarks)
    trainer.validate(module, datamodule=data, verbose=False)
    run = tmp_path / "run" / "version_0"
    rows = read_rows(run / "val_completions.jsonl")
    assert len(rows) == (3 + 4) * 2  # every problem of both benchmarks, 2 answers each
    assert [r["benchmark"] for r in rows] == ["aime24"] * 6 + ["math500"] * 8
    aime = rows[:6]
    assert [r["problem"] for r in aime] == [f"Compute {i} + 1." for i in (0, 0, 1, 1, 2, 2)]
    assert [r["answer"] for r in aime] == ["1", "1", "2", "2", "3", "3"]
    assert [r["source"] for r in aime] == [f"{benchmarks['aime24'].files['val'][0]}:{i}" for i in (1, 1, 2, 2, 3, 3)]
    assert [r["sample"] for r in rows] == [0, 1] * 7
    assert [r["verdict"] for r in rows] == ["correct", "wrong"] * 7
    assert all(r["completion"] == source.load_tokenizer().decode([7, 8, 9]) for r in rows)
    assert all(r["step"] == 0 and r["response_tokens"] == 3 and r["finished"] is False for r in rows)
    assert not (run / "completions.jsonl").exists()  # no training, no training table

    trainer.test(module, datamodule=data, verbose=False)
    tested = read_rows(run / "test_completions.jsonl")
    assert [(r["benchmark"], r["problem"], r["sample"]) for r in tested] == [
        (r["benchmark"], r["problem"], r["sample"]) for r in rows
    ]


def test_at_most_val_max_rows_per_benchmark_each_validation_first_in_file_order(source, benchmarks, tmp_path):
    table = CompletionsTable(val_max_rows=3)
    trainer = eval_trainer(tmp_path, table)
    module = make_eval_module(source, rollout=RecordingEngine(), reward=EveryFirstCorrect(2), evaluation=EvalProtocol(samples=2))
    data = make_eval_data(source, benchmarks)  # batches of 2 problems: the cap falls inside the second batch
    trainer.validate(module, datamodule=data, verbose=False)
    trainer.validate(module, datamodule=data, verbose=False)  # a second validation appends its own rows
    rows = read_rows(tmp_path / "run" / "version_0" / "val_completions.jsonl")
    first = [(r["benchmark"], r["problem"], r["sample"]) for r in rows[:6]]
    three = [("Compute 0 + 1.", 0), ("Compute 0 + 1.", 1), ("Compute 1 + 1.", 0)]  # problem 1's 2nd answer is the 4th
    assert first == [("aime24", *row) for row in three] + [("math500", *row) for row in three]
    assert len(rows) == 12 and [(r["benchmark"], r["problem"], r["sample"]) for r in rows[6:]] == first


def test_validations_during_fit_are_written_at_their_step_and_the_sanity_check_is_not(source, tmp_path):
    table = CompletionsTable(every_n_steps=100, max_rows=2, val_max_rows=None)
    trainer = eval_trainer(tmp_path, table, max_steps=2, val_check_interval=2, num_sanity_val_steps=1)
    module = make_module(source, rollout=ScriptedEngine([5, 6]), reward=AlwaysWrong())
    trainer.fit(module, datamodule=make_data(source))  # held-out split: 2 problems, 1 answer each
    rows = read_rows(tmp_path / "run" / "version_0" / "val_completions.jsonl")
    assert [(r["step"], r["benchmark"], r["verdict"]) for r in rows] == [(2, "val", "wrong")] * 2
    assert len(read_rows(tmp_path / "run" / "version_0" / "completions.jsonl")) == 2  # the training table: step 0


def test_a_wandb_logger_gets_one_table_per_validation(source, benchmarks, tmp_path):
    logger = RecordingWandbLogger(tmp_path)
    trainer = eval_trainer(tmp_path, CompletionsTable(val_max_rows=2), logger=logger)
    module = make_eval_module(source, rollout=RecordingEngine(), reward=EveryFirstCorrect(1))
    trainer.validate(module, datamodule=make_eval_data(source, benchmarks), verbose=False)
    ((key, columns, data),) = logger.tables
    assert key == "val_completions" and columns == list(EVAL_COLUMNS)
    assert [row[columns.index("benchmark")] for row in data] == ["aime24", "aime24", "math500", "math500"]
    assert [row[columns.index("verdict")] for row in data] == ["correct"] * 4
    assert (tmp_path / "val_completions.jsonl").is_file()  # beside the W&B files: the logger's save_dir


def test_invalid_limits_fail_at_construction():
    with pytest.raises(ValueError, match="val_max_rows must be >= 1 or null"):
        CompletionsTable(val_max_rows=0)


@pytest.mark.distributed
def test_two_ranks_write_one_table_with_every_ranks_answers(tmp_path, tiny_policy_dir, tiny_tokenizer):
    """`trapo fit` on 2 ranks (ModelParallelStrategy over gloo): the training table is written by rank 0 without a
    collective only it enters, and the validation answers of both ranks' shares land in one file, in file order."""
    from test_fsdp import run  # a subprocess run that fails on a hang (a collective only some ranks entered)

    config = yaml.safe_load(TINY.read_text())
    config["model"]["policy"]["init_args"]["path"] = str(tiny_policy_dir.resolve())
    continuation = tiny_tokenizer("\\boxed{7}", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    config["model"]["rollout"] = {"class_path": "helpers.ScriptedEngine", "init_args": {"token_ids": continuation}}
    config["data"]["source"]["init_args"].update(train_size=4, val_size=4)
    config["trainer"].update(devices=2, max_steps=1, val_check_interval=1,
                             strategy={"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"})
    config["trainer"]["callbacks"] = [{"class_path": "trapo_lightning.callbacks.CompletionsTable",
                                       "init_args": {"every_n_steps": 1, "max_rows": 4, "val_max_rows": None}}]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run([str(Path(sys.executable).with_name("trapo")), "fit", "--config", "config.yaml"], cwd=tmp_path)
    run_dir = tmp_path / "runs" / "tiny" / "version_0"
    assert [r["step"] for r in read_rows(run_dir / "completions.jsonl")] == [0] * 4  # rank 0's samples
    rows = read_rows(run_dir / "val_completions.jsonl")
    assert [(r["step"], r["source"]) for r in rows] == [(1, f"synthetic:val:{i}") for i in range(4)]  # 2 per rank
    assert all(r["completion"] == "\\boxed{7}" for r in rows)
    assert [r["verdict"] for r in rows] == ["correct" if r["answer"] == "7" else "wrong" for r in rows]
