"""FSDP2 through Lightning's `ModelParallelStrategy` (issue 3), on 2 CPU processes with gloo.

How the processes are started: `trapo fit` as a subprocess, with `trainer.strategy: {class_path:
lightning.pytorch.strategies.ModelParallelStrategy}`, `accelerator: cpu` and `devices: 2` in its config (on the command
line: `--trainer.strategy.class_path lightning.pytorch.strategies.ModelParallelStrategy --trainer.devices 2`).
Lightning's launcher re-runs the same command line for rank 1 and the ranks meet over gloo, as they would for a
user. The sharded rollout check is a worker script under tests/distributed/, started with
`python -m torch.distributed.run --standalone --nproc_per_node 2`. Each rank's numbers are written by a test
callback (tests/distributed/step_recorder.py).

Same data on 1 and 2 ranks: the train split has 4 prompts; one process takes all 4 per step, two ranks take 2 each
of the same per-epoch permutation (asserted). Rollouts come from `helpers.ScriptedEngine` (every request gets the
same continuation), so samples do not depend on which rank drew them; rewards are the real math-verify ones. With
the paper's constant normaliser each rank's loss is its sequences' sum / (C * its 16 sequences), so the 2-rank
step's loss is the mean of the two ranks' losses, and FSDP2's gradient (the mean over ranks) is the single-process
gradient. A KL coefficient makes the sharded reference part of the loss.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from helpers import ScriptedEngine, one_torch_thread  # noqa: F401 (autouse fixture)
from trapo_lightning.cli import export_cli
from trapo_lightning.rollout import RolloutRequest, SamplingParams
from trapo_lightning.sharding import GatheredRollout

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
WORKERS = ROOT / "tests" / "distributed"
pytestmark = pytest.mark.distributed

# Measured on CPU, float32 (2 steps): 2-rank vs 1-process loss 2e-10 apart (4e-8 relative; summation order), grad
# norms and KL 3e-7 relative; the probe logits after both updates 9e-8 apart. The bounds leave ~30x headroom.
LOSS_RTOL = 1e-6
GRAD_NORM_RTOL = 1e-5
LOGITS_ATOL = 1e-5


def clean_env() -> dict[str, str]:
    """This process's environment without any launcher's or scheduler's rank variables (CI may run under SLURM)."""
    launcher = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in launcher}
    tests = str(ROOT / "tests")
    return dict(env, OMP_NUM_THREADS="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=os.pathsep.join(filter(None, [tests, str(WORKERS), env.get("PYTHONPATH")])))


def run(command: list[str], cwd: Path, timeout: float = 240) -> str:
    """Run to the end; on a timeout (a collective that never matched) kill the whole process group we started."""
    process = subprocess.Popen(command, cwd=cwd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{command[:3]} did not finish in {timeout} s (a hang?):\n{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]
    return output


def write_config(folder: Path, policy_dir: Path, world_size: int, max_steps: int, continuation: list[int]) -> Path:
    config = yaml.safe_load(TINY.read_text())
    config["model"]["policy"]["init_args"]["path"] = str(policy_dir)  # written before launch: no rank races for it
    config["model"]["rollout"] = {"class_path": "helpers.ScriptedEngine", "init_args": {"token_ids": continuation}}
    config["model"]["loss"] = {"class_path": "trapo_lightning.losses.TrapoLoss", "init_args": {"kl_coef": 0.05}}
    config["data"]["source"]["init_args"]["train_size"] = 4
    config["data"]["prompts_per_step"] = 4 // world_size
    config["trainer"].update(devices=world_size, max_steps=max_steps, limit_val_batches=0, logger=False)
    if world_size > 1:  # and the memory options, which must not change the step
        config["trainer"]["strategy"] = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}
        config["model"].update(activation_checkpointing=True, max_tokens_per_micro_batch=600)
    config["trainer"]["callbacks"] = [
        {"class_path": "step_recorder.RecordSteps", "init_args": {"folder": "records"}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "checkpoints", "save_last": True, "every_n_train_steps": 1}},
    ]
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def trapo_fit(folder: Path, config: Path, *args: str) -> str:
    return run([str(Path(sys.executable).with_name("trapo")), "fit", "--config", str(config), *args], cwd=folder)


