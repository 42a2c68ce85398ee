"""Validation and test of `TrapoModule`: each benchmark's problems answered and graded under the run's
`EvalProtocol` (trapo_lightning/evaluation.py), its metrics accumulated over the epoch (summed over ranks), and the
protocol's averages over benchmarks logged at the end (TRAPO.md, "Results": math avg over five benchmarks). Where
the problems come with expert solutions (the training source's held-out split), the held-out SFT loss is logged
too (`expert_nll`): what an SFT stage is trained to convergence on.

A mixin so that the training module's file holds training; it uses the module's rollout engine, reward, tokenizer
and sampling seed.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from trapo_lightning.batch import build_train_batch
from trapo_lightning.data.records import PromptBatch
from trapo_lightning.metrics import HELD_OUT, BenchmarkMetrics, Evaluation, metric_prefix
from trapo_lightning.reward import Verdict
from trapo_lightning.rollout.base import RolloutRequest, SamplingParams
from trapo_lightning.sampling import Sample
from trapo_lightning.update import MicroBatching


class EvaluationSteps:
    """`validation_step`, `test_step` and their epoch ends for a module with `evaluation` (an `EvalProtocol`),
    `benchmark_metrics` (a `ModuleDict`), `rollout`, `reward`, `tokenizer` and `max_response_tokens`."""

    def validation_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Evaluates one batch of a benchmark. Returns {"evaluation": its graded samples, "benchmark": the
        benchmark's name}, which Lightning hands to callbacks' `on_validation_batch_end` as `outputs`
        (`CompletionsTable` writes what the model answered)."""
        return self._evaluate_and_log(batch, "val", self._benchmark_name(dataloader_idx), batch_idx)

    def test_step(self, batch: PromptBatch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """As `validation_step`, logged under `test/`."""
        return self._evaluate_and_log(batch, "test", self._benchmark_name(dataloader_idx), batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_averages("val")

    def on_test_epoch_end(self) -> None:
        self._log_averages("test")

    def evaluate(self, batch: PromptBatch, prefix: str, batch_idx: int = 0, benchmark: str = HELD_OUT) -> Evaluation:
        """The benchmark's number of unguided answers per problem, sampled under the protocol and graded. The
        sampling seed depends on (prefix, step, batch), not on what ran before, so validations are comparable and a
        resumed run evaluates as the uninterrupted one did; one sample per prompt draws exactly what it always did."""
        n = self.evaluation.samples_for(benchmark)
        requests = [RolloutRequest(r.prompt_ids, self.max_response_tokens) for r in batch.records for _ in range(n)]
        sampling = SamplingParams(temperature=self.evaluation.temperature, top_p=self.evaluation.top_p)
        sampling = replace(sampling, seed=self._sampling_seed(prefix, self.global_step, batch_idx))
        self.rollout.wake()
        generations = self.rollout.generate(requests, sampling)
        self.rollout.sleep()
        texts = self.tokenizer.batch_decode([g.token_ids for g in generations], skip_special_tokens=True)
        results = self.reward(texts, [r.answer for r in batch.records for _ in range(n)])
        return Evaluation(results, generations, n)

    def _benchmark_name(self, dataloader_idx: int) -> str:
        return getattr(self.trainer.datamodule, "benchmark_names", [HELD_OUT])[dataloader_idx]

    def _evaluate_and_log(self, batch: PromptBatch, stage: str, benchmark: str, batch_idx: int) -> dict:
        """Accumulate the batch into the benchmark's metrics; Lightning computes (summed over ranks) and resets
        them at the end of the epoch. Returns the step's outputs (see `validation_step`)."""
        prefix = metric_prefix(stage, benchmark)
        with_solutions = all(r.solution_ids for r in batch.records)
        if prefix not in self.benchmark_metrics:
            with torch.inference_mode(False):  # states made in inference mode could not be updated outside it
                self.benchmark_metrics[prefix] = BenchmarkMetrics(
                    self.evaluation.samples_for(benchmark), self.evaluation.pass_at_k_for(benchmark), with_solutions
                ).to(self.device)
        metrics = self.benchmark_metrics[prefix]
        evaluation = self.evaluate(batch, prefix, batch_idx, benchmark)
        metrics.update(evaluation)
        if with_solutions and "expert_nll" in metrics:
            metrics.update_expert_nll(*self._expert_nll(batch))
        for name, metric in metrics.items():
            self.log(
                f"{prefix}/{name}", metric, prog_bar=name == "accuracy", add_dataloader_idx=False,
                metric_attribute=f"benchmark_metrics.{prefix}.{name}",
            )
        return {"evaluation": evaluation, "benchmark": benchmark}

    def _expert_nll(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """`[P]` summed -log p of each problem's first expert solution + EOS, teacher-forced, and `[P]` its tokens."""
        eos = self.tokenizer.eos_token_id
        samples = [
            Sample(p, 0, 1.0, r.prompt_ids, r.solution_ids + (eos,), len(r.solution_ids) + 1, (), True, 0.0,
                   Verdict.correct)
            for p, r in enumerate(batch.records)
        ]
        micro = MicroBatching(self.micro_batch_size, self.max_tokens_per_micro_batch, self.tokenizer.pad_token_id)
        nll = torch.zeros(len(samples), device=self.device)
        for rows in micro.plan(samples):
            chunk = build_train_batch([samples[i] for i in rows], torch.zeros(len(rows)), micro.pad_id,
                                      torch.ones(len(rows), dtype=torch.bool)).to(self.device)
            logp, _ = self._scores(self.policy, chunk)  # [b, T]
            nll[rows] = -(logp * chunk.expert_mask).sum(dim=1)
        tokens = torch.tensor([s.prefix_len for s in samples], dtype=torch.float32, device=self.device)
        return nll, tokens

    def _log_averages(self, stage: str) -> None:
        """`{stage}/<average>`: the mean of its benchmarks' avg@n this epoch (each benchmark's own n)."""
        for name, members in self.evaluation.averages.items():
            prefixes = [metric_prefix(stage, member) for member in members]
            if not all(prefix in self.benchmark_metrics for prefix in prefixes):
                continue  # not every member was evaluated in this stage (e.g. limited batches)
            scores = [self.benchmark_metrics[prefix]["accuracy"].compute() for prefix in prefixes]  # sums over ranks
            self.log(f"{stage}/{name}", torch.stack([s.float() for s in scores]).mean(), add_dataloader_idx=False)
