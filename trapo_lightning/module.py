"""`TrapoModule`: the interleaved SFT + RL step of TRAPO (TRAPO.md, "Per-prompt sampling" and "Losses").

One training step: sample each prompt's group in micro-groups (guided by the expert prefix when the policy keeps
failing), grade, compute Dr.GRPO advantages over the whole group, run one forward over prompt + expert prefix +
continuation, and take one optimizer step on TrSFT (expert-prefix tokens) + RL (the policy's own tokens).

Optimization is manual because a step's sequences go through forward/backward in micro-batches (trimmed to their
own width, optionally packed by a token budget: `batch.micro_batches`): each micro-batch loss is normalised by the
whole step's totals, so the summed gradient equals the full-batch gradient exactly. Log-probs come from a chunked
LM head (`forward.py`), so no `[N, T, V]` logits exist. The policy's log-probs at the time of sampling serve as
`old_logp`: one optimizer step per rollout batch means the policy has not changed since sampling (ratio 1, as in
the paper's code).

Memory at the paper's shape (issue 11): the frozen reference is loaded only when something can use it (a KL
coefficient, or a callback that tunes one); under FSDP2 both models are built on the meta device and each rank
reads only its own shards (`models/sharded.py`); `activation_checkpointing` recomputes each decoder layer in
backward.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from trapo_lightning.advantages import dr_grpo_advantages
from trapo_lightning.batch import TrainBatch, step_prefix_carriers
from trapo_lightning.callback_rules import check_callbacks, in_hook_order, missing_states, reference_needed
from trapo_lightning.checkpoints import checkpoint_path
from trapo_lightning.data.records import PromptBatch
from trapo_lightning.evaluation import EvalProtocol
from trapo_lightning.evaluation_steps import EvaluationSteps
from trapo_lightning.forward import response_logprobs
from trapo_lightning.logprobs import DEFAULT_CHUNK_TOKENS
from trapo_lightning.guidance import GuidanceRule, MicroGroupGuidance
from trapo_lightning.losses import LossTerms, TrapoLoss
from trapo_lightning.metrics import step_metrics
from trapo_lightning.models.sharded import load_sharded
from trapo_lightning.models.sources import PolicySource
from trapo_lightning.reward import MathVerifyReward, Verdict
from trapo_lightning.rollout.base import RolloutEngine, SamplingParams, check_rollout_version, eos_token_ids
from trapo_lightning.rollout.hf_generate import HFGenerateEngine
from trapo_lightning.nonfinite import NonFiniteGuard, NonFiniteLossError, StepAction
from trapo_lightning.prefix import PrefixCut
from trapo_lightning.sampling import ExpertPrefixer, Sample, sample_micro_groups
from trapo_lightning.seeding import capture_rng_states, derive_seed, restore_rng_states
from trapo_lightning.timing import PhaseTimer
from trapo_lightning.shaping import DapoShaping, uniform_groups
from trapo_lightning.sharding import GatheredRollout, mixed_precision_policy
from trapo_lightning.update import (
    Accumulated,
    MicroBatching,
    OldLogpSource,
    RolloutBatch,
    Totals,
    accumulate,
    loss_tokens,
    old_logprobs,
    update_rows,
)

OptimizerCallable = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
SchedulerCallable = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


_STATE_KEY = "trapo"  # the module's own resume state inside a Lightning checkpoint


def paper_adamw(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW at the paper's constant learning rate 5e-6 (TRAPO.md, "Settings")."""
    return torch.optim.AdamW(params, lr=5e-6)


