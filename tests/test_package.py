"""The package as pip installs it: a wheel that carries its configs and runs them from any folder.

The checkout's configs/ is a link into src/aikd/configs, so a clone and an installed package read the
same files; the slow test below builds the wheel, installs it into a fresh virtual environment outside
the repository and runs it from an unrelated folder, where no configs/ folder exists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest

from aikd.cli import main
from aikd.errors import ConfigError
from aikd.shipped import CONFIG_ROOT, resolve_config, shipped_configs

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.epochs=1", "data.train_limit=300", "data.test_limit=200", "data.num_workers=0"]


def test_every_config_of_the_clone_is_a_shipped_one():
    in_clone = sorted(p.relative_to(REPO / "configs").with_suffix("").as_posix()
                      for p in (REPO / "configs").rglob("*.yaml"))
    assert in_clone == shipped_configs()
    assert len(in_clone) > 100  # every paper setting, not an empty folder


def test_a_shipped_name_resolves_with_or_without_its_suffix_and_a_real_path_wins(tmp_path, monkeypatch):
    assert resolve_config("fmnist_proxy/aikd") == CONFIG_ROOT / "fmnist_proxy" / "aikd.yaml"
    assert resolve_config("fmnist_proxy/aikd.yaml") == CONFIG_ROOT / "fmnist_proxy" / "aikd.yaml"
    own = tmp_path / "fmnist_proxy" / "aikd.yaml"
    own.parent.mkdir()
    own.write_text("method: ce\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_config("fmnist_proxy/aikd.yaml") == Path("fmnist_proxy/aikd.yaml")  # the user's own file


def test_an_unknown_name_is_refused_with_the_closest_shipped_one():
    with pytest.raises(ConfigError, match=r"'fmnist_proxy/aikdd' does not exist.*aikd configs.*Did you mean "
                                          r"'fmnist_proxy/aikd'"):
        resolve_config("fmnist_proxy/aikdd")


def test_aikd_configs_lists_names_with_method_model_and_dataset(capsys):
    assert main(["configs", "cifar100/aikd"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "method", "model", "dataset"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["cifar100/aikd_preact_resnet18"] == ["aikd", "preact_resnet18", "cifar100"]
    assert all(name.startswith("cifar100/aikd") for name in rows)
    assert main(["configs", "--show", "fmnist_proxy/ce"]) == 0
    assert capsys.readouterr().out == (CONFIG_ROOT / "fmnist_proxy" / "ce.yaml").read_text()


def test_train_takes_a_shipped_name_from_any_folder_and_records_its_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert main(["train", "-c", "fashion_mnist/ce", "-o", "run", "-q", "model.name=small_cnn", *TINY]) == 0
    headline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert headline["method"] == "ce" and headline["epochs"] == 1
    assert main(["sweep", "-c", "fmnist_proxy/ce", "--seeds", "0", "-o", "sweep", "-q", *TINY]) == 0
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert rows[0]["config"] == str(CONFIG_ROOT / "fmnist_proxy" / "ce.yaml")
    assert (tmp_path / "sweep" / "fmnist_proxy" / "ce" / "seed0" / "student" / "summary.json").is_file()


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


TOP_LEVEL_LEFT_OUT = {".git", ".venv", "build", "runs", "results", "docs", "data"}  # run outputs, records, data


def _not_packaged(folder: str, names: list[str]) -> set[str]:
    """What the wheel's copy of the clone leaves out: big top-level folders, caches and build leftovers."""
    top = Path(folder) == REPO
    return {n for n in names if (top and n in TOP_LEVEL_LEFT_OUT) or n == "__pycache__" or n.endswith(".egg-info")
            or (n.startswith(".") and n.endswith("_cache"))}


@pytest.mark.slow
def test_the_wheel_installed_outside_the_clone_runs_the_demo_and_a_shipped_config():
    """pip wheel . -> a fresh venv in an unrelated folder -> aikd demo and aikd train -c <name> from there.

    The fresh environment gets its dependencies (torch and the rest) from this one through a .pth line, which
    adds their folder but not this environment's own .pth files, so the checkout's src/ stays out of reach:
    the aikd that runs is the wheel's.
    """
    work = Path(tempfile.mkdtemp(prefix="aikd-wheel-"))
    try:
        source = work / "source"  # a copy: setuptools' build/ folder never lands in (or leaks from) the clone
        shutil.copytree(REPO, source, symlinks=True, ignore=_not_packaged)
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
              str(work / "dist"), str(source)], source, dict(os.environ))
        wheel = next((work / "dist").glob("aikd-*.whl"))
        names = zipfile.ZipFile(wheel).namelist()
        shipped = {f"aikd/configs/{n}.yaml" for n in shipped_configs()}
        assert shipped <= set(names), sorted(shipped - set(names))[:5]
        _run([sys.executable, "-m", "venv", str(work / "venv")], work, dict(os.environ))
        python = work / "venv" / "bin" / "python"
        site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work,
                    dict(os.environ)).stdout.strip()
        Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        _run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], work, env)
        elsewhere = work / "elsewhere"
        elsewhere.mkdir()
        where = _run([str(python), "-c", "import aikd; print(aikd.__file__)"], elsewhere, env).stdout.strip()
        assert where.startswith(str(work / "venv")), where
        aikd = str(work / "venv" / "bin" / "aikd")
        listed = _run([aikd, "configs", "fmnist_proxy"], elsewhere, env).stdout
        assert "fmnist_proxy/aikd " in listed
        demo = _run([aikd, "demo", "-o", "demo", "-q", *TINY], elsewhere, env).stdout
        assert "AI-KD - Baseline, seed 0" in demo
        trained = _run([aikd, "train", "-c", "fmnist_proxy/pskd", "-o", "pskd", "-q", *TINY], elsewhere, env)
        assert json.loads(trained.stdout.strip().splitlines()[-1])["method"] == "pskd"
        assert (elsewhere / "pskd" / "summary.json").is_file()
    finally:
        shutil.rmtree(work, ignore_errors=True)
