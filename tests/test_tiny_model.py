"""The embedded policy: a tiny random Qwen2 and its BPE tokenizer trained in code, written as an ordinary HF folder.

Everything goes through `from_pretrained` on the written folder, the path a user's own model takes, so these tests
also catch a tokenizer that is right in memory but comes back different from disk.
"""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trapo_lightning.data.synthetic import SyntheticArithmetic
from trapo_lightning.models import PretrainedFolder, TinyRandomQwen2
from trapo_lightning.models.tokenizer import build_tiny_tokenizer
from trapo_lightning.models.sources import SPEC_FILE

SMALL = dict(
    hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, max_position_embeddings=512
)


def test_folder_holds_a_loadable_hf_model(tiny_policy_dir):
    folder = tiny_policy_dir.resolve()
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", SPEC_FILE} <= names
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = model.config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("qwen2", 32, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (2, 1, 64)
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id
    assert sum(p.numel() for p in model.parameters()) < 500_000
    ids = torch.tensor([tokenizer("1 + 2 = 3", add_special_tokens=False)["input_ids"]])  # [1, T]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


def test_solution_round_trips_exactly(tiny_tokenizer):
    record = SyntheticArithmetic().record("train", 0)
    text = record.solution + "\n\nTabs\tand 'quotes', {braces} ~^`|"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text  # blank lines and spaces survive


def test_numbers_are_single_digit_tokens(tiny_tokenizer):
    text = "Compute 4709 + 381 - 26."
    pieces = [tiny_tokenizer.decode([i]) for i in tiny_tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert "".join(pieces) == text
    digits = [p.strip() for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("470938126")  # every digit alone in its token, no digit merged with anything else


def test_paragraph_breaks_are_token_boundaries(tiny_tokenizer):
    # the prefix cut snaps to just after "\n\n": the prefix's tokens must be the first tokens of the whole solution
    solution = SyntheticArithmetic(num_operands=4).record("train", 3).solution
    ids = tiny_tokenizer(solution, add_special_tokens=False)["input_ids"]
    cuts = [i + 2 for i in range(len(solution)) if solution.startswith("\n\n", i)]
    assert len(cuts) == 3
    for cut in cuts:
        prefix = tiny_tokenizer(solution[:cut], add_special_tokens=False)["input_ids"]
        assert ids[: len(prefix)] == prefix


def test_non_ascii_text_round_trips(tiny_tokenizer):
    text = "Soit x ≥ 0, ∑ café"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text


def test_tokenizer_comes_back_from_disk_as_built(tiny_tokenizer):
    # transformers rebuilds a Qwen2 tokenizer from the saved vocabulary; it must encode exactly as the one built
    built = build_tiny_tokenizer()
    text = "Compute 7 - 2.\n\n7 - 2 = 5\n\n\\boxed{5} é<|im_end|>"
    assert tiny_tokenizer(text)["input_ids"] == built(text)["input_ids"]
    assert tiny_tokenizer.get_vocab() == built.get_vocab()
    assert build_tiny_tokenizer().get_vocab() == built.get_vocab()  # trained deterministically


def test_chat_template_and_eos(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 1 + 2."}]
    text = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCompute 1 + 2.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tiny_tokenizer.eos_token_id) == 2  # each finished turn ends with the EOS, as a single token
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id


def test_resolve_reuses_the_folder(tiny_policy_dir):
    weights = tiny_policy_dir.resolve() / "model.safetensors"
    before = weights.stat()
    again = TinyRandomQwen2(path=tiny_policy_dir.path, **SMALL)
    assert again.resolve() == tiny_policy_dir.resolve()
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_changed_spec_rewrites_the_folder(tmp_path):
    path = str(tmp_path / "model")
    folder = TinyRandomQwen2(path=path, **SMALL).resolve()
    before = (folder / "model.safetensors").stat()
    wider = TinyRandomQwen2(path=path, **{**SMALL, "hidden_size": 48})
    assert wider.resolve() == folder
    after = (folder / "model.safetensors").stat()
    assert after.st_ino != before.st_ino
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 48
    assert json.loads((folder / SPEC_FILE).read_text()) == wider.spec
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.lock"]  # no staging folder left behind


def test_same_seed_same_weights(tmp_path):
    def weights(name, seed):
        return TinyRandomQwen2(path=str(tmp_path / name), seed=seed, **SMALL).load_model().state_dict()

    first, same, other = weights("a", 0), weights("b", 0), weights("c", 1)
    assert first.keys() == same.keys()
    assert all(torch.equal(first[k], same[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_pretrained_folder(tiny_policy_dir, tmp_path):
    folder = tiny_policy_dir.resolve()
    user = PretrainedFolder(str(folder))
    assert user.resolve() == folder
    text = "12 - 5 = 7\n\n\\boxed{7}"
    assert user.load_tokenizer()(text)["input_ids"] == tiny_policy_dir.load_tokenizer()(text)["input_ids"]

    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        PretrainedFolder(str(missing)).resolve()
