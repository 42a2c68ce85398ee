"""`trapo export`: a checkpoint's policy as a plain Hugging Face folder (issue 3).

The checkpoints here are written in the layouts Lightning writes, from a tiny policy whose weights were moved away
from its starting folder (as training would): a single `.ckpt` file (`state_dict` with `policy.*` keys), and a
`torch.distributed.checkpoint` folder (what `ModelParallelStrategy` writes, written here in one process). Real
checkpoints of real runs, sharded over 2 ranks, are exported in tests/test_fsdp.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from trapo_lightning.cli import export_cli, main
from trapo_lightning.export import export_policy
from trapo_lightning.models import TinyRandomQwen2

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
PROBE = torch.tensor([list(range(5, 37))])


@pytest.fixture(scope="module")
def trained(tiny_policy_dir):
    """The tiny policy with every weight moved, as after training, and its logits on a probe input."""
    model = tiny_policy_dir.load_model().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
        logits = model(input_ids=PROBE).logits
    return model, logits


def lightning_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"policy.{k}": v.clone() for k, v in model.state_dict().items()}


def probe_logits(folder: str | Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids=PROBE).logits


@pytest.mark.slow
def test_trapo_export_writes_a_single_file_checkpoint_as_a_hugging_face_folder(trained, tiny_policy_dir, tmp_path):
    model, logits = trained
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": lightning_state(model), "global_step": 3, "trapo": {"policy_version": 3}}, checkpoint)
    command = [str(Path(sys.executable).with_name("trapo")), "export", "--config", str(TINY),
               "--model.policy.init_args.path", str(tiny_policy_dir.resolve()),
               "--ckpt_path", str(checkpoint), "--out", str(tmp_path / "hf")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                            env=dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "args parameter" not in result.stderr  # Lightning's warning about args besides a command line
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    assert torch.equal(probe_logits(tmp_path / "hf"), logits)
    tokenizer, source = AutoTokenizer.from_pretrained(tmp_path / "hf"), tiny_policy_dir.load_tokenizer()
    assert tokenizer.get_vocab() == source.get_vocab() and tokenizer.chat_template == source.chat_template


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process writes it here, on purpose
def test_a_sharded_checkpoint_folder_exports_in_one_process(trained, tiny_policy_dir, tmp_path):
    model, logits = trained
    state = {"state_dict": lightning_state(model), "optimizer_0": {"state": {"step": torch.tensor(3.0)}}}
    dcp.save(state, checkpoint_id=tmp_path / "last.ckpt", no_dist=True)
    out = export_policy(tiny_policy_dir, tmp_path / "last.ckpt", tmp_path / "hf")
    assert torch.equal(probe_logits(out), logits)


def test_dtype_sets_the_saved_weights_dtype(trained, tiny_policy_dir, tmp_path):
    model, logits = trained
    torch.save({"state_dict": lightning_state(model)}, tmp_path / "last.ckpt")
    out = export_policy(tiny_policy_dir, tmp_path / "last.ckpt", tmp_path / "hf", dtype="bfloat16")
    with safe_open(out / "model.safetensors", framework="pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"BF16"}
    assert torch.allclose(probe_logits(out).float(), logits, atol=0.1)  # bf16 weights: close, not equal


def test_a_checkpoint_of_another_model_is_refused_with_the_reason(tiny_policy_dir, tmp_path):
    other = TinyRandomQwen2(path=str(tmp_path / "other"), hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                            intermediate_size=64, max_position_embeddings=512)  # wider than the config's policy
    torch.save({"state_dict": lightning_state(other.load_model())}, tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match="not the model that was trained"):
        export_policy(tiny_policy_dir, tmp_path / "last.ckpt", tmp_path / "hf")


def test_a_checkpoint_without_every_policy_weight_is_refused(trained, tiny_policy_dir, tmp_path):
    state = lightning_state(trained[0])
    del state["policy.model.layers.1.mlp.up_proj.weight"]
    torch.save({"state_dict": state}, tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match="lacks policy weights.*layers.1.mlp.up_proj"):
        export_policy(tiny_policy_dir, tmp_path / "last.ckpt", tmp_path / "hf")


def test_a_missing_checkpoint_says_what_to_pass(tiny_policy_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="pass a .ckpt file or a sharded checkpoint folder"):
        export_policy(tiny_policy_dir, tmp_path / "nothing.ckpt", tmp_path / "hf")


def export_args(tiny_policy_dir, checkpoint, out) -> list[str]:
    return ["--config", str(TINY), "--model.policy.init_args.path", str(tiny_policy_dir.resolve()),
            "--ckpt_path", str(checkpoint), "--out", str(out)]


def test_export_does_not_warn_about_its_own_command_line(trained, tiny_policy_dir, tmp_path, monkeypatch):
    torch.save({"state_dict": lightning_state(trained[0])}, tmp_path / "last.ckpt")
    args = export_args(tiny_policy_dir, tmp_path / "last.ckpt", tmp_path / "hf")
    monkeypatch.setattr(sys, "argv", ["trapo", "export", *args])  # as `trapo export ...` runs it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_cli(args)
    assert not [w for w in caught if "args parameter" in str(w.message)]
    assert torch.equal(probe_logits(tmp_path / "hf"), trained[1])


def test_exporting_a_checkpoint_of_another_model_is_one_line(tiny_policy_dir, tmp_path, capsys):
    other = TinyRandomQwen2(path=str(tmp_path / "other"), hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                            intermediate_size=64, max_position_embeddings=512)
    torch.save({"state_dict": lightning_state(other.load_model())}, tmp_path / "last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *export_args(tiny_policy_dir, tmp_path / "last.ckpt", tmp_path / "hf")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("trapo: error: ") and "not the model that was trained" in err
