"""`trapo plot RUN_DIR [RUN_DIR ...]`: PNG curves from the CSV logs of one or several runs.

A run directory is a CSVLogger folder (`runs/trapo`), one of its `version_N` folders, or any folder holding
`metrics.csv` files below it. Versions are merged by step, so a resumed run plots as one curve. Several runs are
overlaid, labelled by folder name: the figures of a comparison (TRAPO vs GRPO vs SFT ...) come from one command.
Figures: `reward.png` (train/reward, smoothed), `accuracy.png` (val/accuracy and any val/*/avg@k or pass@k),
`guidance.png` (share of expert-guided samples, per prefix ratio for a single run).
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] over every metrics.csv below `run_dir`, later files winning on repeated steps."""
    files = sorted(Path(run_dir).rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {run_dir}; pass the CSVLogger folder of a run (runs/trapo)")
    series: dict[str, dict[int, float]] = {}
    for path in files:
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                step = int(row.pop("step"))
                for key, value in row.items():
                    if value not in ("", None) and key != "epoch":
                        series.setdefault(key, {})[step] = float(value)
    return {key: sorted(points.items()) for key, points in series.items()}


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over at most `window` points (the first points average what exists)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(run_dirs: Sequence[Path], out_dir: Path, window: int = 20) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {label: read_metrics(Path(d)) for label, d in zip(run_labels(run_dirs), run_dirs)}
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "reward.png": ("train/reward (unguided samples)", lambda key: key == "train/reward", window),
        "accuracy.png": ("held-out accuracy", _accuracy_key(len(runs)), 1),
        "guidance.png": ("share of expert-guided samples", _guidance_key(len(runs)), window),
    }
    written = []
    for name, (title, wanted, smoothing) in figures.items():
        figure, axes = plt.subplots(figsize=(7, 4))
        for label, series in runs.items():
            drawn = []
            for key in sorted(k for k in series if wanted(k)):
                if series[key] in drawn:  # avg@1 and pass@1 repeat val/accuracy at one sample per problem
                    continue
                drawn.append(series[key])
                steps, values = zip(*series[key])
                tag = label if len(runs) > 1 else key
                axes.plot(steps, smooth(values, smoothing), label=tag)
        axes.set(title=title, xlabel="step")
        if axes.lines:
            axes.legend(fontsize="small")
            axes.grid(alpha=0.3)
            figure.tight_layout()
            figure.savefig(out_dir / name, dpi=110)
            written.append(out_dir / name)
        plt.close(figure)
    return written


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """The shortest trailing parts of each path that tell the runs apart (trapo/seed0 vs grpo/seed0)."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in run_dirs]


def _is_accuracy(key: str) -> bool:
    return key.endswith("accuracy") or "avg@" in key or "pass@" in key


def _accuracy_key(num_runs: int):
    if num_runs > 1:  # one line per run
        return lambda key: key == "val/accuracy"
    return lambda key: key.startswith("val/") and _is_accuracy(key)


def _guidance_key(num_runs: int):
    if num_runs > 1:
        return lambda key: key == "train/guided_fraction"
    return lambda key: key == "train/guided_fraction" or key.startswith("train/guidance_")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="trapo plot", description="PNG curves from the CSV logs of runs.")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="CSVLogger folders of one or more runs")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/plots)")
    parser.add_argument("--window", type=int, default=20, help="moving-average window for per-step curves")
    args = parser.parse_args(argv)
    out = args.out or (args.run_dirs[0] / "plots")
    for path in plot_runs(args.run_dirs, out, args.window):
        print(path)


if __name__ == "__main__":
    main()
