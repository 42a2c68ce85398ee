"""Summarise the small-scale reproduction (scripts/repro.py) as the Markdown tables of docs/results.md.

    python scripts/repro_table.py [runs/repro]
    python scripts/repro_table.py runs/repro --at 3e-5     # every method at one rate (where all seeds ran there)

Per task and method, at the method's best learning rate (`best_lr.json`), over seeds: held-out avg@8 with its 95%
two-way bootstrap interval over problems and seeds (trapo_lightning/bootstrap.py, from the verdicts in each run's
`test_completions.jsonl`), pass@8, validation accuracy at the start and end, unguided training reward and guided
share over the last 25 steps, and wall minutes. Then every method against TRAPO, paired: the difference of avg@8
and its interval; "noise" where the interval holds 0. Then the sweep: every rate's final validation accuracy on the
sweep seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from repro import best_sft_loss, final_val_accuracy  # scripts/ is on the path when run as a script
from trapo_lightning.bootstrap import bootstrap_interval, paired_difference
from trapo_lightning.plots import read_metrics

METHODS = ("base", "trapo", "grpo", "sft", "sft_then_rl", "luffy", "trapo_plain_sft")


def accuracy_grid(runs: list[Path]) -> np.ndarray | None:
    """`[seeds, problems]`: each problem's share of correct test answers, problems in file order."""
    grid = []
    for run in runs:
        files = sorted((run / "test").rglob("test_completions.jsonl"))
        if not files:
            return None
        per_problem: dict[str, list[bool]] = {}
        for line in files[-1].read_text().splitlines():
            row = json.loads(line)
            per_problem.setdefault(row["problem"], []).append(row["verdict"] == "correct")
        grid.append([statistics.mean(v) for v in per_problem.values()])
    if len({len(row) for row in grid}) != 1:
        raise ValueError(f"runs {runs} were tested on different numbers of problems")
    return np.array(grid)


def window_mean(points: list[tuple[int, float]], size: int = 25) -> float | None:
    values = [v for _, v in points[-size:]]
    return statistics.mean(values) if values else None


def wall_minutes(run: Path) -> float:
    """From the training log's first file to its last write (the test logs are left out)."""
    stamps = [f.stat().st_mtime for f in (run / "version_0").rglob("*") if f.is_file()]
    return (max(stamps) - min(stamps)) / 60 if stamps else float("nan")


def training_summary(run: Path) -> dict[str, float | None]:
    series = read_metrics(run / "version_0")
    val = series.get("val/accuracy", [])
    return {
        "val_start": val[0][1] if val else None,
        "val_end": val[-1][1] if val else None,
        "reward_last": window_mean(series.get("train/reward", [])),
        "guided_last": window_mean(series.get("train/guided_fraction", [])),
        "minutes": wall_minutes(run),
    }


def test_metric(run: Path, key: str) -> float | None:
    series = read_metrics(run / "test") if (run / "test").is_dir() else {}
    return series[key][-1][1] if key in series else None


def fmt(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.mean(values):.3f}" if values else "-"


def method_runs(task: Path, method: str, rates: dict[str, float]) -> list[Path]:
    if method == "base":
        return [task / "base"] if (task / "base" / "test").is_dir() else []
    if method not in rates:
        return []
    return sorted((task / method / f"lr{rates[method]:g}").glob("seed*"))


