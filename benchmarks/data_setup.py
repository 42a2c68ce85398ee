"""What the data layer's one tokenization pass at setup costs (issue 15, item 5): a training split of long expert
solutions through `PromptStream` (chat-templated prompts and solutions tokenized in batches, ids packed, skip
reasons known up front), next to what the stream used to pay per step instead (tokenizing each record of a batch on
its own as it streamed, every epoch).

The solutions are benchmarks/data/solutions.yaml's, concatenated (digits redrawn) to ~`--chars` characters each,
to ~4k tokens like an OpenR1-Math-46k trace; the tokenizer is a byte-level BPE with Qwen2's pre-tokenizer trained
here. Time and memory scale with the number of tokens, so the run is projected to `--project-rows` rows.

    python benchmarks/data_setup.py                     # 2000 rows of ~4k tokens: ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import yaml
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from trapo_lightning.data.prompts import PromptTemplate
from trapo_lightning.data.records import MathRecord
from trapo_lightning.data.stream import PromptStream
from trapo_lightning.models.tokenizer import CHAT_TEMPLATE

DATA = Path(__file__).parent / "data" / "solutions.yaml"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="training rows measured")
    parser.add_argument("--chars", type=int, default=9600, help="characters per solution (~4k tokens here)")
    parser.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary")
    parser.add_argument("--project-rows", type=int, default=46000, help="rows to project the cost to")
    parser.add_argument("--batch", type=int, default=128, help="prompts per step, for the old per-step cost")
    return parser.parse_args()


def tokenizer_for(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=specials[0], eos_token=specials[2])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def long_records(rows: int, chars: int) -> list[MathRecord]:
    written = yaml.safe_load(DATA.read_text())
    rng = random.Random(0)
    records = []
    for index in range(rows):
        parts, length = [], 0
        while length < chars:
            text = rng.choice(written)["solution"]
            parts.append("".join(str(rng.randrange(10)) if c.isdigit() else c for c in text))
            length += len(parts[-1]) + 2
        records.append(MathRecord(rng.choice(written)["problem"], ("\n\n".join(parts),), "1", f"row {index}"))
    return records


def main() -> None:
    args = parse_args()
    records = long_records(args.rows, args.chars)
    tokenizer = tokenizer_for([r.solution for r in records[:200]], args.vocab_size)
    start, cpu = time.perf_counter(), time.process_time()
    stream = PromptStream(records, tokenizer, PromptTemplate(), args.batch, 1024, 8192, shuffle=True, drop_last=True)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    solution_tokens = sum(len(p.ids) for p in stream.tokens.solutions)
    tokens = solution_tokens + len(stream.tokens.prompts.ids)
    packed = sum(a.itemsize * len(a) for p in (stream.tokens.prompts, *stream.tokens.solutions)
                 for a in (p.ids, p.offsets))
    scale = args.project_rows / args.rows
    print(f"{args.rows} rows: {solution_tokens / args.rows:.0f} solution tokens a row, "
          f"{tokens / 1e6:.1f}M tokens in all")
    print(f"setup pass: {seconds:.1f} s ({cpu:.1f} s of CPU), {tokens / seconds / 1e6:.2f}M tokens/s, "
          f"{tokens / cpu / 1e6:.2f}M tokens per CPU-second; packed ids {packed / 1e6:.0f} MB")
    print(f"projected to {args.project_rows} rows: {seconds * scale:.0f} s here ({cpu * scale:.0f} CPU-seconds), "
          f"{packed * scale / 1e9:.2f} GB per rank")

    batch = records[: args.batch]  # the old stream's work per step: each record tokenized on its own
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for record in batch:
            PromptTemplate().token_ids(tokenizer, record.problem)
            tokenizer(record.solution)["input_ids"]
        times.append(time.perf_counter() - start)
    starts = []
    for _ in range(3):
        start = time.perf_counter()
        next(iter(stream))
        starts.append(time.perf_counter() - start)
    print(f"per step of {args.batch} prompts: old per-record tokenization {statistics.median(times):.2f} s, "
          f"new batch from packed ids {statistics.median(starts):.3f} s (medians of 3)")


if __name__ == "__main__":
    main()