def steps(folder: Path, rank: int) -> dict[int, dict]:
    """global_step after the update -> that rank's record; a step recorded twice fails."""
    rows: dict[int, dict] = {}
    for line in (folder / "records" / f"steps_rank{rank}.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["global_step"] not in rows, f"rank {rank} recorded step {row['global_step']} twice"
        rows[row["global_step"]] = row
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_policy_dir, tiny_tokenizer) -> dict[str, Path]:
    """The same 2 TRAPO steps on 1 process, and on 2 ranks stopped after step 1 and resumed from `last`."""
    policy_dir = tiny_policy_dir.resolve()
    continuation = tiny_tokenizer("\\boxed{7}", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    single = tmp_path_factory.mktemp("single")
    trapo_fit(single, write_config(single, policy_dir, 1, 2, continuation))
    sharded = tmp_path_factory.mktemp("sharded")
    trapo_fit(sharded, write_config(sharded, policy_dir, 2, 1, continuation))
    trapo_fit(sharded, write_config(sharded, policy_dir, 2, 2, continuation), "--ckpt_path", "last")
    return {"single": single, "sharded": sharded}


def test_sharded_rollouts_match_one_device_with_unequal_calls_per_rank(tmp_path, tiny_policy_dir):
    out = tmp_path / "out"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKERS / "sharded_generate.py"), "--model", str(tiny_policy_dir.resolve()), "--out", str(out)],
        cwd=tmp_path)
    for rank, calls in ((0, 1), (1, 2)):  # rank 1 also made an empty call, which generates nothing
        result = json.loads((out / f"result_rank{rank}.json").read_text())
        assert result["same_tokens"] and result["num_generations"] == (2, 4)[rank]
        assert result["logprob_max_diff"] < 1e-5
        # KV-cache decoding: one prefill per generate call, then one new token per forward
        assert result["generate_calls"] == calls
        assert sum(length != 1 for length in result["decode_lengths"]) == calls
        assert result["decode_lengths"].count(1) >= 10
        assert result["resharded"]
        assert result["loss_diff"] < 1e-6 and result["grad_max_diff"] < 1e-6
        assert result["grad_norm"] == pytest.approx(result["plain_grad_norm"], rel=GRAD_NORM_RTOL)


def test_each_rank_loads_only_its_shards(tmp_path):
    """A 44M-parameter float32 model (178 MB) read straight into 2 ranks' shards: each rank's peak RSS grows by its
    half plus about one tensor (the largest, 16 MB, exists whole once while the model is built on the meta device),
    not by the whole model as with the load before issue 11 (from_pretrained on every rank, then shard).
    Measured: +106 MB per rank (0.60 of the model; its shards are 89 MB)."""
    config = Qwen2Config(vocab_size=8_000, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKERS / "sharded_load.py"), "--model", str(tmp_path / "model"), "--out", str(out)], cwd=tmp_path)
    largest = config.vocab_size * config.hidden_size * 4
    for rank in (0, 1):
        result = json.loads((out / f"result_rank{rank}.json").read_text())
        assert result["logits_max_diff"] < 1e-5
        assert result["local_bytes"] == pytest.approx(result["model_bytes"] / 2, rel=0.01)
        assert result["peak_rss_growth"] < result["local_bytes"] + 2 * largest, result
        assert result["peak_rss_growth"] < 0.75 * result["model_bytes"], result


class WeightCopyEngine(ScriptedEngine):
    """Stands for an engine with its own weight copy (vLLM)."""

    @property
    def weights_version(self) -> int:
        return 0


def test_gathered_rollout_refuses_engines_with_their_own_weights_and_sampling_before_wake():
    with pytest.raises(ValueError, match="holds its own weight copy"):
        GatheredRollout(WeightCopyEngine([1]))
    engine = GatheredRollout(ScriptedEngine([1]))
    with pytest.raises(RuntimeError, match="before bind"):
        engine.wake()
    with pytest.raises(RuntimeError, match=r"call wake\(\) on every rank first"):
        engine.generate([RolloutRequest((1, 2), 4)], SamplingParams())


