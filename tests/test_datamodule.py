"""`TrapoDataModule` and `PromptStream`: the paper's prompt through the chat template, counted skips, rank shards.

All runs use the tiny policy's real tokenizer, so the prompt ids checked here are the ones the rollout sees.
"""

import logging
from types import SimpleNamespace

import pytest
import torch

from bpe_tokenizers import gpt2_style
from trapo_lightning.data.datamodule import TrapoDataModule
from trapo_lightning.data.prompts import PromptTemplate
from trapo_lightning.data.records import MathRecord, PromptBatch, PromptRecord
from trapo_lightning.data.sources import InvalidRecord, JsonlSource, SyntheticSource
from trapo_lightning.data.stream import PromptStream
from trapo_lightning.data.synthetic import SyntheticArithmetic
from trapo_lightning.errors import DataError

PAPER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def paper_prompt(problem: str) -> str:
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{problem}\n{PAPER_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    )


def row(i: int, problem: str | None = None) -> dict:
    solution = f"{i} + 1 = {i + 1}\n\n\\boxed{{{i + 1}}}"
    return {"problem": problem or f"Compute {i} + 1.", "solution": solution, "answer": str(i + 1)}


def stream(records, tokenizer, **kwargs) -> PromptStream:
    options = dict(batch_size=1, max_prompt_tokens=1024, max_response_tokens=1024, shuffle=True, drop_last=False)
    return PromptStream(records, tokenizer, PromptTemplate(), **{**options, **kwargs})


def sources_of(batches) -> list[str]:
    return [r.source for batch in batches for r in batch.records]


def test_train_batches_carry_the_paper_prompt(tiny_policy_dir, tiny_tokenizer):
    task = SyntheticArithmetic()
    data = TrapoDataModule(
        tiny_policy_dir, SyntheticSource(task, train_size=16, val_size=3), prompts_per_step=4, val_batch_size=2
    )
    data.setup("fit")
    batches = list(data.train_dataloader())
    assert len(batches) == 4  # 16 records / 4 per step
    expected = {r.source: r for r in task.records("train", 16)}
    for batch in batches:
        assert isinstance(batch, PromptBatch) and len(batch) == 4
        assert batch.skipped == {}
        for record in batch.records:
            assert isinstance(record, PromptRecord)
            text = tiny_tokenizer.decode(record.prompt_ids)
            assert text == paper_prompt(record.problem)
            assert record.problem in text and PAPER_INSTRUCTION in text
            source = expected[record.source]
            assert (record.problem, record.solution, record.answer) == (source.problem, source.solution, source.answer)
    assert sorted(sources_of(batches)) == sorted(expected)  # one epoch sees every record once

    # validation: unshuffled, the last batch kept even if short (3 = 2 + 1)
    val = list(data.val_dataloader())
    assert [len(b) for b in val] == [2, 1]
    assert sources_of(val) == [f"synthetic:val:{i}" for i in range(3)]


def test_over_long_prompt_is_skipped_and_counted(tiny_policy_dir, tiny_tokenizer, write_jsonl):
    long_problem = "Compute " + " + ".join(["1"] * 100) + "."
    rows = [row(i) for i in range(9)]
    rows.insert(1, row(99, long_problem))
    train = write_jsonl("train.jsonl", rows)
    # the limit is exactly the longest normal prompt: every normal one fits (<=), the long one does not
    limit = max(len(PromptTemplate().token_ids(tiny_tokenizer, f"Compute {i} + 1.")) for i in range(9))
    assert len(PromptTemplate().token_ids(tiny_tokenizer, long_problem)) > limit
    data = TrapoDataModule(
        tiny_policy_dir, JsonlSource([train], val_files=[train]), prompts_per_step=3, val_batch_size=2,
        max_prompt_tokens=limit,
    )
    data.setup("fit")

    batches = list(data.train_dataloader())
    assert [len(b) for b in batches] == [3, 3, 3]
    problems = [r.problem for b in batches for r in b.records]
    assert sorted(problems) == sorted(f"Compute {i} + 1." for i in range(9))
    assert data.streams["train"].skipped == {"prompt_too_long": 1}

    # in file order (validation), the long prompt is line 2, so every batch reports the skip
    val = list(data.val_dataloader())
    assert [len(b) for b in val] == [2, 2, 2, 2, 1]
    assert [b.skipped for b in val] == [{"prompt_too_long": 1}] * 5


