"""The rules a run's callbacks are held to (trapo_lightning/callback_rules.py), and where TRAPO's own checkpoints go
(trapo_lightning/checkpoints.py): one writer per module setting, one checkpoint entry per stateful callback (two
instances of one class keep their own state through a real checkpoint), checkpoint writers last."""

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import ScriptedEngine, one_torch_thread  # noqa: F401 (autouse fixture)
from test_module import make_data, make_module, source  # noqa: F401 (fixture)
from trapo_lightning.callback_rules import check_callbacks, in_hook_order, missing_states, setting_writers
from trapo_lightning.callbacks import (
    AdaptiveAlpha,
    AdaptiveGuidance,
    AdaptiveKL,
    AlphaSchedule,
    CompletionsTable,
    LuffyGuidance,
    PreemptionCheckpoint,
    ValidateOnStart,
)
from trapo_lightning.checkpoints import checkpoint_path
from trapo_lightning.errors import ConfigError


def test_every_setting_writer_declares_what_it_writes():
    callbacks = [AlphaSchedule(), AdaptiveKL(), AdaptiveGuidance(), CompletionsTable()]
    writers = setting_writers(callbacks)
    assert {setting: [type(c).__name__ for c in found] for setting, found in writers.items()} == {
        "loss.trust_region_alpha": ["AlphaSchedule"], "loss.kl_coef": ["AdaptiveKL"], "guidance": ["AdaptiveGuidance"],
    }
    check_callbacks(callbacks)  # one writer each: fine


@pytest.mark.parametrize(
    ("callbacks", "message"),
    [
        ([AlphaSchedule(), AdaptiveAlpha()], "AlphaSchedule and AdaptiveAlpha both write the module setting "
                                             "`loss.trust_region_alpha`"),
        ([AdaptiveKL(), AdaptiveKL(target=0.1)], "AdaptiveKL and AdaptiveKL both write the module setting `loss.kl_coef`"),
        ([LuffyGuidance(), AdaptiveGuidance()], "LuffyGuidance and AdaptiveGuidance both write the module setting "
                                                "`guidance`"),
    ],
    ids=["alpha", "kl", "guidance"],
)
def test_two_writers_of_one_setting_are_refused_naming_both(callbacks, message):
    with pytest.raises(ConfigError, match=message):
        check_callbacks(callbacks)


def test_a_run_with_two_writers_fails_before_any_model_is_loaded(source):
    module = make_module(source, rollout=ScriptedEngine([5, 6]))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[AdaptiveAlpha(), AlphaSchedule()])
    with pytest.raises(ConfigError, match="AdaptiveAlpha and AlphaSchedule"):
        trainer.fit(module, datamodule=make_data(source))
    assert module.policy is None


def test_stateful_callbacks_have_their_own_checkpoint_keys():
    keys = [c.state_key for c in (CompletionsTable(filename="a.jsonl"), CompletionsTable(filename="b.jsonl"),
                                  AdaptiveKL(), AdaptiveAlpha(), AdaptiveGuidance())]
    assert len(set(keys)) == len(keys)
    # a setting's writer is keyed by what it writes, so retuning it between runs keeps its state
    assert AdaptiveKL(target=0.1).state_key == AdaptiveKL(target=0.2).state_key
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `CompletionsTable`"):  # Lightning's
        L.Trainer(logger=False, callbacks=[CompletionsTable(filename="c.jsonl", every_n_steps=1),
                                           CompletionsTable(filename="c.jsonl")])


def test_checkpoint_writers_run_after_every_other_callback():
    preemption, kl, table, checkpoint = PreemptionCheckpoint(), AdaptiveKL(), CompletionsTable(), ModelCheckpoint()
    assert in_hook_order([preemption, kl, checkpoint, table]) == [kl, checkpoint, table, preemption]


def fit(source, root, steps, callbacks, ckpt_path=None) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root,
        callbacks=[*callbacks, ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=1)],
    )
    trainer.fit(make_module(source, rollout=ScriptedEngine([5, 6])), datamodule=make_data(source), ckpt_path=ckpt_path)
    return trainer


def test_two_tables_keep_their_own_state_through_a_checkpoint(source, tmp_path):
    """A second table added after step 2 has counted fewer steps than the first; both counts survive a resume."""
    fit(source, tmp_path, 2, [CompletionsTable(filename="a.jsonl")])
    first, second = CompletionsTable(filename="a.jsonl"), CompletionsTable(filename="b.jsonl", every_n_steps=2)
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.warns(UserWarning, match=r"no state of the callback CompletionsTable\{'filename': 'b.jsonl'\}"):
        fit(source, tmp_path, 3, [first, second], ckpt_path=last)  # the second starts from nothing
    assert (first.steps_seen, second.steps_seen) == (3, 1)
    again = CompletionsTable(filename="a.jsonl"), CompletionsTable(filename="b.jsonl", every_n_steps=2)
    fit(source, tmp_path, 4, again, ckpt_path=last)
    assert (again[0].steps_seen, again[1].steps_seen) == (4, 2)  # each resumed its own count


def test_missing_states_names_only_stateful_callbacks_the_checkpoint_lacks():
    kl, table = AdaptiveKL(), CompletionsTable()
    checkpoint = {"callbacks": {kl.state_key: kl.state_dict()}}
    assert missing_states([kl, table, ValidateOnStart()], checkpoint) == [table.state_key]


def test_the_stop_signal_and_the_nonfinite_stop_write_where_the_checkpoints_are(tmp_path):
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path / "root",
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints")])
    assert checkpoint_path(trainer, "last") == str(tmp_path / "checkpoints" / "last.ckpt")
    without = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=tmp_path / "root")
    assert checkpoint_path(without, "nonfinite-stop-step3") == str(tmp_path / "root" / "nonfinite-stop-step3.ckpt")
