"""Check `trapo plan`'s formula against the measured peak memory of real training steps on CPU (issue 11).

For each shape, a fresh process builds a random Qwen2 model (float32, SDPA attention) and a batch of rows of equal
length (no padding), then runs two training steps through the project's forward (`forward.response_logprobs`: the
chunked LM head of `logprobs.py`), backward and `torch.optim.AdamW`. The first step creates AdamW's states, so the
second is a steady-state step, as every step of a run after the first.

Measured: the process's peak RSS over both steps (Linux VmHWM, reset through /proc/self/clear_refs just before the
first step) minus its RSS at that moment (imports, model, batch). glibc is told to serve every allocation above 64 KiB
with its own mmap (MALLOC_MMAP_THRESHOLD_=65536), so freed tensors go back to the system at once and RSS follows
live memory instead of glibc's retained heap.

Predicted: `plan.plan_memory` for the same shape with world size 1, float32 (`32-true`), no reference, no rollout
engine, the micro-batch's tokens, minus the parameters (already in the baseline): gradients + AdamW states +
activations + the LM head chunk.

    python benchmarks/plan_check.py            # the table of docs/performance.md ("Checking trapo plan")
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20

# name -> (hidden, intermediate, layers, heads, kv heads, vocab, rows, prompt tokens, response tokens, chunk, AC)
SHAPES = {
    "real-vocab": (64, 256, 2, 4, 2, 151_936, 2, 64, 960, 256, False),
    "wide": (512, 1536, 4, 8, 2, 4096, 4, 64, 448, 512, False),
    "wide-ac": (512, 1536, 4, 8, 2, 4096, 4, 64, 448, 512, True),
    "deep": (256, 768, 12, 4, 2, 32_000, 2, 64, 960, 512, False),
    "deep-ac": (256, 768, 12, 4, 2, 32_000, 2, 64, 960, 512, True),
}


def measure(name: str) -> dict:
    """In this process: build the shape's model and batch, run two steps, return the peak above the baseline."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from real_shape import PhasePeak  # benchmarks/ is on the path: the child runs this file as a script
    from trapo_lightning.batch import build_train_batch
    from trapo_lightning.forward import response_logprobs
    from trapo_lightning.reward import Verdict
    from trapo_lightning.sampling import Sample

    hidden, inter, layers, heads, kv, vocab, rows, prompt, response, chunk, ac = SHAPES[name]
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=prompt + response, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).train()
    model.config.use_cache = False
    if ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    samples = [
        Sample(row, 0, 0.0, tuple(torch.randint(vocab, (prompt,)).tolist()),
               tuple(torch.randint(vocab, (response,)).tolist()), 0, (0.0,) * response, False, 0.0, Verdict.wrong)
        for row in range(rows)
    ]
    batch = build_train_batch(samples, torch.zeros(rows), pad_id=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    with PhasePeak() as peak:
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            for _ in range(2):  # micro-batches: gradients of the first are alive through the second, as in a run
                logp, entropy = response_logprobs(model, batch, 1.0, chunk, share_prompts=False)
                loss = -(logp * batch.policy_mask).sum() / rows - 0.001 * entropy.mean()
                loss.backward()
            optimizer.step()
    return {"measured": peak.growth, "tokens": rows * (prompt + response)}


def predict(name: str) -> int:
    from trapo_lightning.plan import ModelShape, RunShape, plan_memory

    hidden, inter, layers, heads, kv, vocab, rows, prompt, response, chunk, ac = SHAPES[name]
    shape = ModelShape(hidden, inter, layers, heads, kv, hidden // heads, vocab, True, True)
    run = RunShape("32-true", 1, False, rows * (prompt + response), ac, chunk, None)
    plan = plan_memory(shape, run, 1 << 40)
    parameters = next(c.bytes for c in plan.components if c.name.startswith("policy parameters"))
    return plan.phase_bytes("update") - parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    print("| shape | hidden x layers, vocab | tokens | AC | predicted MiB | measured MiB | measured / predicted |")
    print("|---|---|---:|---|---:|---:|---:|")
    for name in args.shapes:
        out = subprocess.run([sys.executable, __file__, "--child", name], env=env, capture_output=True, text=True,
                             check=True, cwd=ROOT)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        hidden, _, layers, _, _, vocab, *_, ac = SHAPES[name]
        predicted = predict(name)
        print(f"| {name} | {hidden} x {layers}, {vocab} | {result['tokens']} | {'on' if ac else 'off'} | "
              f"{predicted / MIB:.0f} | {result['measured'] / MIB:.0f} | {result['measured'] / predicted:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