def test_over_long_solution_is_skipped_and_counted(tiny_tokenizer):
    short, long = "1 + 1 = 2\n\n\\boxed{2}", "1 + 1 = 2\n\n2 + 1 = 3\n\n\\boxed{3}"
    limit = len(tiny_tokenizer(short)["input_ids"]) + 1  # the short solution + EOS fits exactly
    assert len(tiny_tokenizer(long)["input_ids"]) + 1 > limit
    records = [MathRecord("Compute 1 + 1.", (text,), "2", name) for name, text in zip("abc", (short, long, short))]
    batches = list(stream(records, tiny_tokenizer, max_response_tokens=limit, shuffle=False))
    assert sources_of(batches) == ["a", "c"]
    assert [b.skipped for b in batches] == [{}, {"solution_too_long": 1}]


def test_one_length_rule_without_special_tokens_for_a_tokenizer_that_adds_bos():
    """The response is the solution's ids + EOS, never a BOS: a solution of n ids fits a limit of n + 1."""
    tokenizer = gpt2_style(bos=True)
    fits, over = "So the sum is 5.\n\nSo the end.", "So the sum is 5.\n\nSo the end!!"
    n = len(tokenizer(fits, add_special_tokens=False)["input_ids"])
    assert tokenizer(fits)["input_ids"][0] == tokenizer.bos_token_id  # n + 1 ids with special tokens
    prompt = PromptTemplate().token_ids(tokenizer, "Compute 1 + 1.")
    records = [MathRecord("Compute 1 + 1.", (text,), "2", name) for name, text in (("over", over), ("fits", fits))]
    data = stream(records, tokenizer, max_prompt_tokens=len(prompt), max_response_tokens=n + 1, shuffle=False)
    (batch,) = list(data)
    (record,) = batch.records
    assert record.source == "fits" and batch.skipped == {"solution_too_long": 1}  # "over" has n + 2 ids, + EOS
    assert record.prompt_ids == prompt and tokenizer.bos_token_id not in prompt  # the ids the rollout is sent
    assert record.solution_ids == tuple(tokenizer(fits, add_special_tokens=False)["input_ids"])
    assert tokenizer.decode(record.solution_ids) == fits


def test_too_long_records_are_known_before_streaming_and_summarised(tiny_tokenizer):
    short, long = "1 + 1 = 2\n\n\\boxed{2}", "1 + 1 = 2\n\n2 + 1 = 3\n\n\\boxed{3}"
    limit = len(tiny_tokenizer(short, add_special_tokens=False)["input_ids"]) + 1
    records = [MathRecord("Compute 1 + 1.", (text,), "2", source=str(i)) for i, text in enumerate([short, long, long])]
    records.append(MathRecord("Compute " + "1 + " * 300 + "1.", (short,), "2", source="long prompt"))
    data = stream(records, tiny_tokenizer, max_prompt_tokens=200, max_response_tokens=limit)
    assert data.skip_reasons == [None, "solution_too_long", "solution_too_long", "prompt_too_long"]
    assert data.summary("train", {"empty_solution": 1}) == (
        "train data: 5 rows read, 1 kept; 1 malformed skipped (empty_solution: 1); 3 too long skipped "
        f"(prompt_too_long: 1, solution_too_long: 2; limits: prompt 200 tokens, solution + EOS {limit})"
    )
    assert data.skipped == {}  # the per-step counts still grow as the stream meets the records
    list(data)
    assert data.skipped == {"solution_too_long": 2, "prompt_too_long": 1}