def test_a_two_rank_step_takes_the_single_process_step(runs):
    single = steps(runs["single"], 0)[1]
    ranks = [steps(runs["sharded"], r)[1] for r in (0, 1)]
    assert [row["world_size"] for row in ranks] == [2, 2]
    # the same data: the ranks' prompts together are the single process's prompts
    assert sorted(ranks[0]["prompts"] + ranks[1]["prompts"]) == sorted(single["prompts"])
    assert not set(ranks[0]["prompts"]) & set(ranks[1]["prompts"])
    sharded_loss = (ranks[0]["metrics"]["train/loss"] + ranks[1]["metrics"]["train/loss"]) / 2
    assert sharded_loss == pytest.approx(single["metrics"]["train/loss"], rel=LOSS_RTOL)
    assert single["metrics"]["train/kl"] == 0.0  # step 1: policy == reference; step 2 below moves it
    for row in ranks:  # the clipped norm is of the whole gradient, the same on every rank
        assert row["metrics"]["train/grad_norm"] == pytest.approx(single["metrics"]["train/grad_norm"],
                                                                  rel=GRAD_NORM_RTOL)


def test_the_sharded_checkpoint_holds_shards_metadata_and_no_reference(runs):
    folder = runs["sharded"] / "checkpoints" / "last.ckpt"
    assert folder.is_dir() and sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    keys = set(FileSystemReader(folder).read_metadata().state_dict_metadata)
    assert "state_dict.policy.model.layers.0.mlp.up_proj.weight" in keys
    assert any(k.startswith("optimizer_0.state.policy.") for k in keys)
    assert not any(".reference." in k or k.startswith("state_dict.reference") for k in keys)
    meta = torch.load(folder / "meta.pt", weights_only=True)
    assert meta["global_step"] == 2
    assert meta["trapo"]["policy_version"] == 2 and meta["trapo"]["train_batches"] == 2
    assert meta["TrapoDataModule"]["train_position"]  # where the data stream resumes


def test_a_sharded_run_resumes_from_last_and_continues_like_one_process(runs):
    single = steps(runs["single"], 0)
    ranks = [steps(runs["sharded"], r) for r in (0, 1)]
    assert [sorted(rows) for rows in ranks] == [[1, 2], [1, 2]]  # step 2 ran once, after the resume
    sharded_loss = (ranks[0][2]["metrics"]["train/loss"] + ranks[1][2]["metrics"]["train/loss"]) / 2
    assert sharded_loss == pytest.approx(single[2]["metrics"]["train/loss"], rel=LOSS_RTOL)
    kl = (ranks[0][2]["metrics"]["train/kl"] + ranks[1][2]["metrics"]["train/kl"]) / 2
    assert kl > 0 and kl == pytest.approx(single[2]["metrics"]["train/kl"], rel=GRAD_NORM_RTOL)
    # weights after two updates, the second after restoring the sharded weights and AdamW moments
    sharded_logits = torch.load(runs["sharded"] / "records" / "probe_logits.pt", weights_only=True)["logits"]
    single_logits = torch.load(runs["single"] / "records" / "probe_logits.pt", weights_only=True)["logits"]
    assert torch.allclose(sharded_logits, single_logits, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("run", ["sharded", "single"], ids=["sharded-folder", "single-file"])
def test_trapo_export_gives_the_trained_model(runs, run, tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.syspath_prepend(str(WORKERS))  # export parses the whole training config, its test callback included
    checkpoint = runs[run] / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() == (run == "sharded")
    out = export_cli(["--config", str(runs[run] / "config.yaml"), "--ckpt_path", str(checkpoint),
                      "--out", str(tmp_path / "hf")])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    probe = torch.load(runs[run] / "records" / "probe_logits.pt", weights_only=True)
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    assert torch.equal(logits, probe["logits"])  # the same float32 weights and math as the trained policy's forward
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
