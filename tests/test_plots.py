"""`trapo plot`: curves from CSV logs, resumed versions merged, several runs overlaid."""

import csv

import pytest

from trapo_lightning.plots import main, read_metrics, run_labels, smooth

pytest.importorskip("matplotlib")


def write_version(folder, rows):
    folder.mkdir(parents=True)
    keys = sorted({k for row in rows for k in row})
    with (folder / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def test_smooth_is_a_trailing_mean():
    # window 2: [1], [1, 3] -> 2, [3, 5] -> 4
    assert smooth([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]


def test_resumed_versions_merge_by_step(tmp_path):
    write_version(tmp_path / "run" / "version_0", [{"step": 0, "train/reward": 0.1}, {"step": 1, "train/reward": 0.2}])
    write_version(tmp_path / "run" / "version_1", [{"step": 2, "train/reward": 0.3, "val/accuracy": 0.5}])
    series = read_metrics(tmp_path / "run")
    assert series["train/reward"] == [(0, 0.1), (1, 0.2), (2, 0.3)]
    assert series["val/accuracy"] == [(2, 0.5)]


def test_plot_writes_the_figures_for_several_runs(tmp_path, capsys):
    for name, reward in (("trapo", 0.5), ("grpo", 0.2)):
        rows = [{"step": s, "train/reward": reward, "train/guided_fraction": 0.4, "val/accuracy": reward}
                for s in range(5)]
        write_version(tmp_path / name / "version_0", rows)
    main([str(tmp_path / "trapo"), str(tmp_path / "grpo"), "--out", str(tmp_path / "plots")])
    written = capsys.readouterr().out.split()
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["accuracy.png", "guidance.png", "reward.png"]
    assert all((tmp_path / "plots" / name).stat().st_size > 1000 for name in ("reward.png", "accuracy.png"))


def test_a_folder_without_logs_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.csv under"):
        read_metrics(tmp_path)


def test_runs_with_the_same_folder_name_get_distinct_labels(tmp_path):
    assert run_labels([tmp_path / "trapo" / "seed0", tmp_path / "grpo" / "seed0"]) == ["trapo/seed0", "grpo/seed0"]
    assert run_labels([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]
