"""Memory at the users' shape on this CPU: Qwen's 151,936-token vocabulary, long responses, issue 11's evidence.

A Qwen2-shaped random model with the real vocabulary and a small hidden size (so the vocabulary-sized tensors
dominate, as N x T x V does at 7B) runs, each in a fresh process:
- one rollout round: `HFGenerateEngine.generate` of `--rows` requests of T new tokens (a random model never samples
  EOS, so every row runs to T);
- one training step: a real Lightning `fit` of one step, `--rows` sequences of T response tokens each (scripted
  rollouts of exactly T tokens, the paper's loss), with the default micro-batching.
Peak RSS is the process's high-water mark over the phase alone (Linux: reset through /proc/self/clear_refs, read
from /proc/self/status VmHWM), minus the RSS when the phase began; it includes everything the phase allocates.

`--tree` runs the phases with another checkout's code (its own `.venv`), e.g. the code before issue 11:

    git worktree add /tmp/before 0484e63 && (cd /tmp/before && python3 -m venv .venv && ...)   # see docs/performance.md
    python benchmarks/real_shape.py --tree /tmp/before --tokens 1024 2048 4096
    python benchmarks/real_shape.py --padding     # padding efficiency on a long-tailed length mix (pure arithmetic)

It also prints the padding efficiency (real tokens / tokens through the forward) of a long-tailed mix of response
lengths at the 7B config's shape, one width per step (before) against per-micro-batch widths and a token budget.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

VOCAB = 151_936
ROOT = Path(__file__).resolve().parents[1]


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class PhasePeak:
    """Peak RSS growth over a phase: the high-water mark is reset when the phase starts."""

    def __enter__(self) -> PhasePeak:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        self.start = rss_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.growth = rss_bytes("VmHWM") - self.start


def write_model(folder: Path, hidden: int, layers: int) -> Path:
    """A random Qwen2 with the real vocabulary and a tiny body (`hidden` wide, `layers` deep)."""
    return write_qwen2(folder, vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=16384, tie_word_embeddings=True)


def write_qwen2(folder: Path, **config) -> Path:
    """A random Qwen2 of the given `Qwen2Config` fields, float32, with the project's tiny tokenizer (its ids are a
    subset of any vocabulary used here), written as a Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from trapo_lightning.models.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    qwen2 = Qwen2Config(**config, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(qwen2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def rollout_phase(folder: Path, rows: int, tokens: int) -> dict:
    import torch

    from trapo_lightning.models import PretrainedFolder
    from trapo_lightning.rollout import HFGenerateEngine, RolloutRequest, SamplingParams

    source = PretrainedFolder(str(folder))
    tokenizer, model = source.load_tokenizer(), source.load_model()
    engine = HFGenerateEngine()
    try:
        engine.bind(model, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    except TypeError:  # before the engines took every EOS id
        engine.bind(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    prompt = tuple(tokenizer("Compute 1 + 2 + 3.", add_special_tokens=False)["input_ids"])
    requests = [RolloutRequest(prompt, tokens) for _ in range(rows)]
    with torch.no_grad(), PhasePeak() as peak:
        generations = engine.generate(requests, SamplingParams(seed=0))
    return {"peak_growth": peak.growth, "generated": sum(len(g.token_ids) for g in generations)}


def train_phase(folder: Path, rows: int, tokens: int) -> dict:
    import inspect

    import lightning as L
    import torch

    from trapo_lightning.data.datamodule import TrapoDataModule
    from trapo_lightning.data.sources import SyntheticSource
    from trapo_lightning.data.synthetic import SyntheticArithmetic
    from trapo_lightning.guidance import NoGuidance
    from trapo_lightning.models import PretrainedFolder
    from trapo_lightning.module import TrapoModule
    from trapo_lightning.rollout.base import Generation, RolloutEngine

    class ExactLength(RolloutEngine):
        """Every request gets `tokens` digit tokens (no EOS): equal work on every version of the code."""

        def bind(self, policy, eos, pad):
            self.digit = source.load_tokenizer()("7", add_special_tokens=False)["input_ids"][0]

        def generate(self, requests, params):
            return [Generation([self.digit] * r.max_new_tokens, [-1.0] * r.max_new_tokens, False) for r in requests]

    class Peak(L.Callback):
        def on_train_batch_start(self, *args):
            self.peak = PhasePeak().__enter__()

        def on_train_batch_end(self, *args):
            self.peak.__exit__()

    source = PretrainedFolder(str(folder))
    prompt_tokens = 256
    kwargs = dict(policy=source, rollout=ExactLength(), guidance=NoGuidance(rows), max_prompt_tokens=prompt_tokens,
                  max_response_tokens=tokens, micro_batch_size=rows,
                  optimizer=lambda params: torch.optim.AdamW(params, lr=1e-5))
    module = TrapoModule(**kwargs)
    data = TrapoDataModule(policy=source, source=SyntheticSource(SyntheticArithmetic(), train_size=4, val_size=1),
                           prompts_per_step=1, val_batch_size=1, max_prompt_tokens=prompt_tokens,
                           max_response_tokens=tokens)
    peak = Peak()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[peak])
    trainer.fit(module, datamodule=data)
    del inspect
    return {"peak_growth": peak.peak.growth}


def padding_efficiency(seed: int = 0) -> None:
    """Real tokens / tokens through the forward for one rank's share of a 7B step (16 prompts x 8 = 128 rows),
    1024-token prompts (lengths 100-1024), responses long-tailed: most a few hundred tokens, a few at the 8192 limit."""
    sys.path.insert(0, str(ROOT))
    from trapo_lightning.batch import micro_batches, padded_tokens

    rng = random.Random(seed)
    prompts = [rng.randint(100, 1024) for _ in range(16) for _ in range(8)]
    responses = [min(8192, int(rng.lognormvariate(6.3, 0.9))) if rng.random() > 0.05 else 8192 for _ in prompts]
    real = sum(prompts) + sum(responses)
    step_width = len(prompts) * (max(prompts) + max(responses))  # before: one width for the whole step
    rows = []
    for name, max_rows, budget in (("one width per step (before)", 1, None), ("micro_batch_size 1, own width", 1, None),
                                   ("token budget 16384", 64, 16384), ("token budget 32768", 64, 32768)):
        plan = micro_batches(prompts, responses, max_rows, budget)
        through = step_width if name.endswith("(before)") else sum(
            padded_tokens([prompts[i] for i in batch], [responses[i] for i in batch]) for batch in plan)
        rows.append((name, len(plan), through, real / through))
    print(f"responses: median {sorted(responses)[len(responses) // 2]}, mean {sum(responses) / len(responses):.0f}, "
          f"{sum(r == 8192 for r in responses)} of {len(responses)} at the 8192 limit")
    print("| micro-batching | micro-batches | tokens through forward | padding efficiency |")
    print("|---|---|---|---|")
    for name, count, through, efficiency in rows:
        print(f"| {name} | {count} | {through:,} | {efficiency:.3f} |")


def measure(tree: Path, phase: str, folder: Path, rows: int, tokens: int) -> dict:
    """One phase in a fresh process of `tree`'s code."""
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import real_shape; "
            f"print('RESULT', json.dumps(real_shape.{phase}_phase(real_shape.Path({str(folder)!r}), {rows}, {tokens})))")
    python = tree / ".venv" / "bin" / "python"
    env = dict(os.environ, OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(tree))
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd=tree)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    return {"error": (out.stderr or out.stdout)[-300:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, action="append", default=[], help="other checkouts to compare (before)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--rows", type=int, default=2, help="sequences per rollout round and per training step")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--phases", nargs="+", default=["rollout", "train"])
    parser.add_argument("--padding", action="store_true", help="print only the padding-efficiency table")
    args = parser.parse_args()
    if args.padding:
        padding_efficiency()
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model(Path(tmp) / "model", args.hidden, args.layers)
        print(f"model: Qwen2, vocabulary {VOCAB}, hidden {args.hidden}, {args.layers} layers, float32; "
              f"{args.rows} sequences; peak RSS growth over the phase, MB")
        print("| code | phase | " + " | ".join(f"T = {t}" for t in args.tokens) + " |")
        print("|---|---|" + "---|" * len(args.tokens))
        for tree in [*args.tree, ROOT]:
            for phase in args.phases:
                cells = []
                for tokens in args.tokens:
                    result = measure(tree, phase, folder, args.rows, tokens)
                    cells.append(f"{result['peak_growth'] / 1e6:,.0f}" if "peak_growth" in result else "failed")
                    print(f"  {tree.name} {phase} T={tokens}: {result}", file=sys.stderr, flush=True)
                print(f"| {tree.name} | {phase} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
