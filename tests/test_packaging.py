"""Installed like a real package: the built wheel works from any folder; init and config commands."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from conftest import DATA_ROOT, ROOT, needs_fashion
from typer.testing import CliRunner

from fcclass.cli import app

runner = CliRunner(env={"COLUMNS": "200"})


def test_init_writes_an_editable_starter_config_that_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["init"])
    assert res.exit_code == 0, res.output
    written = tmp_path / "fashion_mnist.yaml"
    assert "fcclass train -c fashion_mnist.yaml" in res.output
    assert written.read_text().startswith("#")  # the shipped file with its comments, to edit
    again = runner.invoke(app, ["init"])
    assert again.exit_code == 1 and "--force" in again.output  # never overwrites unasked
    res = runner.invoke(app, ["init", "mine", "--template", "mlp"])
    assert res.exit_code == 0 and (tmp_path / "mine" / "mlp.yaml").is_file()
    res = runner.invoke(app, ["init", "--template", "resnet"])
    assert res.exit_code == 1 and "fashion_mnist" in res.output and "imagefolder" in res.output
    res = runner.invoke(app, ["summary", "-c", str(written), "--json", "-"])
    assert res.exit_code == 0, res.output


def test_config_prints_the_fully_resolved_config(tmp_path: Path) -> None:
    res = runner.invoke(app, ["config", "--set", "train.epochs=3", "--set", "optimizer.lr=0.01"])
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load(res.stdout)
    assert cfg["train"]["epochs"] == 3 and cfg["optimizer"]["lr"] == 0.01
    assert cfg["data"]["batch_size"] == 256 and cfg["train"]["early_stopping"]["monitor"] == "val_loss"  # defaults filled in
    same = runner.invoke(app, ["train", "--set", "train.epochs=3", "--set", "optimizer.lr=0.01", "--print-config"])
    assert same.exit_code == 0 and same.stdout == res.stdout
    js = runner.invoke(app, ["config", "-c", "mlp", "--json", "-"])
    assert js.exit_code == 0 and yaml.safe_load(js.stdout)["model"]["input_shape"] == [784]


@needs_fashion
def test_config_of_a_run_is_the_one_it_trained_with(trained_run: Path) -> None:
    res = runner.invoke(app, ["config", str(trained_run)])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.stdout) == yaml.safe_load((trained_run / "config.yaml").read_text())


def _build_wheel(dist: Path) -> Path:
    """Build from a copy of the source tree: setuptools writes build/ and *.egg-info where it builds."""
    import shutil

    src = dist.parent / "src"
    local = {".git", ".venv", "data", "runs", "build", "dist", ".whl", ".devdata", ".pytest_cache"}  # at the top only

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == ROOT
        return {n for n in names if (top and n in local) or n == "__pycache__" or n.endswith(".egg-info")}

    shutil.copytree(ROOT, src, symlinks=True, ignore=ignore)
    base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)]
    if subprocess.run([*base, "--no-build-isolation"], capture_output=True).returncode != 0:
        subprocess.run(base, check=True, capture_output=True)  # a build environment of its own (needs PyPI)
    (wheel,) = dist.glob("fcclass-*.whl")
    return wheel


@pytest.mark.slow  # about 30 s (a wheel built and installed in a new venv); CI runs it after the default suite
@needs_fashion
def test_the_built_wheel_installed_in_a_fresh_environment_works_from_any_folder(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path / "dist")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    # torch and the other dependencies come from this environment (a .pth line adds its site-packages after the
    # venv's own, so the wheel's fcclass, not the source tree's, is the one imported)
    (site / "reuse_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]})
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"COLUMNS": "200"}

    def fcclass(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(venv / "bin" / "fcclass"), *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)

    where = subprocess.run([str(python), "-c", "import fcclass; print(fcclass.__file__)"], cwd=work, env=env, capture_output=True, text=True)
    assert str(site) in where.stdout, where.stdout + where.stderr
    assert fcclass("summary").returncode == 0
    res = fcclass("train", "--set", f"data.root={DATA_ROOT}", "--set", "data.limit_train=500", "--set", "data.limit_test=100",
                  "--set", "train.epochs=1")
    assert res.returncode == 0, res.stderr
    assert (work / "runs").is_dir()  # the run lands in the folder the user is in
    assert fcclass("eval", "--json", "-").returncode == 0
    assert fcclass("init").returncode == 0 and (work / "fashion_mnist.yaml").is_file()
    res = fcclass("bench", "--images", "64", "--model", "default", "--no-keras", "--data-root", str(DATA_ROOT), "--json", "-")
    assert res.returncode == 0, res.stderr


def test_a_bare_config_name_prefers_the_local_copy_init_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["init"]).exit_code == 0
    local = tmp_path / "fashion_mnist.yaml"
    local.write_text(local.read_text().replace("epochs: 9", "epochs: 1"))
    res = runner.invoke(app, ["config", "-c", "fashion_mnist"])
    assert res.exit_code == 0 and yaml.safe_load(res.stdout)["train"]["epochs"] == 1
    assert yaml.safe_load(runner.invoke(app, ["config", "-c", "mlp"]).stdout)["name"] == "fashion-mlp"  # no local copy: shipped


def test_version_and_plain_help() -> None:
    from fcclass import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"fcclass {__version__}"
    res = runner.invoke(app, ["train", "--help"])
    assert "--print-config " in res.stdout and "<bool>" not in res.stdout  # flags take no value


# ----------------------------------------------------------------------------- setup.sh, dry: fake python, pip and apt-get
FAKE_PYTHON = """#!/usr/bin/env bash
case "$1" in
  --version) echo "Python 3.11.2" ;;
  -m) if [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; exit 0; fi
      case " $* " in *" --upgrade pip "*) exit 0 ;; esac
      cat "$FAKE_PIP_OUTPUT"; exit "$FAKE_PIP_STATUS" ;;
