"""Prefix-scheduling callbacks in a real Trainer run: swapping the callback changes which samples start from an
expert prefix. Rollouts are scripted and every completion is graded wrong, so the adaptive rule escalates fully
and the assertions are about guidance alone."""

import math

import lightning as L
import pytest

from helpers import ScriptedEngine, one_torch_thread  # noqa: F401 (autouse fixture)
from test_module import make_data, make_module, make_trainer, source  # noqa: F401 (fixture)
from trapo_lightning.callbacks import (
    AdaptiveGuidance,
    CosineHint,
    FixedPrefix,
    LuffyGuidance,
    NoGuidanceSchedule,
    SFTOnly,
)
from trapo_lightning.reward import RewardResult, Verdict


class AlwaysWrong:
    def __call__(self, completions, answers):
        return [RewardResult(Verdict.wrong, 0.0) for _ in completions]


class RecordPrefixes(L.Callback):
    """Per step: each prompt's prefix ratios, in sampling order."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        by_prompt = {}
        for sample in outputs["samples"]:
            by_prompt.setdefault(sample.prompt_index, []).append(sample.prefix_ratio)
        self.steps.append([by_prompt[p] for p in sorted(by_prompt)])


def prefixes_under(source, schedule, steps=1):
    module = make_module(source, rollout=ScriptedEngine([5, 6]), reward=AlwaysWrong())
    recorder = RecordPrefixes()
    make_trainer(max_steps=steps, callbacks=[schedule, recorder]).fit(module, datamodule=make_data(source))
    return recorder.steps


@pytest.mark.parametrize(
    ("schedule", "ratios"),
    [
        # TRAPO: 4 unguided; mean 0 < 0.5, 0.7, 0.9 -> 2 at 0.25, 1 at 0.5, 1 whole solution
        (AdaptiveGuidance(), [0.0] * 4 + [0.25] * 2 + [0.5, 1.0]),
        (FixedPrefix(prefix_ratio=0.5, guided_samples=3), [0.0] * 5 + [0.5] * 3),
        (LuffyGuidance(), [0.0] * 7 + [1.0]),
        (NoGuidanceSchedule(), [0.0] * 8),
        (SFTOnly(), [1.0]),
        (CosineHint(anneal_steps=10), [0.95] * 8),  # step 0 of the anneal
    ],
    ids=["adaptive", "fixed", "luffy", "none", "sft_only", "cosine_hint"],
)
def test_the_schedule_decides_which_samples_get_a_prefix(source, schedule, ratios):
    (step,) = prefixes_under(source, schedule)
    assert step == [pytest.approx(ratios)] * 2  # both prompts of the step fail everything, so both get the same treatment


def test_the_same_failures_get_prefixes_only_under_a_guiding_schedule(source):
    assert prefixes_under(source, NoGuidanceSchedule()) != prefixes_under(source, AdaptiveGuidance())


def test_cosine_hint_anneals_then_stops():
    hint = CosineHint(start_ratio=0.95, end_ratio=0.05, anneal_steps=4)
    # cosine from 0.95 to 0.05 over 4 steps: 0.95, 0.05 + 0.45 * (1 + cos(pi/4)) = 0.81820, 0.5, ..., then 0
    assert hint.hint_ratio(0) == pytest.approx(0.95)
    assert hint.hint_ratio(1) == pytest.approx(0.05 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert hint.hint_ratio(2) == pytest.approx(0.5)
    assert hint.hint_ratio(4) == 0.0
    assert hint.rule(4).group_size == 8 and all(g.prefix_ratio == 0.0 for g in hint.rule(4).micro_groups)


def test_adaptive_guidance_logs_the_utility_of_each_level(source):
    module = make_module(source, rollout=ScriptedEngine([5, 6]), reward=AlwaysWrong())
    schedule = AdaptiveGuidance()
    trainer = make_trainer(max_steps=2, callbacks=[schedule])
    trainer.fit(module, datamodule=make_data(source))
    metrics = trainer.callback_metrics
    assert metrics["guidance/L0.25/triggered"] == 1.0  # every prompt failed its first 4 samples
    assert metrics["guidance/L0.25/reward"] == 0.0  # and its guided continuations
    assert metrics["guidance/L1.00/triggered_ema"] == 1.0
    assert schedule.totals[0.25] == {"triggered": 4.0, "prompts": 4.0, "reward": 0.0, "samples": 8.0}  # 2 steps x 2
    assert metrics["guidance/L0.25/triggered_cumulative"] == 1.0  # 4 of the run's 4 prompts
    assert metrics["guidance/L1.00/reward_cumulative"] == 0.0  # everything is graded wrong here


def test_adaptive_guidance_statistics_by_hand():
    schedule = AdaptiveGuidance(ema_decay=0.5)  # levels 0.25, 0.5, 1.0
    # step 1 (over all ranks): 4 prompts; 2 reached L0.25 with 4 samples rewarded 1 + 0 + 0 + 0, 1 reached L0.5
    # (1 sample, reward 1), none L1.0
    first = schedule.update([[2, 4, 1.0, 4], [1, 4, 1.0, 1], [0, 4, 0.0, 0]])
    assert first["guidance/L0.25/triggered"] == 0.5 and first["guidance/L0.25/reward"] == 0.25
    assert first["guidance/L0.25/triggered_ema"] == 0.5  # the moving average starts at the first value
    assert first["guidance/L1.00/triggered"] == 0.0 and "guidance/L1.00/reward" not in first  # no sample there
    # step 2: 4 prompts, all reached L0.25, whose 8 samples got 4 right
    second = schedule.update([[4, 4, 4.0, 8], [0, 4, 0.0, 0], [0, 4, 0.0, 0]])
    assert second["guidance/L0.25/triggered_ema"] == 0.5 * 0.5 + 0.5 * 1.0
    assert second["guidance/L0.25/reward_ema"] == 0.5 * 0.25 + 0.5 * 0.5
    # over the run: 6 of 8 prompts reached L0.25, whose 12 samples got 5 right; L0.5: 1 of 8, 1 of 1 right
    assert second["guidance/L0.25/triggered_cumulative"] == 6 / 8
    assert second["guidance/L0.25/reward_cumulative"] == 5 / 12
    assert second["guidance/L0.50/triggered_cumulative"] == 1 / 8 and second["guidance/L0.50/reward_cumulative"] == 1


@pytest.mark.parametrize(
    "build",
    [
        lambda: FixedPrefix(prefix_ratio=0.0),
        lambda: FixedPrefix(guided_samples=9),
        lambda: CosineHint(anneal_steps=0),
        lambda: LuffyGuidance(group_size=1),
        lambda: AdaptiveGuidance(ema_decay=1.0),
        lambda: AdaptiveGuidance(sizes=[4, 4], thresholds=[-1.0], prefix_ratios=[0.0, 0.5]),
    ],
)
def test_bad_arguments_fail_at_construction(build):
    with pytest.raises(ValueError):
        build()


def test_two_schedules_in_one_run_is_an_error(source):
    module = make_module(source, rollout=ScriptedEngine([5, 6]), reward=AlwaysWrong())
    trainer = make_trainer(callbacks=[LuffyGuidance(), AdaptiveGuidance()])
    with pytest.raises(ValueError, match="LuffyGuidance and AdaptiveGuidance both write the module setting `guidance`"):
        trainer.fit(module, datamodule=make_data(source))
