"""Shared fixtures: the tiny embedded policy (written once per session) and a JSONL file writer."""

import json

import pytest

from helpers import tiny_qwen2

from trapo_lightning.models import TinyRandomQwen2


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> TinyRandomQwen2:
    """A `TinyRandomQwen2` (tens of thousands of parameters) already written to a session temp folder.

    Returns the source object; `.resolve()` gives the folder and reuses it. Do not resolve a different spec at
    the same path (it would rewrite the folder under the other tests); make your own source for that.
    """
    source = tiny_qwen2(tmp_path_factory.mktemp("tiny") / "model")
    source.resolve()
    return source


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_policy_dir):
    """The tokenizer of `tiny_policy_dir`, loaded back from its folder with `AutoTokenizer.from_pretrained`."""
    return tiny_policy_dir.load_tokenizer()


@pytest.fixture
def write_jsonl(tmp_path):
    """`write_jsonl(name, rows) -> str path` under tmp_path; a row is a dict (dumped as JSON) or raw bytes/str line."""

    def write(name: str, rows: list) -> str:
        lines = []
        for row in rows:
            if isinstance(row, dict):
                row = json.dumps(row)
            lines.append(row.encode() if isinstance(row, str) else row)
        path = tmp_path / name
        path.write_bytes(b"".join(line + b"\n" for line in lines))
        return str(path)

    return write