def test_an_over_long_solution_is_dropped_while_one_fits_and_the_record_stays(tiny_tokenizer):
    # by the tiny tokenizer short and other are 13 ids each, + EOS = 14 = the limit; long is 22 ids
    short, long = "1 + 1 = 2\n\n\\boxed{2}", "1 + 1 = 2\n\n2 + 1 = 3\n\n\\boxed{3}"
    other = "2 = 1 + 1\n\n\\boxed{2}"
    limit = len(tiny_tokenizer(short, add_special_tokens=False)["input_ids"]) + 1
    assert [len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (short, other, long)] == [13, 13, 22]
    solutions = {"both fit": (short, other), "second long": (short, long), "first long": (long, other),
                 "none fits": (long, long), "one": (short,)}
    records = [MathRecord("Compute 1 + 1.", texts, "2", source=name) for name, texts in solutions.items()]
    data = stream(records, tiny_tokenizer, max_response_tokens=limit, shuffle=False)
    kept = {r.source: r for batch in data for r in batch.records}
    assert {name: r.solutions for name, r in kept.items()} == {
        "both fit": (short, other), "second long": (short,), "first long": (other,), "one": (short,)
    }
    for record in kept.values():  # each text with its own ids, the fitting ones only
        assert [tiny_tokenizer.decode(ids) for ids in record.solutions_ids] == list(record.solutions)
    assert data.skip_reasons == [None, None, None, "solution_too_long", None]  # only a record none of which fits
    assert data.skipped == {"solution_too_long": 1}  # dropped solutions are not skipped records
    assert data.summary("train", {}) == (
        "train data: 5 rows read, 4 kept; 1 too long skipped (solution_too_long: 1; limits: prompt 1024 tokens, "
        f"solution + EOS {limit}); 1 kept records carry a second expert solution, for the whole-solution "
        "micro-group (2 over-long solutions dropped, their records kept with the one that fits)"
    )


def test_solutions_beyond_the_second_are_neither_tokenized_nor_used(tiny_tokenizer):
    texts = tuple(f"{i} + 1 = {i + 1}\n\n\\boxed{{{i + 1}}}" for i in range(4))
    records = [MathRecord("Compute 1 + 1.", texts, "2", source="four"), MathRecord("Compute 1 + 1.", texts[:1], "2")]
    data = stream(records, tiny_tokenizer, shuffle=False)
    assert [len(packed) for packed in data.tokens.solutions] == [2, 2]  # two records, two solution slots
    assert data.tokens.solutions[1][1] == ()  # the one-solution record has no second
    first = next(iter(data)).records[0]
    assert first.solutions == texts[:2] and len(first.solutions_ids) == 2
    assert data.summary("val", {}).endswith(
        "1 kept records carry a second expert solution, for the whole-solution micro-group (2 solutions beyond the "
        "first 2 of a record unused)"
    )


def test_single_solution_splits_say_nothing_of_second_solutions(tiny_tokenizer):
    data = stream(SyntheticArithmetic().records("train", 4), tiny_tokenizer)
    assert data.summary("train", {}) == "train data: 4 rows read, 4 kept"


def test_the_datamodule_streams_every_solution_of_jsonl_and_synthetic_records(tiny_policy_dir, write_jsonl):
    listed = dict(row(0), solutions=[row(0)["solution"], "1 = 0 + 1\n\n\\boxed{1}"])
    del listed["solution"]
    train = write_jsonl("train.jsonl", [listed, row(1)])
    data = TrapoDataModule(tiny_policy_dir, JsonlSource([train], val_files=[train]), prompts_per_step=2)
    data.setup("fit")
    (batch,) = list(data.train_dataloader())
    by_source = {r.source: r for r in batch.records}
    assert by_source[f"{train}:1"].solutions == tuple(listed["solutions"])
    assert by_source[f"{train}:2"].solutions == (row(1)["solution"],)
    assert [r.solutions for r in next(iter(data.val_dataloader())).records] == [(), ()]  # a benchmark needs none

    task = SyntheticArithmetic(alternatives=1)
    data = TrapoDataModule(tiny_policy_dir, SyntheticSource(task, train_size=4, val_size=2), prompts_per_step=4)
    data.setup("fit")
    (batch,) = list(data.train_dataloader())
    expected = {r.source: r.solutions for r in task.records("train", 4)}
    assert {r.source: r.solutions for r in batch.records} == expected
    assert all(len(r.solutions_ids) == len(r.solutions) == 2 for r in batch.records)


