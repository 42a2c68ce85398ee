"""The built wheel: the top-level callbacks/ folder installs as `trapo_lightning.callbacks`, and nothing else.

The editable install used for development maps folders with a finder, so only a real (non-editable) wheel shows
what users get. The project is copied out first so the build writes nothing (build/, *.egg-info) into the repo.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "trapo_lightning", "callbacks"]

pytestmark = pytest.mark.slow

CHECK = """
import importlib.util, json
import trapo_lightning, trapo_lightning.callbacks, trapo_lightning.cli, trapo_lightning.data.datamodule
from trapo_lightning.callbacks import ValidateOnStart
print(json.dumps({
    "package": trapo_lightning.__file__,
    "callbacks": trapo_lightning.callbacks.__file__,
    "datamodule": trapo_lightning.data.datamodule.__file__,
    "callback_class": ValidateOnStart.__module__,
    "top_level_callbacks": importlib.util.find_spec("callbacks") is not None,
}))
"""


def run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif path.is_file():
            shutil.copy2(path, src / name)
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(dist), str(src)])
    (built,) = dist.glob("trapo_lightning-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)])
    return target


def test_wheel_holds_the_callbacks_inside_the_package_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "trapo_lightning/callbacks/__init__.py" in names
    assert "trapo_lightning/callbacks/validate_on_start.py" in names
    assert "trapo_lightning/data/datamodule.py" in names
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"trapo_lightning"}
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "trapo = trapo_lightning.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_imports_callbacks_from_the_package(installed, tmp_path):
    assert not (installed / "callbacks").exists()
    assert {p.name for p in installed.iterdir() if p.name != "bin"} == {
        "trapo_lightning", *(p.name for p in installed.glob("*.dist-info"))
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(installed), WANDB_MODE="offline")
    result = run([sys.executable, "-c", CHECK], cwd=tmp_path, env=env)  # cwd outside the repo
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("package", "callbacks", "datamodule"):
        assert Path(found[key]).resolve().is_relative_to(installed.resolve()), (key, found[key])
    assert found["callbacks"].endswith(os.path.join("trapo_lightning", "callbacks", "__init__.py"))
    assert found["callback_class"] == "trapo_lightning.callbacks.validate_on_start"
    assert not found["top_level_callbacks"]