class TrapoModule(EvaluationSteps, L.LightningModule):
    def __init__(
        self,
        policy: PolicySource,
        rollout: RolloutEngine | None = None,
        guidance: GuidanceRule | None = None,
        prefix_cut: PrefixCut | None = None,
        reward: MathVerifyReward | None = None,
        optimizer: OptimizerCallable = paper_adamw,
        lr_scheduler: SchedulerCallable | None = None,
        max_prompt_tokens: int = 1024,
        max_response_tokens: int = 8192,
        rollout_temperature: float = 1.0,
        evaluation: EvalProtocol | None = None,
        loss: TrapoLoss | None = None,
        advantage_std_scaling: bool = False,
        dapo: DapoShaping | None = None,
        gradient_clip_val: float = 1.0,
        ppo_epochs: int = 1,
        mini_batches_per_step: int = 1,
        old_logp_source: OldLogpSource = OldLogpSource.policy,
        micro_batch_size: int = 8,
        max_tokens_per_micro_batch: int | None = None,
        logprob_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        activation_checkpointing: bool = False,
        share_prompt_forward: bool | None = None,
        max_consecutive_nonfinite: int = 3,
        max_rollout_staleness: int = 0,
        rollout_seed: int | None = None,
    ) -> None:
        """
        Args:
            policy: The policy's Hugging Face folder (your model, or the tiny embedded default). The frozen
                reference model is loaded from the same folder.
            rollout: Engine that samples continuations (default: transformers `generate` on the policy).
            guidance: When and how much of the expert solution to prefix (default: the paper's micro-groups).
            prefix_cut: Where the expert prefix ends, in tokens of the solution: snapped forward to a paragraph
                break within `snap_window` (0.3 of the solution, as the authors); without one at the token
                boundary `int(len * ratio)` (`fallback: token`, the authors' rule), or first looking back for a
                paragraph break (`paragraph_before`), then a line or sentence end (`paragraph_before_or_line`).
            reward: Grades a completion against the reference answer (default: math-verify on the last \\boxed{}).
            optimizer: Callable from parameters to an optimizer (default: AdamW, constant lr 5e-6 as in the paper).
            lr_scheduler: Callable from the optimizer to an LR scheduler, stepped once per optimizer step (default:
                none, the paper's constant rate).
            max_prompt_tokens: Longest prompt; longer ones are skipped by the data stream (paper: 1024).
            max_response_tokens: Longest response, expert prefix included (paper: 8192); also the constant
                normaliser C of the loss.
            rollout_temperature: Sampling temperature of training rollouts (paper: 1.0).
            evaluation: How validation and test score the model (`trapo_lightning.evaluation.EvalProtocol`): answers
                per problem (per benchmark), temperature and top-p, pass@k, averages over benchmarks (default: the
                paper's protocol, one answer per problem at temperature 0.6).
            loss: The objective (`trapo_lightning.losses.TrapoLoss`): SFT and RL variants, trust-region alpha, clip
                ranges, KL, entropy bonus, normaliser and the rollout importance correction (default: the paper's).
            advantage_std_scaling: Divide advantages by the group's reward std (GRPO); off in Dr.GRPO and the paper.
            dapo: DAPO's dynamic-sampling filter and overlong handling of the RL term (default: none, the paper).
            gradient_clip_val: Global gradient-norm clip (paper: 1.0).
            ppo_epochs: Passes over each rollout batch (paper: 1). Lightning's global step, and so trainer.max_steps,
                counts optimizer steps: ppo_epochs x mini_batches_per_step per rollout batch.
            mini_batches_per_step: Optimizer steps per pass, each over an equal share of the step's prompts (paper: 1).
            old_logp_source: pi_old when a batch feeds several updates: policy (a no-grad forward of the policy
                before the first update) or rollout (the sampler's log-probs). With one update the first forward's
                own log-probs are pi_old (ratio 1, as the paper's code).
            micro_batch_size: Most sequences per forward/backward micro-batch within one optimizer step.
            max_tokens_per_micro_batch: Token budget of a micro-batch (rows x padded width): sequences are sorted by
                length and packed up to it, verl's dynamic batch size (`batch.micro_batches`). None: runs of
                `micro_batch_size` sequences in step order. Either way each micro-batch is padded to its own width.
            logprob_chunk_tokens: Tokens per chunk of the LM head when computing log-probs and entropies: bounds the
                `[chunk, vocabulary]` logits that exist at once, in forward and backward (`logprobs.py`). About five
                float32 `[chunk, V]` temporaries are alive per chunk: 0.8 GB at 256 tokens and Qwen's 151,936
                vocabulary, against 3.1 GB at 1024 (measured, benchmarks/real_shape.py); 256 rows still make the
                head's matmul large (256 x 3584 x 151,936 at 7B).
            activation_checkpointing: Recompute each decoder layer in backward instead of keeping its activations
                (composes with FSDP2): activation memory of a micro-batch drops from all layers' to about one layer's
                plus each layer's input, for roughly one more forward of compute.
            share_prompt_forward: Run each distinct prompt of a micro-batch once and reuse its KV cache for all of
                its group's rows (same log-probs, fewer tokens through forward and backward; `forward.py`). Default
                (None): on, unless activation checkpointing is (a recomputed layer cannot replay a KV cache).
            max_consecutive_nonfinite: A step whose loss or gradient norm is NaN/Inf is skipped and counted; this
                many in a row stop the run with an error after writing a checkpoint of the last good weights.
            max_rollout_staleness: Optimizer steps an engine holding its own weight copy (vLLM) may lag behind the
                policy; sampling from an older copy is an error (0: every rollout from the current weights).
            rollout_seed: Seed of rollout and validation sampling, mixed with the step and rank so every step's
                samples are reproducible on resume (default: the run's `seed_everything` value). Saved in
                checkpoints.
        """
        super().__init__()
        if max_prompt_tokens < 1 or max_response_tokens < 1:
            raise ValueError("max_prompt_tokens and max_response_tokens must be >= 1")
        if ppo_epochs < 1 or mini_batches_per_step < 1:
            raise ValueError(f"ppo_epochs and mini_batches_per_step must be >= 1, got {ppo_epochs}, {mini_batches_per_step}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if max_tokens_per_micro_batch is not None and max_tokens_per_micro_batch < 1:
            raise ValueError(f"max_tokens_per_micro_batch must be >= 1 or None, got {max_tokens_per_micro_batch}")
        if logprob_chunk_tokens < 1:
            raise ValueError(f"logprob_chunk_tokens must be >= 1, got {logprob_chunk_tokens}")
        if activation_checkpointing and share_prompt_forward:
            raise ValueError(
                "share_prompt_forward needs the prompt's KV cache, which a checkpointed decoder layer cannot replay in "
                "backward; set model.share_prompt_forward to false (or leave it unset) with activation_checkpointing"
            )
        self.automatic_optimization = False
        self.policy_source = policy
        self.rollout = rollout or HFGenerateEngine()
        self.guidance = guidance or MicroGroupGuidance()
        self.prefix_cut = prefix_cut or PrefixCut()
        self.reward = reward or MathVerifyReward()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        self.train_sampling = SamplingParams(temperature=rollout_temperature)
        self.evaluation = evaluation or EvalProtocol()
        self.benchmark_metrics = torch.nn.ModuleDict()  # one BenchmarkMetrics per metric prefix, made on first use
        self.loss = loss or TrapoLoss()
        self.advantage_std_scaling = advantage_std_scaling
        self.dapo = dapo
        self.gradient_clip_val = gradient_clip_val
        self.ppo_epochs, self.mini_batches_per_step = ppo_epochs, mini_batches_per_step
        self.old_logp_source = OldLogpSource(old_logp_source)
        self.micro_batch_size = micro_batch_size
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.logprob_chunk_tokens = logprob_chunk_tokens
        self.activation_checkpointing = activation_checkpointing
        self.share_prompt_forward = not activation_checkpointing if share_prompt_forward is None else share_prompt_forward
        self.nonfinite = NonFiniteGuard(max_consecutive_nonfinite)
        self.rollout_seed = torch.initial_seed() if rollout_seed is None else rollout_seed
        self.ungraded_steps = 0
        self.max_rollout_staleness = max_rollout_staleness
        self.policy_version = 0  # optimizer steps applied to the policy; engines with a weight copy are tagged with it
        self.train_batches = 0  # batches trained on, skipped steps included: the sampling seed's step counter
        self._pending_rng_states: dict | None = None
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.tokenizer = None  # these three are loaded in configure_model, where sharding can apply (issue 3)
        self.prefixer: ExpertPrefixer | None = None

    def setup(self, stage: str) -> None:
        # Before any model is loaded: a run whose callbacks conflict fails in seconds (`callback_rules`).
        check_callbacks(self.trainer.callbacks)
        self.trainer.callbacks[:] = in_hook_order(self.trainer.callbacks)
        benchmarks = getattr(self.trainer.datamodule, "benchmark_names", None)
        if benchmarks is not None:
            self.evaluation.check_benchmarks(benchmarks)

    # -- models ---------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:  # idempotent: Lightning may call it more than once
            return
        self.tokenizer = self.policy_source.load_tokenizer()
        load = self._load_model
        self.policy = load().train()  # from_pretrained returns eval mode
        self.policy.config.use_cache = False  # training forwards need no KV cache; generate turns it on itself
        if self.activation_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Never a submodule, sharded or not: its weights are the policy folder's, so checkpoints leave it out and
        # the strategy must neither load nor save it; it is loaded where and in the dtype the policy computes.
        object.__setattr__(self, "reference", self._load_reference() if self._reference_needed() else None)
        if self.device_mesh is not None and self.rollout.weights_version is None:
            self.rollout = GatheredRollout(self.rollout)  # samples the sharded policy itself: gathered around rollouts
        self.rollout.bind(self.policy, eos_token_ids(self.tokenizer, self.policy), self.tokenizer.pad_token_id)
        self.prefixer = ExpertPrefixer(self.tokenizer, self.prefix_cut)

    def _load_model(self) -> torch.nn.Module:
        """The policy folder's model: whole on this process, or under FSDP2 only this rank's shards of it."""
        if self.device_mesh is None:
            return self.policy_source.load_model()
        return load_sharded(
            self.policy_source.resolve(), self.device_mesh, self.trainer.strategy.root_device,
            mixed_precision_policy(self.trainer.precision),
        )

    def _load_reference(self) -> torch.nn.Module:
        reference = self._load_model().requires_grad_(False).eval()
        if self.device_mesh is not None or self._trainer is None:
            return reference  # FSDP2's mixed-precision policy sets its compute dtype (`mixed_precision_policy`)
        half = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(self.trainer.precision)
        return reference.to(device=self.trainer.strategy.root_device, dtype=half)

    def _reference_needed(self) -> bool:
        """The frozen reference only serves the KL term: load it when kl_coef is set or a callback may set it."""
        return reference_needed(self.loss.kl_coef, self._trainer.callbacks if self._trainer is not None else [])

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # frozen: never dropout, whatever Lightning toggles
        return self

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.policy.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[_STATE_KEY] = {
            "rollout_seed": self.rollout_seed,
            "train_batches": self.train_batches,
            "policy_version": self.policy_version,
            "nonfinite": self.nonfinite.state_dict(),
            "rng_states": capture_rng_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit":
            for name in missing_states(self.trainer.callbacks, checkpoint):
                rank_zero_warn(f"the checkpoint holds no state of the callback {name}: it starts from its settings")
        if _STATE_KEY in checkpoint:
            state = checkpoint[_STATE_KEY]
            self.rollout_seed = state["rollout_seed"]
            self.train_batches = state["train_batches"]
            self.policy_version = state["policy_version"]
            self.nonfinite.load_state_dict(state["nonfinite"])
            self._pending_rng_states = state["rng_states"]

    def on_train_start(self) -> None:
        # Restored here, not on load: a sanity check between loading and training must not shift the streams.
        if self._pending_rng_states is not None:
            restore_rng_states(self._pending_rng_states)
            self._pending_rng_states = None

    def _sampling_seed(self, *where: int | str) -> int:
        return derive_seed(self.rollout_seed, *where, self.global_rank)

    # -- training -------------------------------------------------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> dict:
        """One TRAPO step. Returns {"samples": the step's samples, "metrics": what was logged}, which Lightning hands
        to callbacks' `on_train_batch_end` as `outputs` (guidance statistics, trust-region and KL controllers)."""
        rollout_version = self.rollout.weights_version
        check_rollout_version(rollout_version, self.policy_version, self.max_rollout_staleness)
        sampled_version = self.policy_version if rollout_version is None else rollout_version
        sampling = replace(self.train_sampling, seed=self._sampling_seed("train", self.train_batches))
        self.train_batches += 1
        timer = PhaseTimer(self.device)
        with timer.phase("rollout"):  # sampling and grading, micro-group by micro-group
            self.rollout.wake()
            groups = sample_micro_groups(
                batch.records, self.guidance, self.rollout, self.reward, self.prefixer, sampling,
                self.max_response_tokens,
            )
            self.rollout.sleep()  # on GPU the engine's KV cache and weight copy make room for the backward
        data = self._rollout_batch(groups)
        updates, grad_norms, first = self._update_policy(data, timer)
        samples = data.samples
        self._warn_if_nothing_was_graded(samples)
        metrics = step_metrics(samples, updates)
        metrics["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["train/padding_efficiency"] = first.real_tokens / max(1, first.forwarded_tokens)
        if first.policy_tokens:  # measured before any update: the sampler against the policy it sampled
            metrics["train/rollout_logp_mismatch"] = first.mismatch_sum / first.policy_tokens
        if self.dapo is not None:
            metrics["train/uniform_groups"] = float(uniform_groups(self._rewards(groups)).float().mean())
            metrics["train/rl_rows"] = float(data.rl_rows.float().mean())
        metrics["train/policy_version"] = float(sampled_version)  # the weights this step's rollouts came from
        metrics["train/lr"] = self.optimizers().param_groups[0]["lr"]
        metrics["train/nonfinite_skipped"] = float(self.nonfinite.skipped)
        metrics.update(timer.metrics())
        metrics.update({f"data/skipped_{k}": float(v) for k, v in batch.skipped.items()})
        logged = dict(metrics)
        self.log("train/reward", metrics.pop("train/reward"), prog_bar=True, batch_size=len(batch))
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(batch))
        return {"samples": samples, "metrics": logged}

    def _warn_if_nothing_was_graded(self, samples: list) -> None:
        """Every reward of the step unparseable or timed out, expert-guided samples included, is a data or verifier
        problem (answer format, time limit), not a weak policy: say so, at log-spaced steps (1st, 2nd, 4th, ...)."""
        if any(s.verdict in (Verdict.correct, Verdict.wrong) for s in samples):
            return
        self.ungraded_steps += 1
        if self.ungraded_steps & (self.ungraded_steps - 1) == 0:
            counts = Counter(s.verdict.value for s in samples)
            rank_zero_warn(
                f"training batch {self.train_batches - 1}: no reward of the step could be graded ({dict(counts)}; "
                f"{self.ungraded_steps} such steps so far). If expert-guided samples are among them, check that "
                "the data's answers match its solutions' final \\boxed{} and the reward's timeout_s."
            )

    @staticmethod
    def _rewards(groups: list[list[Sample]]) -> torch.Tensor:
        return torch.tensor([[s.reward for s in group] for group in groups])  # [P, G]

    def _rollout_batch(self, groups: list[list[Sample]]) -> RolloutBatch:
        """The step's samples with what is decided over the whole step: advantages (Dr.GRPO over each group, on
        DAPO-shaped rewards if set), which rows carry a shared prefix's SFT loss and which keep their RL loss."""
        rewards = self._rewards(groups)  # [P, G]
        samples = [s for group in groups for s in group]
        rl_rows = torch.ones_like(rewards, dtype=torch.bool)
        if self.dapo is not None:
            finished = torch.tensor([[s.finished for s in group] for group in groups])  # [P, G]
            lengths = torch.tensor([[len(s.response_ids) for s in group] for group in groups])
            generated = torch.tensor([[len(s.response_ids) > s.prefix_len for s in group] for group in groups])
            rl_rows = self.dapo.rl_rows(rewards, finished)
            rewards = self.dapo.advantage_rewards(rewards, lengths, generated, self.max_response_tokens)
        advantages = dr_grpo_advantages(rewards, scale_by_std=self.advantage_std_scaling)  # [P, G]
        return RolloutBatch(samples, advantages.flatten().float(), step_prefix_carriers(samples), rl_rows.flatten())

    def _update_policy(self, data: RolloutBatch, timer: PhaseTimer) -> tuple[list[list[LossTerms]], list[float], Accumulated]:
        """`ppo_epochs` x `mini_batches_per_step` optimizer steps on the rollout batch. Returns each update's
        micro-batch losses, each update's gradient norm, and what the first update's forward measured."""
        micro = MicroBatching(self.micro_batch_size, self.max_tokens_per_micro_batch, self.tokenizer.pad_token_id)
        if self.ppo_epochs * self.mini_batches_per_step > 1:
            with timer.phase("forward"):
                if self.old_logp_source is OldLogpSource.rollout:
                    old = [tuple(s.rollout_logprobs) for s in data.samples]
                else:
                    old = old_logprobs(data, micro, self._policy_logprobs, self.device)
            data = data._replace(old_logprobs=old)
        parts = update_rows([s.prompt_index for s in data.samples], self.mini_batches_per_step)
        updates, grad_norms, first = [], [], None
        for _ in range(self.ppo_epochs):
            for rows in parts:
                accumulated, grad_norm = self._optimize(data, rows, micro, timer)
                updates.append(accumulated.losses)
                grad_norms.append(grad_norm)
                first = first or accumulated
        return updates, grad_norms, first

    def _optimize(
        self, data: RolloutBatch, rows: list[int], micro: MicroBatching, timer: PhaseTimer
    ) -> tuple[Accumulated, float]:
        """One optimizer step over `rows` of the rollout batch. Returns what the forward and backward measured and
        the gradient norm."""
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        if self.loss.kl_coef != 0 and self.reference is None:
            raise RuntimeError(
                f"kl_coef is {self.loss.kl_coef} but no reference model was loaded: it is loaded only when "
                "model.loss.init_args.kl_coef is non-zero at start or a callback declares that it writes it "
                "(e.g. AdaptiveKL)"
            )
        accumulated = accumulate(
            data, rows, self._totals(data, rows), micro, self.loss, self.max_response_tokens, self._policy_logprobs,
            self._reference_logprobs if self.loss.kl_coef != 0 else None, self.manual_backward, self.device, timer,
        )
        with timer.phase("optimizer"):
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.gradient_clip_val))
            loss = sum(float(terms.loss.detach()) for terms in accumulated.losses)
            finite = self.trainer.strategy.reduce_boolean_decision(math.isfinite(loss) and math.isfinite(grad_norm))
            action = self.nonfinite.update(finite)
            if action is StepAction.step:
                optimizer.step()
                self.policy_version += 1
                if (scheduler := self.lr_schedulers()) is not None:
                    scheduler.step()  # manual optimization: Lightning leaves scheduling to the step
        if action is not StepAction.step:
            optimizer.zero_grad(set_to_none=True)  # the bad gradients never reach the weights or Adam's moments
            self._report_nonfinite(action, loss, grad_norm)
        return accumulated, grad_norm

    def _totals(self, data: RolloutBatch, rows: list[int]) -> Totals:
        """The update's sequence and loss-token counts, averaged over ranks (a collective: every rank calls it once
        per update), so a token mean or the entropy bonus is over all ranks' tokens, not each rank's own."""
        counts = torch.tensor([len(rows), loss_tokens(data, rows)], dtype=torch.float64, device=self.device)
        mean = self.trainer.strategy.reduce(counts, reduce_op="mean").tolist()
        return Totals(*mean)

    def _report_nonfinite(self, action: StepAction, loss: float, grad_norm: float) -> None:
        where = f"training batch {self.train_batches - 1} (optimizer step {self.global_step})"
        if action is StepAction.skip:
            rank_zero_warn(
                f"{where}: non-finite loss {loss} or gradient norm {grad_norm}; skipped this optimizer step "
                f"({self.nonfinite.consecutive} in a row, {self.nonfinite.skipped} in total; the run stops at "
                f"{self.nonfinite.max_consecutive} in a row)"
            )
            return
        path = checkpoint_path(self.trainer, f"nonfinite-stop-step{self.global_step}")
        self.trainer.save_checkpoint(path)
        raise NonFiniteLossError(
            f"{where}: {self.nonfinite.consecutive} optimizer steps in a row had a non-finite loss or gradient norm "
            f"(last: loss {loss}, grad norm {grad_norm}). The weights of the last good step are saved in {path}. "
            "Look for the cause (learning rate, data, precision) before resuming from it."
        )

    def _scores(self, model: torch.nn.Module, chunk: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """`[b, T]` log-probs and entropies of the response tokens, at the rollout temperature (what was sampled)."""
        return response_logprobs(
            model, chunk, self.train_sampling.temperature, self.logprob_chunk_tokens, self.share_prompt_forward
        )

    def _policy_logprobs(self, chunk: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self._scores(self.policy, chunk)

    @torch.no_grad()
    def _reference_logprobs(self, chunk: TrainBatch) -> torch.Tensor:
        return self._scores(self.reference, chunk)[0]

    # -- validation -----------------------------------------------------------------------------------------------
