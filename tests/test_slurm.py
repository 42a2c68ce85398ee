"""Multi-node SLURM (issue 3): slurm/trapo.sbatch's command, run under a faked SLURM allocation.

The sbatch script runs with a fake `srun` that records its arguments; those arguments then go to the `trapo` CLI
(`build_cli(..., run=False)`) with the environment srun would give one task: task 11 of 2 nodes x 8 GPUs. Lightning
must resolve the ranks from SLURM's variables as it would on the cluster; no process group is started.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch.distributed
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import ModelParallelStrategy

from helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from trapo_lightning.callbacks import PreemptionCheckpoint
from trapo_lightning.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "slurm" / "trapo.sbatch"
CONFIG = ROOT / "configs" / "trapo_qwen2.5_math_7b.yaml"
NODES, GPUS_PER_NODE = 2, 8
ALLOCATION = {  # what sbatch --nodes 2 with the script's #SBATCH lines sets for the whole job
    "SLURM_JOB_ID": "734242",
    "SLURM_JOB_NAME": "trapo",
    "SLURM_JOB_NUM_NODES": str(NODES),
    "SLURM_NNODES": str(NODES),
    "SLURM_NTASKS": str(NODES * GPUS_PER_NODE),
    "SLURM_NTASKS_PER_NODE": str(GPUS_PER_NODE),
    "SLURM_NODELIST": "gpu[017-018]",
}
TASK = {"SLURM_PROCID": "11", "SLURM_LOCALID": "3", "SLURM_NODEID": "1"}  # what srun adds for one task


def srun_arguments(tmp_path: Path) -> list[str]:
    """Run the sbatch script with a fake srun on PATH; return what it passed to srun."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun_args"
    fake = bin_dir / "srun"
    fake.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(0o755)
    env = dict(os.environ, **ALLOCATION, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", str(SBATCH), str(CONFIG), "--trainer.max_steps", "7"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return record.read_text().splitlines()


@pytest.fixture
def slurm_task(monkeypatch, tmp_path):
    """One task's SLURM environment; Lightning writes MASTER_ADDR / MASTER_PORT, restored afterwards."""
    monkeypatch.chdir(tmp_path)
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.setenv(key, "")  # records the original state, so teardown restores it
        monkeypatch.delenv(key)
    for key, value in {**ALLOCATION, **TASK}.items():
        monkeypatch.setenv(key, value)


def test_the_sbatch_command_resolves_slurm_ranks_in_lightning(slurm_task, tmp_path):
    args = srun_arguments(tmp_path)
    assert args[:3] == ["--kill-on-bad-exit=1", "trapo", "fit"]
    fit_args = args[3:]
    where = fit_args.index("--ckpt_path")  # a `fit` argument: resume from the newest checkpoint, if any
    assert fit_args[where + 1] == "last"
    del fit_args[where : where + 2]
    assert fit_args[-2:] == ["--trainer.max_steps", "7"]  # extra arguments reach trapo fit

    cli = build_cli(fit_args, run=False)
    trainer = cli.trainer
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and isinstance(trainer.strategy, ModelParallelStrategy)
    assert (trainer.global_rank, trainer.world_size) == (11, 16)
    assert (trainer.node_rank, trainer.local_rank) == (1, 3)
    assert (trainer.num_nodes, trainer.num_devices) == (NODES, GPUS_PER_NODE)
    assert environment.main_address == "gpu017"  # the first host of SLURM_NODELIST
    assert environment.main_port == 15000 + 4242  # from the job id's last 4 digits: the same on every task
    assert cli.datamodule.prompts_per_step * trainer.world_size == 128  # the paper's prompts per step
    assert trainer.max_steps == 7
    assert not torch.distributed.is_initialized()


def test_the_sbatch_script_asks_for_the_warning_signal_and_requeueing():
    lines = SBATCH.read_text().splitlines()
    assert "#SBATCH --signal=USR1@120" in lines and "#SBATCH --requeue" in lines
    assert "#SBATCH --ntasks-per-node=8" in lines and "#SBATCH --gpus-per-node=8" in lines


def test_under_slurm_sigusr1_reaches_only_the_preemption_callback(slurm_task):
    """Lightning installs its own SLURM auto-requeue handler for SIGUSR1 only where none exists; the callback's,
    installed at setup, comes first, so a warning signal gives one checkpoint and one requeue, not two."""
    cli = build_cli(["--config", str(CONFIG)], run=False)
    trainer = cli.trainer
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    callback = next(c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint))
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        callback.setup(trainer, cli.model, "fit")
        trainer._signal_connector.register_signal_handlers()  # what Trainer.fit does after the setup hooks
        assert signal.getsignal(signal.SIGUSR1) == callback._on_signal
    finally:
        trainer._signal_connector.teardown()
        callback.teardown(trainer, cli.model, "fit")
        for signum, handler in previous.items():
            signal.signal(signum, handler)