def test_setup_prints_what_each_split_kept_and_skipped(tiny_policy_dir, write_jsonl, caplog):
    long_solution = "1 + 1 = 2\n\n" * 40 + "\\boxed{2}"
    rows = [row(0), row(1), dict(row(2), solution=long_solution), "{oops", row(3)]
    train = write_jsonl("train.jsonl", rows)
    data = TrapoDataModule(
        tiny_policy_dir, JsonlSource([train], val_files=[train], skip_invalid=True), prompts_per_step=1,
        max_response_tokens=64,
    )
    with pytest.warns(UserWarning, match="skipped malformed rows"), caplog.at_level(logging.INFO):
        data.setup("fit")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("lightning")] == [
        "train data: 5 rows read, 3 kept; 1 malformed skipped (undecodable: 1); 1 too long skipped "
        "(solution_too_long: 1; limits: prompt 1024 tokens, solution + EOS 64)",
        "val data: 5 rows read, 4 kept; 1 malformed skipped (undecodable: 1)",  # a benchmark needs no solution
    ]


def test_rank_shards_are_disjoint_equal_and_cover(tiny_tokenizer):
    records = SyntheticArithmetic().records("train", 21)
    shards = [sources_of(stream(records, tiny_tokenizer, rank=r, world_size=2, seed=5)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 10  # floor(21 / 2)
    assert not set(shards[0]) & set(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == 20  # floor(21 / 2) * 2, one record left out this epoch


def test_epochs_reshuffle_deterministically_by_seed(tiny_tokenizer):
    records = SyntheticArithmetic().records("train", 24)
    first = stream(records, tiny_tokenizer, seed=1)
    epoch1, epoch2 = sources_of(first), sources_of(first)
    assert epoch1 != epoch2
    assert sorted(epoch1) == sorted(epoch2) == sorted(r.source for r in records)
    again = stream(records, tiny_tokenizer, seed=1)
    assert (sources_of(again), sources_of(again)) == (epoch1, epoch2)
    assert sources_of(stream(records, tiny_tokenizer, seed=2)) != epoch1
    assert sources_of(stream(records, tiny_tokenizer, shuffle=False)) == [r.source for r in records]


def test_drop_last_keeps_only_full_batches(tiny_tokenizer):
    records = SyntheticArithmetic().records("train", 10)
    assert [len(b) for b in stream(records, tiny_tokenizer, batch_size=4, drop_last=True)] == [4, 4]
    assert [len(b) for b in stream(records, tiny_tokenizer, batch_size=4, drop_last=False)] == [4, 4, 2]


def test_resuming_after_any_batch_replays_exactly_what_follows(tiny_tokenizer):
    # 9 records, batches of 2, drop_last: 4 batches an epoch; one prompt too long is skipped in each epoch
    long_prompt = MathRecord("Compute " + "1 + " * 300 + "1.", ("x",), "1", "long")
    records = SyntheticArithmetic().records("train", 8) + [long_prompt]
    options = dict(batch_size=2, drop_last=True, seed=3, max_prompt_tokens=100)
    reference = stream(records, tiny_tokenizer, **options)
    straight = list(reference) + list(reference) + list(reference)  # three epochs
    assert [b.position.batches for b in straight] == [1, 2, 3, 4] * 3
    for k, after in enumerate(straight[:8]):  # resume after each batch of the first two epochs
        resumed = stream(records, tiny_tokenizer, **options)
        resumed.resume_from(after.position)
        rest = list(resumed)
        if after.position.batches == 4:  # exactly at an epoch's end: the next iteration is the next epoch
            assert rest[0].position.epoch == after.position.epoch + 1
        expected = straight[k + 1 : k + 1 + len(rest)]
        assert rest and [sources_of([b]) for b in rest] == [sources_of([b]) for b in expected]
        assert [b.skipped for b in rest] == [b.skipped for b in expected]  # skips are not counted twice


def test_a_split_that_gives_no_batch_is_an_error_not_an_endless_loop(tiny_tokenizer):
    records = SyntheticArithmetic().records("train", 4)
    with pytest.raises(ValueError, match=r"gave no batch of 2 prompts \(skipped so far: \{'prompt_too_long': 4\}\)"):
        list(stream(records, tiny_tokenizer, batch_size=2, drop_last=True, max_prompt_tokens=5))


def test_too_small_split_fails_at_setup_naming_it(tiny_policy_dir, write_jsonl):
    small = TrapoDataModule(tiny_policy_dir, SyntheticSource(train_size=3, val_size=2), prompts_per_step=4)
    with pytest.raises(ValueError, match=r"the train split has 3 usable records .* needs 4"):
        small.setup("fit")
    no_val = TrapoDataModule(tiny_policy_dir, JsonlSource([write_jsonl("train.jsonl", [row(0)])]), prompts_per_step=1)
    with pytest.raises(ValueError, match=r"the val split has 0 usable records"):
        no_val.setup("fit")


def test_invalid_row_surfaces_file_and_line(tiny_policy_dir, write_jsonl):
    train = write_jsonl("train.jsonl", [row(0), dict(row(1), answer=42), row(2)])
    data = TrapoDataModule(tiny_policy_dir, JsonlSource([train], val_files=[train]), prompts_per_step=1)
    with pytest.raises(InvalidRecord, match=r"train\.jsonl:2: field 'answer' must be a string"):
        data.setup("fit")


def test_skipped_invalid_rows_travel_with_every_batch(tiny_policy_dir, write_jsonl):
    train = write_jsonl("train.jsonl", [row(0), dict(row(1), solution=""), row(2), "{oops", row(3), row(4)])
    data = TrapoDataModule(
        tiny_policy_dir, JsonlSource([train], val_files=[train], skip_invalid=True), prompts_per_step=2,
        val_batch_size=4,
    )
    with pytest.warns(UserWarning, match="skipped malformed rows"):
        data.setup("fit")
    batches = list(data.train_dataloader())
    assert [len(b) for b in batches] == [2, 2]
    assert all(b.skipped == {"invalid_empty_solution": 1, "invalid_undecodable": 1} for b in batches)


def test_argument_and_policy_errors(tiny_policy_dir):
    with pytest.raises(ValueError, match="prompts_per_step"):
        TrapoDataModule(tiny_policy_dir, prompts_per_step=0)
    with pytest.raises(ValueError, match="needs `policy`"):
        TrapoDataModule(None, SyntheticSource(train_size=4, val_size=1)).setup("fit")


def bench_rows(count: int, offset: int = 0) -> list[dict]:
    return [{"problem": f"Compute {offset + i} + 1.", "answer": str(offset + i + 1)} for i in range(count)]


def test_benchmarks_get_one_loader_each_in_the_order_given(tiny_policy_dir, write_jsonl):
    train = write_jsonl("train.jsonl", [row(i) for i in range(4)])  # no held-out split: the benchmarks replace it
    benchmarks = {
        "math500": JsonlSource(val_files=[write_jsonl("math500.jsonl", bench_rows(3))]),
        "aime24": JsonlSource(val_files=[write_jsonl("aime24.jsonl", bench_rows(2, offset=100))]),
    }
    data = TrapoDataModule(
        tiny_policy_dir, JsonlSource([train]), prompts_per_step=2, val_batch_size=2, benchmarks=benchmarks
    )
    data.setup("fit")
    assert data.benchmark_names == ["math500", "aime24"]
    for loaders in (data.val_dataloader(), data.test_dataloader()):
        math500, aime24 = loaders
        assert [len(b) for b in math500] == [2, 1]
        assert [r.problem for b in aime24 for r in b.records] == ["Compute 100 + 1.", "Compute 101 + 1."]
        assert [r.answer for b in aime24 for r in b.records] == ["101", "102"]
    assert sorted(data.streams) == ["aime24", "math500", "train"]


def test_without_benchmarks_the_held_out_split_is_the_single_loader(tiny_policy_dir):
    data = TrapoDataModule(tiny_policy_dir, SyntheticSource(train_size=4, val_size=3), prompts_per_step=2)
    data.setup("fit")
    assert data.benchmark_names == ["val"]
    assert isinstance(data.val_dataloader(), torch.utils.data.DataLoader)


@pytest.mark.parametrize("name", ["", "aime.24", "val/aime", "train"])
def test_a_benchmark_name_must_fit_in_a_metric_name(tiny_policy_dir, name):
    with pytest.raises(ValueError, match="benchmark name"):
        TrapoDataModule(tiny_policy_dir, benchmarks={name: SyntheticSource()})


def test_an_uneven_benchmark_warns_which_problems_each_rank_leaves_out(tiny_policy_dir, write_jsonl):
    bench = JsonlSource(val_files=[write_jsonl("aime24.jsonl", bench_rows(5))])
    data = TrapoDataModule(
        tiny_policy_dir, SyntheticSource(train_size=4), prompts_per_step=1, benchmarks={"aime24": bench}
    )
    data.trainer = SimpleNamespace(global_rank=1, world_size=2)
    with pytest.warns(UserWarning, match=r"aime24: 5 problems over 2 ranks; .* the last 1 are left out"):
        data.setup("validate")
    assert [r.problem for b in data.val_dataloader() for r in b.records] == ["Compute 2 + 1.", "Compute 3 + 1."]


def test_a_malformed_benchmark_row_names_its_file(tiny_policy_dir, write_jsonl):
    bad = write_jsonl("aime24.jsonl", [{"problem": "Compute 1 + 1."}])
    data = TrapoDataModule(tiny_policy_dir, SyntheticSource(train_size=4), prompts_per_step=1,
                           benchmarks={"aime24": JsonlSource(val_files=[bad])})
    with pytest.raises(InvalidRecord, match=r"aime24\.jsonl:1: field 'answer' is missing"):
        data.setup("validate")


# -- each stage loads only what it uses (issue 15) ---------------------------------------------------------------------
def test_validate_and_test_need_no_training_split(tiny_policy_dir, write_jsonl):
    bench = write_jsonl("bench.jsonl", bench_rows(3))
    for stage in ("validate", "test"):
        data = TrapoDataModule(tiny_policy_dir, JsonlSource(val_files=[bench]), prompts_per_step=2, val_batch_size=2)
        data.setup(stage)
        assert sorted(data.streams) == ["val"]
        assert [r.answer for b in data.val_dataloader() for r in b.records] == ["1", "2", "3"]
        assert [r.answer for b in data.test_dataloader() for r in b.records] == ["1", "2", "3"]
    with pytest.raises(DataError, match=r"the train split has 0 usable records .* add training data"):
        TrapoDataModule(tiny_policy_dir, JsonlSource(val_files=[bench]), prompts_per_step=2).setup("fit")


def test_validate_does_not_read_the_training_files(tiny_policy_dir, write_jsonl, tmp_path):
    # a training file that is not there (or is 46k rows long) costs validation nothing
    source = JsonlSource([str(tmp_path / "not_here.jsonl")], val_files=[write_jsonl("val.jsonl", bench_rows(2))])
    data = TrapoDataModule(tiny_policy_dir, source, prompts_per_step=1)
    data.setup("validate")
    assert sorted(data.streams) == ["val"]
    with pytest.raises(FileNotFoundError, match="not_here.jsonl does not exist"):
        data.setup("fit")  # fit after validate (one Trainer, one datamodule) loads what is still missing


def test_fit_after_validate_loads_the_training_split_once_and_keeps_the_benchmarks(tiny_policy_dir):
    data = TrapoDataModule(tiny_policy_dir, SyntheticSource(train_size=4, val_size=2), prompts_per_step=2)
    data.setup("validate")
    val_stream = data.streams["val"]
    data.setup("fit")
    assert sorted(data.streams) == ["train", "val"] and data.streams["val"] is val_stream
    train_stream = data.streams["train"]
    data.setup("test")
    assert data.streams["train"] is train_stream and len(list(data.train_dataloader())) == 2


def test_predict_loads_nothing(tiny_policy_dir):
    data = TrapoDataModule(None, SyntheticSource(train_size=4, val_size=2))  # not even the tokenizer is needed
    data.setup("predict")
    assert data.streams == {}


def test_a_val_split_with_no_problems_says_where_they_come_from(tiny_policy_dir, write_jsonl):
    data = TrapoDataModule(tiny_policy_dir, JsonlSource([write_jsonl("train.jsonl", [row(0)])]), prompts_per_step=1)
    with pytest.raises(DataError, match=r"the val split has 0 usable records .* \(the source's val_files, or "
                                        r"data\.benchmarks\)"):
        data.setup("validate")
