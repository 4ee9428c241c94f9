"""The package installs as README says: dependencies declared once (requirements*.txt agree with
pyproject.toml), one version, and a `vitdemo` command that works from any folder.

The clean-install test builds the package into a new virtual environment without downloading
anything: its dependencies (torch alone is gigabytes) are this environment's, linked in, all
but vitdemo itself.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import vitdemo

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements(name: str) -> list[str]:
    """The requirement lines of a requirements file, without comments and `-r` includes."""
    lines = [line.split("#", 1)[0].strip() for line in (ROOT / name).read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-r")]


def normalise(requirement: str) -> str:
    name, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '-', name).lower()}=={version}"


def test_requirements_files_agree_with_pyproject():
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    dev, app = ([r for r in extras[name] if not r.startswith("vitdemo[")] for name in ("dev", "app"))
    runtime = project["dependencies"] + app + extras["onnx"]
    assert sorted(map(normalise, requirements("requirements.txt"))) == sorted(map(normalise, runtime))
    assert sorted(map(normalise, requirements("requirements-dev.txt"))) == sorted(map(normalise, dev))
    assert "vitdemo[onnx]" in extras["app"] and "vitdemo[app]" in extras["dev"]
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text()
    pins = {normalise(r).split("==")[0]: r.split("==")[1] for r in runtime}
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"  # the builds this project is tested with
    assert all("==" in r for r in runtime + dev), "every dependency is pinned"


def test_version_is_written_once():
    assert PYPROJECT["project"]["dynamic"] == ["version"] and "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vitdemo.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", vitdemo.__version__)
    assert PYPROJECT["project"]["scripts"] == {"vitdemo": "vitdemo.cli:main"}


def quick_start() -> list[str]:
    """The command lines of README's quick start section."""
    text = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in text.splitlines() if line.startswith("    ") and line.strip()]


def test_quick_start_is_two_commands_that_install_the_package_as_ci_does():
    app, tests = quick_start()
    for command in (app, tests):
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -e ")
    assert app.endswith("&& python app.py") and 'pip install -e ".[app]"' in app
    assert tests.endswith("&& python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    install = tests.split(" && ")[2]
    assert install == 'pip install -e ".[dev]"' and f"\n{install}\n" in ci and "\npython -m pytest\n" in ci


def site_packages() -> list[Path]:
    return [Path(p) for p in dict.fromkeys(site.getsitepackages()) if Path(p).is_dir()]


@pytest.mark.slow
def test_clean_venv_install_gives_a_vitdemo_command_that_works_anywhere(tmp_path):
    # What a wheel is built from, copied: pip builds in the source tree (build/, *.egg-info).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "vitdemo", src / "vitdemo", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python, command = venv / "bin" / "python", venv / "bin" / "vitdemo"
    purelib = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                           text=True).strip())
    # This environment's packages (pip, setuptools, torch, ...), each linked, except vitdemo itself.
    deps = tmp_path / "deps"
    deps.mkdir()
    for directory in site_packages():
        for entry in directory.iterdir():
            name = entry.name.lower()
            if name.startswith(("vitdemo", "__editable__")) or entry.suffix == ".pth" or (deps / entry.name).exists():
                continue
            (deps / entry.name).symlink_to(entry)
    (purelib / "dependencies.pth").write_text(f"{deps}\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "--no-cache-dir", str(src)], capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr

    # Every file of the package is installed (a new module or data file the build would leave out).
    wanted = {p.relative_to(src) for p in (src / "vitdemo").rglob("*") if p.is_file()}
    missing = sorted(p for p in wanted if not (purelib / p).is_file())
    assert wanted and not missing, missing

    elsewhere = tmp_path / "elsewhere"  # no vitdemo/ folder here: only the installed package can be imported
    elsewhere.mkdir()

    def run(*args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], cwd=elsewhere, capture_output=True, text=True, env=env,
                              timeout=timeout)

    where = run(python, "-c", "import importlib.metadata as m, vitdemo; print(vitdemo.__file__); "
                              "print(vitdemo.__version__, m.version('vitdemo'))")
    assert where.returncode == 0, where.stderr
    path, versions = where.stdout.split("\n")[:2]
    assert Path(path).is_relative_to(purelib) and versions == f"{vitdemo.__version__} {vitdemo.__version__}"

    helped = run(command, "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: vitdemo ") and "train" in helped.stdout and "predict" in helped.stdout
    as_module = run(python, "-m", "vitdemo", "--help")
    same = [" ".join(out.replace("python -m vitdemo", "vitdemo").split()) for out in (as_module.stdout, helped.stdout)]
    assert as_module.returncode == 0 and same[0] == same[1]  # the same command, but for its name in usage lines

    trained = run(command, "train", "--data", "synthetic", "--out", "run", "--epochs", "1", "--batch-size", "64",
                  "--device", "cpu", "--set", "depth=1", "embed_dim=32", "num_heads=2", "mlp_dim=64")
    assert trained.returncode == 0, trained.stderr
    assert "Epoch: 1 | train_loss: " in trained.stdout and (elsewhere / "run" / "model.safetensors").is_file()

    # The shipped model lives in the repository, not in a (non-editable) installation: a clear error.
    Path(elsewhere / "x.png").write_bytes((ROOT / "docs" / "examples" / "ship.png").read_bytes())
    predicted = run(command, "predict", "x.png")
    assert predicted.returncode == 2 and predicted.stderr.strip().splitlines()[-1].startswith("error: no --checkpoint")
    assert "Traceback" not in predicted.stderr
    assert (elsewhere / "run").is_dir() and sorted(p.name for p in elsewhere.iterdir()) == ["run", "x.png"]


def test_readme_cifar10_image_folder_recipe_writes_class_folders(tmp_path, monkeypatch):
    """README's snippet, run on a stand-in for torchvision's CIFAR-10 (six images): one folder
    per class that `--data FOLDER` reads back with CIFAR-10's classes, images and labels."""
    import numpy as np
    import torchvision
    from PIL import Image

    from vitdemo.data import CIFAR10_CLASSES, crop_for, load_source

    text = (ROOT / "README.md").read_text()
    section = text.split("### CIFAR-10 as an image folder", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    pixels = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = [3, 0, 9, 3, 1, 0]

    class StandIn:
        classes = list(CIFAR10_CLASSES)

        def __init__(self, root, train, download):
            assert train and download and Path(root).parent == tmp_path / ".cache" / "vitdemo" / "cifar10"

        def __iter__(self):
            return ((Image.fromarray(p), y) for p, y in zip(pixels, labels))

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", StandIn)
    exec(compile(snippet, "README.md", "exec"), {})
    folder = tmp_path / ".cache" / "vitdemo" / "cifar10" / "train"
    assert sorted(p.name for p in folder.iterdir()) == sorted({CIFAR10_CLASSES[y] for y in labels})
    assert sorted(p.name for p in (folder / "cat").iterdir()) == ["00000.png", "00003.png"]
    for name in CIFAR10_CLASSES:  # the stand-in lacks some classes: give each a file, as the real set has
        if not (folder / name).is_dir():
            (folder / name).mkdir()
            Image.fromarray(pixels[0]).save(folder / name / "99999.png")
    data = load_source(str(folder), crop_for(32))  # what `--data FOLDER` reads
    assert data.class_names == list(CIFAR10_CLASSES)
    cat = CIFAR10_CLASSES.index("cat")
    assert (data.labels == cat).sum() == 2
    got = data.images[data.labels == cat][0].permute(1, 2, 0).numpy()
    assert np.array_equal(got, pixels[0])  # PNG: lossless, in the data set's order
