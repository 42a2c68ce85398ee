"""Summarise the small-scale reproduction (runs/repro) as the Markdown table of docs/results.md.

    python scripts/repro_table.py [runs/repro]

Per method, over seeds: held-out accuracy of the base (step 0) and after training (the last validation), the
best validation, unguided train reward and guided share over the first and last 25 steps, and wall minutes per
run. Test metrics written by `trapo test` (avg@k / pass@k) are added when present.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from trapo_lightning.plots import read_metrics

METHODS = ("base", "trapo", "grpo", "sft", "sft_then_rl", "luffy", "trapo_plain_sft")


def seed_dirs(root: Path, method: str) -> list[Path]:
    if method == "base":  # evaluated only (scripts/repro_eval.sh), under runs/repro/base/test
        return [root / "base" / "test"] if (root / "base" / "test").is_dir() else []
    base = root / method
    dirs = sorted(base.glob("seed*"))
    return [d / "rl" if (d / "rl").is_dir() else d for d in dirs]


def window_mean(points: list[tuple[int, float]], first: bool, size: int = 25) -> float | None:
    values = [v for _, v in (points[:size] if first else points[-size:])]
    return statistics.mean(values) if values else None


def wall_minutes(run: Path) -> float:
    """From the training log's first file to its last write (the test logs in run/test are left out)."""
    files = list((run / "version_0").rglob("*"))
    stamps = [f.stat().st_mtime for f in files if f.is_file()]
    return (max(stamps) - min(stamps)) / 60 if stamps else float("nan")


def summary(run: Path) -> dict[str, float]:
    series = read_metrics(run)
    val = series.get("val/accuracy", [])
    row = {
        "val_start": val[0][1] if val else float("nan"),
        "val_end": val[-1][1] if val else float("nan"),
        "val_best": max(v for _, v in val) if val else float("nan"),
        "minutes": wall_minutes(run),
    }
    for key, name in (("train/reward", "reward"), ("train/guided_fraction", "guided")):
        if key in series:
            row[f"{name}_first"] = window_mean(series[key], True)
            row[f"{name}_last"] = window_mean(series[key], False)
    for key, points in series.items():
        if key.startswith("test/"):
            row[key] = points[-1][1]
    return row


def fmt(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.mean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/repro")
    rows = {m: [summary(d) for d in seed_dirs(root, m)] for m in METHODS}
    test_keys = sorted({k for runs in rows.values() for r in runs for k in r
                        if k.startswith("test/") and ("avg@" in k or "pass@" in k) and not k.endswith("pass@1")})
    columns = ["val_start", "val_end", "val_best", "reward_first", "reward_last", "guided_first", "guided_last",
               *test_keys, "minutes"]
    print("| method | seeds | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for method, runs in rows.items():
        if runs:
            cells = [fmt([r.get(c) for r in runs]) for c in columns]
            print(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
