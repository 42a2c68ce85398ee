"""`trapo plan`: the memory arithmetic by hand, the verdict, and the configs parsed as `fit` parses them."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from trapo_lightning.cli import main, plan_cli
from trapo_lightning.plan import (
    GIB,
    ModelShape,
    RolloutShape,
    RunShape,
    kv_bytes_per_token,
    layer_activation_bytes_per_token,
    logprob_chunk_bytes,
    micro_batch_tokens,
    parameter_count,
    plan_memory,
    saved_activation_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "configs" / "model_shapes"
# h = 8, MLP 16, 2 layers, 2 heads of 4 (q = 8), 1 KV head (k = 4), vocabulary 10, tied, q/k/v biases
TINY = ModelShape(8, 16, 2, 2, 1, 4, 10, tie_word_embeddings=True, attention_bias=True)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_parameter_count_by_hand():
    # a layer: q 8x8 = 64, k and v 8x4 = 32 each, o 8x8 = 64 (192); biases 8 + 4 + 4 = 16; MLP 3 x 8 x 16 = 384;
    # two norms 2 x 8 = 16: 608. Two layers 1216; embedding 10 x 8 = 80 and final norm 8: 1304.
    assert parameter_count(TINY) == 1304
    untied = ModelShape(8, 16, 2, 2, 1, 4, 10, tie_word_embeddings=False, attention_bias=True)
    assert parameter_count(untied) == 1304 + 80  # + the LM head


@pytest.mark.parametrize("config", [
    Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=101, tie_word_embeddings=False),
    LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=77, tie_word_embeddings=True),
], ids=["qwen2", "llama"])
def test_parameter_count_matches_the_model_built_on_meta(config):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert parameter_count(ModelShape.from_config(config.to_dict())) == sum(p.numel() for p in model.parameters())


def test_the_public_qwen_shapes():
    assert round(parameter_count(ModelShape.from_file(SHAPES / "qwen2.5_math_7b.json")) / 1e9, 2) == 7.62
    assert round(parameter_count(ModelShape.from_file(SHAPES / "qwen2.5_math_1.5b.json")) / 1e9, 2) == 1.54


def test_activation_and_kv_arithmetic_by_hand():
    # bf16 (b = 2): 8h = 64, 4bh = 64, b(3q + 2k) = 2 x (24 + 8) = 64, 4bi = 128: 320 bytes a token and layer
    assert layer_activation_bytes_per_token(TINY, 2) == 320
    # without checkpointing 2 layers x 320 + final norm 4h + 3bh = 32 + 48 = 80: 720 a token
    assert saved_activation_bytes(TINY, 10, 2, checkpointing=False) == 7200
    # with checkpointing each layer keeps its input, bh = 16: 2 x 16 + 80 = 112 a token
    assert saved_activation_bytes(TINY, 10, 2, checkpointing=True) == 1120
    # keys and values: 2 x 2 layers x 1 head x 4 x 2 bytes
    assert kv_bytes_per_token(TINY, 2) == 32
    # float32: 5 copies x 4 bytes x 3 rows x 10 + the [V, H] weight gradient 10 x 8 x 4
    assert logprob_chunk_bytes(TINY, 3, 4) == 600 + 320
    # bf16 adds the logits and their gradient in bf16: (20 + 4) x 30 + 10 x 8 x 2
    assert logprob_chunk_bytes(TINY, 3, 2) == 720 + 160


def test_micro_batch_tokens_follow_the_packing_rule():
    assert micro_batch_tokens(9216, 1, None) == 9216  # one full row
    assert micro_batch_tokens(1000, 8, None) == 8000  # 8 full rows
    assert micro_batch_tokens(9216, 64, 16384) == 16384  # the budget
    assert micro_batch_tokens(9216, 1, 16384) == 9216  # at most one row
    assert micro_batch_tokens(20000, 64, 16384) == 20000  # a row over the budget goes alone


def test_fsdp_divides_the_resident_state_by_the_shard_group():
    one = plan_memory(TINY, RunShape("bf16-mixed", 1), GIB)
    eight = plan_memory(TINY, RunShape("bf16-mixed", 8), GIB)
    resident = {c.name.split(" (")[0]: c.bytes for c in one.components[:3]}
    # 1304 parameters: float32 weights 5216 bytes, gradients 5216, AdamW 2 x 5216
    assert resident == {"policy parameters": 5216, "gradients": 5216, "AdamW states, 2": 10432}
    assert [c.bytes for c in eight.components[:3]] == [652, 652, 1304]


def test_vllm_share_phases_and_kv_tokens():
    rollout = RolloutShape("vllm", rows=4, sequence_tokens=100, gpu_memory_utilization=0.5, sleeps=True)
    plan = plan_memory(TINY, RunShape("bf16-mixed", rollout=rollout), 100_000)
    vllm = plan.components[-1]
    assert vllm.bytes == 50_000 and vllm.phases == ("rollout",)  # asleep during the update
    assert plan.kv_cache_tokens == (50_000 - 1304 * 2) // 32  # minus its bf16 weights, 32 bytes a token
    assert plan.kv_tokens_needed == 400
    awake = plan_memory(TINY, RunShape("bf16-mixed", rollout=replace(rollout, sleeps=False)), 100_000)
    assert awake.components[-1].phases == ("rollout", "update")  # without sleep mode it stays in the update


def test_the_verdict_is_the_larger_phase_against_the_gpu():
    plan = plan_memory(TINY, RunShape("32-true", micro_batch_tokens=100), GIB)
    peak = plan.phase_bytes("update")
    assert plan.peak_phase == "update" and plan.peak_bytes == peak
    assert plan_memory(TINY, RunShape("32-true", micro_batch_tokens=100), peak).fits
    assert not plan_memory(TINY, RunShape("32-true", micro_batch_tokens=100), peak - 1).fits


def test_trapo_plan_on_the_embedded_default(in_tmp, capsys):
    assert plan_cli(["--config", str(ROOT / "configs" / "trapo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "reference model not loaded" in out and "rollout engine hf" in out
    assert list(in_tmp.iterdir()) == []  # the tiny model's shape is computed, not written


def test_trapo_plan_on_the_7b_config_with_overrides(in_tmp, capsys):
    config = ["--config", str(ROOT / "configs" / "trapo_qwen2.5_math_7b.yaml"),
              "--model-config", str(SHAPES / "qwen2.5_math_7b.json")]
    assert plan_cli(config) == 0
    out = capsys.readouterr().out
    assert "7.62B parameters" in out and "FSDP2 shard group 8" in out and "with checkpointing" in out
    # overrides parse as in fit: a KL coefficient loads the reference; 40 GiB GPUs do not hold it
    assert plan_cli(config + ["--model.loss.init_args.kl_coef", "0.01", "--gpu-memory-gb", "40"]) == 1
    out = capsys.readouterr().out
    assert "reference model (1/8 shard)" in out and "DOES NOT FIT" in out


def test_the_1_5b_config_fits_one_80_gib_gpu(in_tmp, capsys):
    assert plan_cli(["--config", str(ROOT / "configs" / "trapo_qwen2.5_math_1.5b_1gpu.yaml"),
                     "--model-config", str(SHAPES / "qwen2.5_math_1.5b.json")]) == 0
    assert "FSDP2 shard group 1" in capsys.readouterr().out


def test_a_placeholder_policy_path_asks_for_model_config(in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--config", str(ROOT / "configs" / "trapo_qwen2.5_math_7b.yaml")])
    assert exit_info.value.code == 1
    assert "--model-config" in capsys.readouterr().err