esac
"""
PIP_OUTPUT = """Obtaining file:///src
WARNING: Location 'file:///opt/pypi/simple/torch/' is ignored: it is neither a file nor a directory.
WARNING: Location 'file:///opt/pypi/simple/rich/' is ignored: it is neither a file nor a directory.
Collecting torch>=2.2 (from fcclass==0.4.0)
  Downloading torch-2.5.1-cp311-cp311-manylinux1_x86_64.whl (906.4 MB)
Collecting rich
  Downloading rich-13.9.4-py3-none-any.whl (242 kB)
Collecting small
  Downloading small-1.0-py3-none-any.whl (5.1 MB)
ERROR: pip's last words
Successfully installed fcclass-0.4.0 rich-13.9.4 small-1.0 torch-2.5.1
"""


def _setup(tmp_path: Path, status: int) -> subprocess.CompletedProcess[str]:
    """./setup.sh in a copy of its own, with a python whose venv's pip prints PIP_OUTPUT and exits with ``status``
    (and an apt-get and sudo that only fail, should this machine lack Debian's Fashion-MNIST)."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    for name, text in (("python3", FAKE_PYTHON), ("apt-get", "#!/bin/sh\nexit 1\n"), ("sudo", "#!/bin/sh\nexec \"$@\"\n")):
        (tmp_path / "bin" / name).write_text(text)
        (tmp_path / "bin" / name).chmod(0o755)
    (tmp_path / "setup.sh").write_bytes((ROOT / "setup.sh").read_bytes())
    (tmp_path / "pip.out").write_text(PIP_OUTPUT)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FAKE_PIP_OUTPUT": str(tmp_path / "pip.out"),
           "FAKE_PIP_STATUS": str(status)}
    env.pop("PYTHON", None)
    return subprocess.run(["bash", str(tmp_path / "setup.sh")], env=env, capture_output=True, text=True, timeout=60)


def test_setup_sh_says_what_it_does_and_keeps_pips_exit_status(tmp_path: Path) -> None:
    done = _setup(tmp_path, 0)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "==> Creating .venv with python3 (Python 3.11.2)" and lines[-1].startswith("Ready in ")
    assert "==> Installing fcclass and its dependencies" in done.stdout and "      installed 4 packages" in lines
    assert "      downloading torch-2.5.1-cp311-cp311-manylinux1_x86_64.whl (906.4 MB)" in lines
    assert "rich" not in done.stdout and "small-1.0" not in done.stdout  # small downloads are left out
    assert "ERROR: pip's last words" in done.stderr  # pip's warnings and errors still show
    assert "is ignored" not in done.stdout + done.stderr  # but not one line per package for a missing index folder
    assert "      (2 pip warnings that a package index folder named in its config does not exist: in " in done.stdout
    assert (tmp_path / ".venv" / "pip-install.log").read_text() == PIP_OUTPUT  # all of pip's output, kept
    failed = _setup(tmp_path, 3)
    assert failed.returncode == 3 and "Ready" not in failed.stdout
    assert "==> Using the existing .venv (Python 3.11.2)" in failed.stdout
    assert "error: pip failed (exit status 3)" in failed.stderr and "Collecting torch" in failed.stderr