def task_tables(task: Path, at: float | None = None) -> None:
    rates = json.loads((task / "best_lr.json").read_text())
    if at is not None:
        rates = {m: (at if m != "sft_stage" else r) for m, r in rates.items()}
    runs = {m: method_runs(task, m, rates) for m in METHODS}
    grids = {m: accuracy_grid(r) for m, r in runs.items() if r}
    print(f"### Task `{task.name}`" + ("" if at is None else f", every method at lr {at:g}") + "\n")
    print("| method | lr | seeds | test avg@8 [95% CI] | test pass@8 | val_start | val_end | reward_last | "
          "guided_last | minutes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method, method_dirs in runs.items():
        if not method_dirs:
            continue
        grid = grids.get(method)
        score = "-"
        if grid is not None:
            interval = bootstrap_interval(grid)
            score = f"{interval.mean:.3f} [{interval.low:.3f}, {interval.high:.3f}]"
        train = [training_summary(r) for r in method_dirs] if method != "base" else []
        cells = [fmt([t[c] for t in train]) for c in ("val_start", "val_end", "reward_last", "guided_last", "minutes")]
        rate = f"{rates[method]:g}" if method in rates else "-"
        pass8 = fmt([test_metric(r, "test/pass@8") for r in method_dirs])
        print(f"| {method} | {rate} | {len(method_dirs)} | {score} | {pass8} | " + " | ".join(cells) + " |")
    if "sft_stage" in rates:
        print(f"\nSFT-then-RL's SFT stage: lr {rates['sft_stage']:g}, steps to its best held-out SFT loss: "
              + ", ".join(sft_stage_steps(task, rates["sft_stage"])))
    if grids.get("trapo") is not None:
        print("\n| TRAPO minus | avg@8 difference [95% CI] | verdict |")
        print("|---|---|---|")
        for method, grid in grids.items():
            if method == "trapo" or grid is None:
                continue
            trapo = grids["trapo"]
            if method == "base":
                grid = np.repeat(grid, trapo.shape[0], axis=0)  # one base model, paired with every seed
            if grid.shape != trapo.shape:
                continue
            d = paired_difference(trapo, grid)
            verdict = "noise" if d.holds(0.0) else ("TRAPO better" if d.mean > 0 else "TRAPO worse")
            print(f"| {method} | {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] | {verdict} |")
    if at is None:
        sweep_table(task, rates)
    print()


def sft_stage_steps(task: Path, lr: float) -> list[str]:
    out = []
    for seed in sorted((task / "sft_stage" / f"lr{lr:g}").glob("seed*")):
        points = read_metrics(seed / "version_0").get("val/expert_nll", [])
        if points:
            step, value = min(points, key=lambda p: p[1])
            out.append(f"{seed.name} {step + 1} (NLL {value:.3f}, stopped at {points[-1][0] + 1}, "
                       f"{wall_minutes(seed):.1f} min)")
    return out


def sweep_table(task: Path, rates: dict[str, float]) -> None:
    swept = sorted({p.parent.name for p in task.glob("*/lr*/seed*")})
    if not swept:
        return
    print("\nSweep (mean validation accuracy over the last two validations; SFT stage: best held-out SFT NLL):\n")
    methods = [m for m in (*METHODS[1:], "sft_stage") if (task / m).is_dir()]
    lrs = sorted({float(p.name[2:]) for m in methods for p in (task / m).glob("lr*")})
    print("| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |")
    print("|---|" + "---|" * len(lrs))
    for method in methods:
        cells = []
        for lr in lrs:
            seeds = sorted((task / method / f"lr{lr:g}").glob("seed*"))
            if not seeds:
                cells.append("-")
                continue
            # the criteria scripts/repro.py chose the rates by
            value = (best_sft_loss if method == "sft_stage" else final_val_accuracy)(seeds[0] / "version_0")
            mark = " *" if rates.get(method) == lr else ""
            cells.append(f"{value:.3f}{mark}")
        print(f"| {method} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="runs/repro")
    parser.add_argument("--at", type=float, help="every method at this learning rate instead of its best")
    args = parser.parse_args()
    root = Path(args.root)
    tasks = sorted(p.parent for p in root.glob("*/best_lr.json"))
    if not tasks:
        raise SystemExit(f"no task under {root} has a best_lr.json yet: run scripts/repro.py first")
    for task in tasks:
        task_tables(task, args.at)


if __name__ == "__main__":
    main()
