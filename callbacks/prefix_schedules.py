"""Prefix scheduling as callbacks: which samples start from an expert prefix, and how long it is (TRAPO.md,
"Per-prompt sampling" and "Neighbours"). An ablation swaps the callback, never the module.

Each callback owns one schedule and writes exactly one attribute, `pl_module.guidance` (a pure `GuidanceRule`),
before every training step. Every schedule here is a parametrisation of the same micro-group rule, so all of them
run through one sampling code path:
- `AdaptiveGuidance`: TRAPO's micro-groups (the paper's sizes, thresholds and ratios by default), plus statistics
  of how useful each guidance level is over training.
- `FixedPrefix`: every prompt gets `guided_samples` rollouts from a prefix of fixed ratio.
- `CosineHint`: UFT-style hint, a prefix ratio cosine-annealed from 0.95 to 0.05 over `anneal_steps`, then 0.
  (UFT samples the hint length from Binomial(L, p(t)); we use its mean p(t), so the schedule is deterministic.)
- `LuffyGuidance`: LUFFY's G - 1 on-policy rollouts + 1 full expert trace (pair with `model.loss.init_args.sft: luffy`).
- `NoGuidanceSchedule`: plain GRPO.
- `SFTOnly`: one full expert trace per prompt and nothing sampled (pair with `model.sft_loss: plain` for SFT).
Only one prefix schedule may be in a run (each declares `writes = ("guidance",)`, and a setting has one writer:
`trapo_lightning.callback_rules`); without one, the module's own `guidance` argument applies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch

from trapo_lightning.callback_rules import writer_state_key
from trapo_lightning.guidance import GuidanceRule, MicroGroupGuidance, NoGuidance
from trapo_lightning.schedules import ScheduleShape, scheduled_value

ALWAYS = math.inf  # a threshold no mean reward reaches: the micro-group is always guided


class PrefixSchedule(L.Callback):
    """Base class: installs `rule(step)` as `pl_module.guidance` before each training step."""

    writes = ("guidance",)

    def rule(self, step: int) -> GuidanceRule:
        raise NotImplementedError

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        pl_module.guidance = self.rule(trainer.global_step)


def _check_group_size(group_size: int) -> None:
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")


def _guided_tail(group_size: int, guided: int, ratio: float) -> MicroGroupGuidance:
    """`group_size - guided` unguided rollouts, then `guided` always started from the prefix at `ratio`."""
    if guided == group_size:
        return MicroGroupGuidance(sizes=[guided], thresholds=[ALWAYS], prefix_ratios=[ratio])
    return MicroGroupGuidance(
        sizes=[group_size - guided, guided], thresholds=[-1.0, ALWAYS], prefix_ratios=[0.0, ratio]
    )


class FixedPrefix(PrefixSchedule):
    def __init__(self, prefix_ratio: float = 0.5, group_size: int = 8, guided_samples: int = 8) -> None:
        """
        Args:
            prefix_ratio: Share of the expert solution given as prefix, in (0, 1].
            group_size: Rollouts per prompt, G.
            guided_samples: How many of the G rollouts start from the prefix (the rest are sampled unguided first).
        """
        _check_group_size(group_size)
        if not 0.0 < prefix_ratio <= 1.0:
            raise ValueError(f"prefix_ratio must be in (0, 1], got {prefix_ratio}")
        if not 1 <= guided_samples <= group_size:
            raise ValueError(f"guided_samples must be in [1, group_size={group_size}], got {guided_samples}")
        self._rule = _guided_tail(group_size, guided_samples, prefix_ratio)

    def rule(self, step: int) -> GuidanceRule:
        return self._rule


class CosineHint(PrefixSchedule):
    def __init__(
        self, start_ratio: float = 0.95, end_ratio: float = 0.05, anneal_steps: int = 500, group_size: int = 8
    ) -> None:
        """
        Args:
            start_ratio: Hint (prefix) ratio at step 0 (UFT: 0.95).
            end_ratio: Hint ratio reached at `anneal_steps` (UFT: 0.05); after that, no hint at all.
            anneal_steps: Length of the cosine anneal in optimizer steps.
            group_size: Rollouts per prompt, G; all of them continue the same hint.
        """
        _check_group_size(group_size)
        if not (0.0 <= end_ratio <= 1.0 and 0.0 <= start_ratio <= 1.0):
            raise ValueError(f"hint ratios must be in [0, 1], got {start_ratio} and {end_ratio}")
        if anneal_steps < 1:
            raise ValueError(f"anneal_steps must be >= 1, got {anneal_steps}")
        self.start_ratio, self.end_ratio, self.anneal_steps = start_ratio, end_ratio, anneal_steps
        self.group_size = group_size

    def hint_ratio(self, step: int) -> float:
        if step >= self.anneal_steps:
            return 0.0
        return scheduled_value(step, self.start_ratio, self.end_ratio, self.anneal_steps, ScheduleShape.cosine)

    def rule(self, step: int) -> GuidanceRule:
        ratio = self.hint_ratio(step)
        return _guided_tail(self.group_size, self.group_size, ratio) if ratio > 0 else NoGuidance(self.group_size)


class LuffyGuidance(PrefixSchedule):
    def __init__(self, group_size: int = 8) -> None:
        """
        Args:
            group_size: Rollouts per prompt, G: G - 1 on-policy, then 1 full expert trace.
        """
        _check_group_size(group_size)
        if group_size < 2:
            raise ValueError(f"LUFFY needs group_size >= 2 (G - 1 on-policy + 1 expert), got {group_size}")
        self._rule = _guided_tail(group_size, 1, 1.0)

    def rule(self, step: int) -> GuidanceRule:
        return self._rule


class NoGuidanceSchedule(PrefixSchedule):
    def __init__(self, group_size: int = 8) -> None:
        """
        Args:
            group_size: Rollouts per prompt, G, all on-policy (plain GRPO).
        """
        _check_group_size(group_size)
        self._rule = NoGuidance(group_size)

    def rule(self, step: int) -> GuidanceRule:
        return self._rule


class SFTOnly(PrefixSchedule):
    """Each prompt's group is its full expert solution once: the loss is SFT on expert tokens only (its advantage
    is r - mean(r) = 0, so no RL term), and nothing is sampled."""

    def __init__(self) -> None:
        self._rule = _guided_tail(1, 1, 1.0)

    def rule(self, step: int) -> GuidanceRule:
        return self._rule


class AdaptiveGuidance(PrefixSchedule):
    def __init__(
        self,
        sizes: Sequence[int] = (4, 2, 1, 1),
        thresholds: Sequence[float] = (-1.0, 0.5, 0.7, 0.9),
        prefix_ratios: Sequence[float] = (0.0, 0.25, 0.5, 1.0),
        ema_decay: float = 0.95,
    ) -> None:
        """TRAPO's micro-group guidance, measuring each guidance level's utility over training.

        Per guided level (prefix ratio > 0) it logs under `guidance/L<ratio>/`: `triggered` (share of prompts that
        reached it this step), `reward` (mean reward of the rollouts that continued its prefix; 1.0 for the whole
        expert solution by construction), their moving averages `triggered_ema` / `reward_ema`, and their values
        over the whole run so far, `triggered_cumulative` / `reward_cumulative` (from the summed counts, which are
        checkpointed: a resumed run continues them), so one sees which levels keep being needed, whether guided
        continuations succeed more as training goes on, and how much each level was used in the run as a whole.
        The counts are summed over ranks before anything is computed, so every rank logs and keeps the same numbers.

        Args:
            sizes: Rollouts per micro-group (paper: 4, 2, 1, 1).
            thresholds: Guide micro-group i when the mean reward of earlier samples is below thresholds[i].
            prefix_ratios: Expert-prefix ratio of micro-group i when guided (paper: 0, 0.25, 0.5, 1.0).
            ema_decay: Decay of the moving averages, in [0, 1).
        """
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self._rule = MicroGroupGuidance(sizes, thresholds, prefix_ratios)
        self.levels = sorted({g.prefix_ratio for g in self._rule.micro_groups if g.prefix_ratio > 0})
        self.ema_decay = ema_decay
        self.totals = {ratio: dict.fromkeys(_COUNTS, 0.0) for ratio in self.levels}
        self.ema: dict[float, dict[str, float]] = {}

    def rule(self, step: int) -> GuidanceRule:
        return self._rule

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int):
        counts = self._level_counts((outputs or {}).get("samples", []), pl_module.device)
        # Summed over ranks (a collective every rank enters, with or without samples), on the module's device: an
        # NCCL process group has no CPU tensors, and Lightning does not move them.
        counts = trainer.strategy.reduce(counts, reduce_op="sum")  # [levels, 4]
        if counts.numel() and counts[0, 1] > 0:  # column 1, the prompts seen, is the same for every level
            pl_module.log_dict(self.update(counts.tolist()), on_step=True, on_epoch=False, batch_size=1)

    def update(self, counts: list[list[float]]) -> dict[str, float]:
        """Adds one step's counts over all ranks (per level: prompts that reached it, prompts seen, summed reward
        and number of its samples) to the run's totals and moving averages. Returns the metrics to log."""
        metrics = {}
        for ratio, step in zip(self.levels, counts):
            totals = self.totals[ratio]
            for key, value in zip(_COUNTS, step):
                totals[key] += value
            now = _rates(dict(zip(_COUNTS, step)))
            ema = self.ema.setdefault(ratio, dict(now))
            name = f"guidance/L{ratio:.2f}"
            for key, value in now.items():
                ema[key] = self.ema_decay * ema.get(key, value) + (1 - self.ema_decay) * value
                metrics[f"{name}/{key}"] = value
                metrics[f"{name}/{key}_ema"] = ema[key]
            metrics.update({f"{name}/{key}_cumulative": value for key, value in _rates(totals).items()})
        return metrics

    def _level_counts(self, samples, device: torch.device) -> torch.Tensor:
        """[levels, 4]: prompts that reached the level, prompts seen, summed reward and count of its samples."""
        prompts = {s.prompt_index for s in samples}
        rows = []
        for ratio in self.levels:
            at_level = [s for s in samples if s.prefix_ratio == ratio]
            reached = {s.prompt_index for s in at_level}
            rows.append([len(reached), len(prompts), sum(s.reward for s in at_level), len(at_level)])
        return torch.tensor(rows, dtype=torch.float64, device=device).reshape(len(self.levels), len(_COUNTS))

    @property
    def state_key(self) -> str:
        return writer_state_key(self)

    def state_dict(self) -> dict:
        return {"totals": {str(r): dict(v) for r, v in self.totals.items()},
                "ema": {str(r): dict(v) for r, v in self.ema.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.totals = {float(r): dict(v) for r, v in state_dict["totals"].items()}
        self.ema = {float(r): dict(v) for r, v in state_dict["ema"].items()}


_COUNTS = ("triggered", "prompts", "reward", "samples")  # a level's counts, in `_level_counts`' column order


def _rates(counts: dict[str, float]) -> dict[str, float]:
    """A level's share of prompts that reached it, and the mean reward of its samples when it had any."""
    rates = {"triggered": counts["triggered"] / max(counts["prompts"], 1.0)}
    if counts["samples"]:
        rates["reward"] = counts["reward"] / counts["samples"]
    return rates
