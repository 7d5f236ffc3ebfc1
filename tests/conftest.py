"""Shared fixtures: a small real Fashion-MNIST run trained once per session, tiny image folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA_ROOT = ROOT / "data"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))


def fashion_available() -> bool:
    raw = DATA_ROOT / "FashionMNIST" / "raw"
    return DEBIAN_FASHION.is_dir() or (raw / "train-images-idx3-ubyte").exists()


needs_fashion = pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def small_config(tmp_path: Path, **overrides: object) -> "object":
    """The default model on a small stratified Fashion-MNIST subset, writing runs under tmp_path."""
    from fcclass.config import apply_override, parse_yaml

    raw = parse_yaml((ROOT / "configs" / "fashion_mnist.yaml").read_text(), "default config")
    sets = {
        "name": "test",
        "data.root": str(DATA_ROOT),
        "data.download": False,
        "data.limit_train": 3000,
        "data.limit_test": 500,
        "train.epochs": 3,
        "train.runs_dir": str(tmp_path / "runs"),
        **overrides,
    }
    for key, value in sets.items():
        apply_override(raw, f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
    from fcclass.config import config_from_dict

    return config_from_dict(raw)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real training run on 3,000 Fashion-MNIST images, shared by the eval/predict tests."""
    if not fashion_available():
        pytest.skip("Fashion-MNIST not installed")
    from fcclass.train import fit

    tmp = tmp_path_factory.mktemp("trained")
    result = fit(small_config(tmp))
    return result.run_dir
