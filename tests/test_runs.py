"""Checkpoints: atomic writes and safe loading of untrusted files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from fcclass.errors import CheckpointError
from fcclass.runs import atomic_write_bytes, load_checkpoint, load_trained, resolve_checkpoint, save_checkpoint


class _Boom:
    def __reduce__(self):  # runs os.system at unpickling time if loading were unsafe
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    boom = _Boom()
    boom.marker = marker
    evil = tmp_path / "evil.pt"
    torch.save({"fcclass_checkpoint": 1, "payload": boom}, evil)
    with pytest.raises(CheckpointError, match="Refused to load"):
        load_checkpoint(evil)
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(boom))
    with pytest.raises(CheckpointError):
        load_checkpoint(plain)
    assert not marker.exists()


def test_corrupt_and_foreign_files_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a fcclass checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"model_state": {"w": torch.ones(3)}})
    assert torch.load(path, weights_only=True)["model_state"]["w"].sum() == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]

    class Failing:
        def __bytes__(self):  # pragma: no cover - only used to make write fail
            raise RuntimeError

    with pytest.raises(TypeError):
        atomic_write_bytes(path, Failing())  # type: ignore[arg-type]
    assert torch.load(path, weights_only=True)["model_state"]["w"].sum() == 3  # the old file survives
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_missing_runs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="No training runs found"):
        resolve_checkpoint(runs_dir=tmp_path / "runs")
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(tmp_path / "nope")


def test_a_checkpoint_whose_config_stores_every_optimizer_key_still_loads(tmp_path: Path) -> None:
    # fcclass versions before the optimizer/scheduler key checks stored every key, e.g. momentum: 0.0 under adam
    from fcclass.config import OptimizerConfig, SchedulerConfig, load_config
    from fcclass.model import build_model

    cfg = load_config(ROOT / "configs" / "mlp.yaml")
    stored = {**cfg.to_dict(), "optimizer": {key: getattr(cfg.optimizer, key) for key in OptimizerConfig.model_fields},
              "scheduler": {key: getattr(cfg.scheduler, key) for key in SchedulerConfig.model_fields}}
    net = build_model(cfg.model, [1, 28, 28], 10)
    save_checkpoint(tmp_path / "best.pt", {"model_state": net.state_dict(), "config": stored, "input_shape": [1, 28, 28],
                                           "class_names": [str(i) for i in range(10)], "mean": [0.5], "std": [0.25]})
    model, ckpt = load_trained(tmp_path / "best.pt")
    assert ckpt["config_obj"] == cfg
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), net.state_dict().values()))
