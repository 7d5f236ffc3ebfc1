"""Shared fixtures: a small real Fashion-MNIST run trained once per session, tiny image folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from fcclass.training.callbacks import Callback

ROOT = Path(__file__).resolve().parent.parent
DATA_ROOT = ROOT / "data"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")

# pytest-xdist runs the suite in one worker per core (pyproject's addopts: -n auto): each worker, and what it starts,
# gets its share of the cores, so there are never more busy threads than cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session", autouse=True)
def _decode_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Image-folder decode caches go to a folder of this session (subprocesses inherit it), never ~/.cache."""
    old = os.environ.get("FCCLASS_CACHE_DIR")
    os.environ["FCCLASS_CACHE_DIR"] = str(tmp_path_factory.mktemp("decode-cache"))
    yield
    if old is None:
        os.environ.pop("FCCLASS_CACHE_DIR", None)
    else:
        os.environ["FCCLASS_CACHE_DIR"] = old


def fashion_available() -> bool:
    raw = DATA_ROOT / "FashionMNIST" / "raw"
    return DEBIAN_FASHION.is_dir() or (raw / "train-images-idx3-ubyte").exists()


needs_fashion = pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def small_config(tmp_path: Path, **overrides: object) -> "object":
    """The default model on a small stratified Fashion-MNIST subset, writing runs under tmp_path."""
    from fcclass.config.load import apply_override
    from fcclass.config.yaml_load import parse_yaml

    raw = parse_yaml((ROOT / "configs" / "fashion_mnist.yaml").read_text(), "default config")
    sets = {
        "name": "test",
        "data.root": str(DATA_ROOT),
        "data.download": False,
        "data.limit_train": 3000,
        "data.limit_test": 500,
        "train.epochs": 3,
        "train.runs_dir": str(tmp_path / "runs"),
        "train.precision": "fp32",  # CPUs with native bf16 would otherwise train in bf16 and change the outcomes tests check
        "train.test_at_end": False,  # the end-of-training test pass is tested in test_records.py; elsewhere it costs time
        # The default's SGD at 0.3 and batch 256 is tuned for all 54,000 images; its short-run plan (batch 32 on a few
        # thousand images) learns as well, but Adam at batch 128 takes a quarter of the steps, and the tests were
        # written for it (tests/test_short_run.py tests the default's plan).
        "data.batch_size": 128,
        "optimizer": {"name": "adam", "lr": 0.003},
        "train.short_run_steps": 0,
        **overrides,
    }
    for key, value in sets.items():
        apply_override(raw, f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
    from fcclass.config.load import config_from_dict

    return config_from_dict(raw)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real training run on 3,000 Fashion-MNIST images, shared by the eval/predict tests."""
    if not fashion_available():
        pytest.skip("Fashion-MNIST not installed")
    from fcclass.training.fit import fit

    tmp = tmp_path_factory.mktemp("trained")
    result = fit(small_config(tmp))
    return result.run_dir


CLOTHES = {0: "tshirt", 1: "trouser", 7: "sneaker"}


@pytest.fixture(scope="session")
def clothes_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real Fashion-MNIST test images as PNG files in an image folder: 3 labels x 60, RGB (to exercise conversion)."""
    if not fashion_available():
        pytest.skip("Fashion-MNIST not installed")
    from PIL import Image

    from fcclass.config.sections import DataConfig
    from fcclass.data import load_dataset

    test = load_dataset(DataConfig(root=str(DATA_ROOT), download=False), 0, splits=("test",)).test
    root = tmp_path_factory.mktemp("folder") / "clothes"
    for label, name in CLOTHES.items():
        (root / name).mkdir(parents=True)
        for i in (test.labels == label).nonzero().flatten()[:60].tolist():
            Image.fromarray(test.images[i, 0].numpy(), "L").convert("RGB").save(root / name / f"{i}.png")
    return root


def folder_config(tmp_path: Path, folder: Path | str, epochs: int = 2, workers: int = 0, runs: Path | str | None = None,
                  cache: str = "auto") -> Path:
    """A small CNN on an image folder (20x20 grayscale), written as a YAML file. ``cache: off`` streams the files
    through DataLoader workers every epoch."""
    cfg = tmp_path / "folder.yaml"
    cfg.write_text(
        f"name: clothes\ndata: {{dataset: imagefolder, path: '{folder}', image_size: [20, 20], channels: 1, batch_size: 32, "
        f"num_workers: {workers}, cache: {cache}, augment: {{horizontal_flip: true}}}}\n"
        "model:\n  layers:\n    - {type: Conv2D, filters: 8, kernel_size: 3, activation: relu}\n    - {type: MaxPooling2D}\n"
        "    - {type: Dropout, rate: 0.2}\n    - {type: Flatten}\n    - {type: Dense, activation: softmax}\n"
        f"optimizer: {{lr: 0.01}}\ntrain: {{epochs: {epochs}, runs_dir: '{runs if runs is not None else tmp_path / 'runs'}'}}\n"
    )
    return cfg


def floats(data: object, key: str = "") -> list[tuple[str, float]]:
    """Every float of a JSON document, with the key it is under."""
    if isinstance(data, dict):
        return [f for k, v in data.items() for f in floats(v, k)]
    if isinstance(data, list):
        return [f for v in data for f in floats(v, key)]
    return [(key, data)] if isinstance(data, float) else []


def assert_rounded_as_shown(data: object) -> None:
    """The README's promise for train's (and sweep's) JSON: losses and accuracies to 4 decimals, the learning rate to
    3 significant digits, seconds to 0.1."""
    found = floats(data)
    assert found
    for key, value in found:
        want = float(f"{value:.3g}") if key == "lr" else round(value, 1 if key == "seconds" else 4)
        assert value == want, (key, value)


class SignalAt(Callback):
    """Sends ``sig`` to this process when batch ``batch`` of epoch ``epoch`` ends: a deterministic interruption."""

    def __init__(self, epoch: int, batch: int, sig: int) -> None:
        self.at, self.sig = (epoch, batch), sig

    def on_batch_end(self, trainer: Any, info: Any) -> None:
        if (info.epoch, info.batch) == self.at:
            os.kill(os.getpid(), self.sig)
