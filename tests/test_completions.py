"""`CompletionsTable` in a real run: rows every N steps in the logger's folder, guidance and verdicts included."""

import json

import lightning as L

from helpers import ScriptedEngine, one_torch_thread  # noqa: F401 (autouse fixture)
from test_module import make_data, make_module, source  # noqa: F401 (fixture)
from test_prefix_schedules import AlwaysWrong
from trapo_lightning.callbacks import CompletionsTable


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
