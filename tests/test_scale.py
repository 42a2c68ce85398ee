"""Simulated scale: 4 gloo ranks on a 2 x 2 mesh (data parallel x FSDP2 shard, HSDP) against one process.

How the processes are started: `trapo fit` as a subprocess with `ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=2)` and `devices: 4` (Lightning's launcher re-runs the command line for ranks 1-3, which meet
over gloo), as test_fsdp.py does with 2. Each rank's numbers are written by tests/distributed/step_recorder.py.
The single process runs the same config in this process (`build_cli`), which saves a launch.

The whole TRAPO step runs: AdaptiveGuidance's micro-groups, real math-verify rewards, the sharded reference model
for AdaptiveKL's KL term, AdaptiveAlpha, the entropy bonus and the `token_mean` normaliser, ValidateOnStart and
CompletionsTable. Rollouts come from `helpers.ScriptedEngine` (every request gets `\\boxed{7}`), wrapped in the
GatheredRollout that a sharded HF engine uses: sampling is what the test is not about, and the HF engine mixes the
rank into its seed by design, so its samples on 4 ranks cannot be those of one process.

The data make the ranks measure different things: 4 training prompts, 2 whose answer is 7. A rank holding one of
those gets 8 correct samples, no guidance and no expert tokens; a rank holding another escalates to every guided
level. So the ranks' loss-token counts, KL and trust-region shares differ, and only the pooled, token-weighted
numbers give the single process's loss (the token-mean divides by all ranks' tokens) and its decisions.

The 4-rank run is stopped after step 1 by SIGUSR1 on rank 3 alone (PreemptionCheckpoint, listed first) and resumed
with `--ckpt_path last` for step 2.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.checkpoint import FileSystemReader

from helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from test_fsdp import TINY, WORKERS, run, steps
from trapo_lightning.cli import build_cli
from trapo_lightning.schedules import adaptive_kl_coef, pooled_mean

pytestmark = pytest.mark.distributed
RANKS = 4

TRAIN = [(3, 4), (1, 2), (5, 2), (4, 5)]  # answers 7, 3, 7, 9
VAL = [(6, 1), (2, 2), (0, 7), (8, 1)]  # 7, 4, 7, 9

# Measured, CPU float32, 2 steps, 4 ranks against 1 process: loss 6e-8 relative (summation order), grad norm 3e-7,
# KL coefficient 1.3e-7, the probe logits after both updates 1.2e-7 apart. The bounds leave 30x headroom or more.
LOSS_RTOL = 1e-6
GRAD_NORM_RTOL = 1e-5
DECISION_RTOL = 1e-5
LOGITS_ATOL = 1e-5
# The controllers' targets sit where their rules do not clip, so a wrongly pooled measurement changes the decision:
# step 2's per-token KL is about 0.006 on every rank (kl / target - 1 within +-0.2); the share of expert tokens
# outside the trust region is 1.0 on the ranks that have any (a random policy puts every token below alpha = 0.1),
# so the pooled share is 1.0 (error +0.1), while the unweighted mean over ranks, 0.5, would give -0.4, clipped.
KL_TARGET = 0.006
OUTSIDE_TARGET = 0.9
KL_KEY = "AdaptiveKL{'writes': ['loss.kl_coef']}"


def arithmetic_rows(pairs) -> list[dict]:
    return [{"problem": f"Compute {a} + {b}.", "solution": f"{a}+{b}: {a}+{b}={a + b}, so {a + b}\n\n\\boxed{{{a + b}}}",
             "answer": str(a + b)} for a, b in pairs]


def write_config(folder: Path, policy_dir: Path, world_size: int, continuation: list[int]) -> Path:
    for name, pairs in (("train", TRAIN), ("val", VAL)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in arithmetic_rows(pairs)))
    config = yaml.safe_load(TINY.read_text())
    config["model"]["policy"]["init_args"]["path"] = str(policy_dir)
    config["model"]["rollout"] = {"class_path": "helpers.ScriptedEngine", "init_args": {"token_ids": continuation}}
    config["model"]["loss"] = {"class_path": "trapo_lightning.losses.TrapoLoss",
                               "init_args": {"normalizer": "token_mean", "entropy_coef": 0.01}}
    config["data"]["source"] = {"class_path": "trapo_lightning.data.sources.JsonlSource",
                                "init_args": {"train_files": [str(folder / "train.jsonl")],
                                              "val_files": [str(folder / "val.jsonl")]}}
    config["data"].update(prompts_per_step=len(TRAIN) // world_size, val_batch_size=len(VAL) // world_size)
    config["trainer"].update(devices=world_size, max_steps=2, logger=False, default_root_dir=str(folder))
    callbacks = [
        {"class_path": "trapo_lightning.callbacks.PreemptionCheckpoint", "init_args": {"requeue": False}},
        {"class_path": "trapo_lightning.callbacks.AdaptiveGuidance"},
        {"class_path": "trapo_lightning.callbacks.AdaptiveKL", "init_args": {"target": KL_TARGET, "initial": 0.05,
                                                                             "horizon": 1.0}},
        {"class_path": "trapo_lightning.callbacks.AdaptiveAlpha", "init_args": {"target_outside": OUTSIDE_TARGET}},
        {"class_path": "trapo_lightning.callbacks.ValidateOnStart"},
        {"class_path": "trapo_lightning.callbacks.CompletionsTable", "init_args": {"val_max_rows": None}},
        {"class_path": "step_recorder.RecordSteps", "init_args": {"folder": str(folder / "records")}},
        # the folder `last` is looked for in; it saves nothing itself, so last.ckpt is the stop signal's
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(folder / "checkpoints"), "save_top_k": 0}},
    ]
    if world_size > 1:
        config["trainer"]["strategy"] = {
            "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
            "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 2},
        }
        callbacks.insert(-1, {"class_path": "faults.SignalAtStep", "init_args": {"step": 0, "rank": RANKS - 1}})
    config["trainer"]["callbacks"] = callbacks
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_policy_dir, tiny_tokenizer) -> dict[str, Path]:
    policy_dir = tiny_policy_dir.resolve()
    continuation = tiny_tokenizer("\\boxed{7}", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    single = tmp_path_factory.mktemp("single")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(WORKERS))
        patch.chdir(single)
        build_cli(["fit", "--config", str(write_config(single, policy_dir, 1, continuation))])
    mesh = tmp_path_factory.mktemp("mesh")
    config = write_config(mesh, policy_dir, RANKS, continuation)
    trapo = str(Path(sys.executable).with_name("trapo"))
    run([trapo, "fit", "--config", str(config)], cwd=mesh)  # stopped by the signal after step 1
    run([trapo, "fit", "--config", str(config), "--ckpt_path", "last"], cwd=mesh)
    return {"single": single, "mesh": mesh}


def records(runs: dict[str, Path]) -> tuple[dict[int, dict], list[dict[int, dict]]]:
    return steps(runs["single"], 0), [steps(runs["mesh"], r) for r in range(RANKS)]


def val_records(folder: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (folder / "records" / f"val_rank{rank}.jsonl").read_text().splitlines()]


def test_the_ranks_see_different_data_and_measure_different_things(runs):
    single, ranks = records(runs)
    for step in (1, 2):
        prompts = [rows[step]["prompts"] for rows in ranks]
        assert sorted(p for share in prompts for p in share) == sorted(single[step]["prompts"])  # one each
        metrics = [rows[step]["metrics"] for rows in ranks]
        loss_tokens = [m["train/expert_tokens"] + m["train/rl_tokens"] for m in metrics]
        assert len(set(loss_tokens)) > 1, loss_tokens  # what a per-rank token mean would get wrong
        assert 0 in [m["train/expert_tokens"] for m in metrics]  # a rank without expert tokens, measuring no share
    # step 1 starts from the reference (KL 0 everywhere); step 2's KL differs by rank
    assert len({rows[2]["metrics"]["train/kl_per_token"] for rows in ranks}) == RANKS


def test_four_ranks_take_the_single_process_step_under_the_token_mean(runs):
    single, ranks = records(runs)
    assert [rows[1]["world_size"] for rows in ranks] == [RANKS] * RANKS
    for step in (1, 2):  # step 2 after the resume
        # each rank's loss is its tokens' sum over the mean count per rank, so their mean is the global token mean
        loss = sum(rows[step]["metrics"]["train/loss"] for rows in ranks) / RANKS
        assert loss == pytest.approx(single[step]["metrics"]["train/loss"], rel=LOSS_RTOL)
        for rows in ranks:  # the clipped norm is of the whole gradient, the same on every rank
            assert rows[step]["metrics"]["train/grad_norm"] == pytest.approx(
                single[step]["metrics"]["train/grad_norm"], rel=GRAD_NORM_RTOL)
    assert single[2]["metrics"]["train/kl"] > 0  # the sharded reference took part in step 2's loss
    sharded = torch.load(runs["mesh"] / "records" / "probe_logits.pt", weights_only=True)["logits"]
    alone = torch.load(runs["single"] / "records" / "probe_logits.pt", weights_only=True)["logits"]
    assert torch.allclose(sharded, alone, atol=LOGITS_ATOL, rtol=0)  # the weights after both updates


def test_the_ranks_agree_on_every_decision_and_it_is_the_single_process_one(runs):
    single, ranks = records(runs)
    for step in (1, 2):
        for rows in ranks:
            # what the tuning callbacks wrote for the step, and their state after it
            assert rows[step]["settings"] == pytest.approx(single[step]["settings"], rel=DECISION_RTOL)
            assert _close(rows[step]["states"], single[step]["states"])
            logged = {k: v for k, v in rows[step]["metrics"].items() if k.startswith(("guidance/", "kl/", "trust_"))}
            assert logged == pytest.approx({k: single[step]["metrics"][k] for k in logged}, rel=DECISION_RTOL)
    # the measurements behind step 2's decisions, pooled by token counts as the callbacks do
    metrics = [rows[2]["metrics"] for rows in ranks]
    kl = sum(m["train/kl_per_token"] * m["train/rl_tokens"] for m in metrics) / sum(m["train/rl_tokens"] for m in metrics)
    assert kl == pytest.approx(single[2]["metrics"]["train/kl_per_token"], rel=DECISION_RTOL)
    assert abs(kl / KL_TARGET - 1) < 0.2  # the rule's unclipped range: the pooling decides the coefficient
    coef = adaptive_kl_coef(single[2]["settings"]["kl_coef"], kl, KL_TARGET, 1.0)
    assert ranks[0][2]["states"][KL_KEY]["coef"] == pytest.approx(coef, rel=DECISION_RTOL)
    unweighted = sum(m["train/kl_per_token"] for m in metrics) / RANKS
    assert adaptive_kl_coef(single[2]["settings"]["kl_coef"], unweighted, KL_TARGET, 1.0) != pytest.approx(
        coef, rel=DECISION_RTOL)  # the unweighted mean over ranks would have decided otherwise
    shares = [(m["train/outside_trust_region"], m["train/expert_tokens"]) for m in metrics]
    assert pooled_mean(*zip(*shares)) == 1.0 != sum(share for share, _ in shares) / RANKS
    assert ranks[0][2]["settings"]["trust_region_alpha"] == pytest.approx(0.1 * math.exp(-0.1))  # step 1: 1.0 - 0.9


def test_one_ranks_stop_signal_stops_every_rank_after_the_same_step_with_a_whole_checkpoint(runs):
    single, ranks = records(runs)
    assert [sorted(rows) for rows in ranks] == [[1, 2]] * RANKS  # step 1 in the first run, step 2 after the resume
    folder = runs["mesh"] / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in folder.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(RANKS)]
    keys = set(FileSystemReader(folder).read_metadata().state_dict_metadata)
    assert "state_dict.policy.model.layers.0.mlp.up_proj.weight" in keys
    assert not any("reference" in k for k in keys)
    meta = torch.load(folder / "meta.pt", weights_only=True)
    assert meta["global_step"] == 1
    # written after every other callback's step end, though listed first: the states the step left
    for key, state in single[1]["states"].items():
        assert _close(meta["callbacks"][key], state)


def test_validation_at_start_runs_through_the_loop_on_every_rank_and_not_again_on_resume(runs):
    alone = {row["global_step"]: row["metrics"] for row in val_records(runs["single"], 0)}
    assert sorted(alone) == [0, 2]  # ValidateOnStart, then val_check_interval
    for rank in range(RANKS):
        rows = val_records(runs["mesh"], rank)
        at = [row["global_step"] for row in rows]
        # step 0 once (not again on resume); step 1 is Lightning validating when the stop signal ends the run
        assert at == [0, 1, 2]
        for row in rows:
            if row["global_step"] in alone:
                assert row["metrics"] == pytest.approx(alone[row["global_step"]])
    assert alone[0]["val/accuracy"] == 0.5  # the two problems answered 7, of 4
    answers = [json.loads(line) for line in (runs["mesh"] / "val_completions.jsonl").read_text().splitlines()]
    assert sorted((row["step"], row["problem"]) for row in answers if row["step"] == 0) == sorted(
        (0, row["problem"]) for row in arithmetic_rows(VAL))  # step 0's answers, gathered from every rank


def _close(state, expected) -> bool:
    """Nested dicts of numbers equal up to DECISION_RTOL."""
    if isinstance(expected, dict):
        return state.keys() == expected.keys() and all(_close(state[k], expected[k]) for k in expected)
    return state == pytest.approx(expected, rel=DECISION_RTOL)
