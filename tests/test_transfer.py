"""Transfer learning: model.init_from (weights from a trained run, matched by layer name and shape), init_from.freeze and
trainable: false (weights and BatchNorm statistics fixed), train.unfreeze, and their records and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fcclass.cli import app
from tests.conftest import DATA_ROOT, needs_fashion

runner = CliRunner(env={"COLUMNS": "200"})

# The trained_run fixture's model (the shipped default) on a 3-label image folder of 28x28 grayscale Fashion-MNIST PNGs.
FINETUNE = """
name: finetune
data: {{dataset: imagefolder, path: '{folder}', image_size: [28, 28], channels: 1, batch_size: 32, num_workers: 0}}
model:
  layers:
    - {{type: Conv2D, filters: 24, kernel_size: 3, padding: same, activation: relu, kernel_initializer: he_normal}}
    - {{type: MaxPooling2D, pool_size: 2}}
    - {{type: Conv2D, filters: 48, kernel_size: 3, padding: same, activation: relu, kernel_initializer: he_normal}}
    - {{type: MaxPooling2D, pool_size: 2}}
    - {{type: BatchNormalization}}
    - {{type: Flatten}}
    - {{type: Dense, units: 256, activation: relu, kernel_initializer: he_normal}}
    - {{type: Dropout, rate: 0.3}}
    - {{type: Dense, activation: softmax}}
optimizer: {{name: adam, lr: 0.003}}
train: {{epochs: {epochs}, precision: fp32, test_at_end: false, runs_dir: '{runs}'}}
"""
BODY = ("conv2d", "conv2d_1", "batch_normalization", "dense")


def _config(tmp_path: Path, folder: Path, epochs: int = 1) -> Path:
    path = tmp_path / "finetune.yaml"
    path.write_text(FINETUNE.format(folder=folder, epochs=epochs, runs=tmp_path / "runs"))
    return path


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model_state"]


def _layer(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(f"body.{name}.")}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and bool(a) and all(torch.equal(a[k], b[k]) for k in a)


def _train(tmp_path: Path, *args: str) -> tuple[int, str, Path | None]:
    out = runner.invoke(app, ["train", *args])
    runs = sorted((tmp_path / "runs").glob("*")) if (tmp_path / "runs").is_dir() else []
    return out.exit_code, out.output, (runs[-1] if runs else None)


@needs_fashion
def test_loaded_layers_equal_the_source_before_the_first_step_and_a_new_head_is_made(
        trained_run: Path, clothes_folder: Path, tmp_path: Path) -> None:
    """Every layer but the classifier comes from the source's best.pt, exactly (last.pt of epoch 0 holds them); the
    source's 10-label classifier is not loaded into a 3-label model. The header says so, layer by layer."""
    from fcclass.config.load import load_config
    from fcclass.training.setup import start_trainer

    trainer = start_trainer(load_config(_config(tmp_path, clothes_folder), [f"model.init_from={trained_run}"]))
    trainer.lock.close()
    source = _state(trained_run / "best.pt")
    start = _state(trainer.run_dir / "last.pt")  # written before training begins
    for name in BODY:
        assert _equal(_layer(start, name), _layer(source, name)), name
    assert [t.status for t in trainer.init_from.transfer.layers] == ["loaded"] * 4 + ["new"]
    assert "trained on other labels" in trainer.init_from.transfer.layers[-1].why
    # the same shape; each normalised by its own data's statistics, which differ: said, and this data's are used
    [note] = trainer.init_from.notes
    assert note.startswith("The source model's inputs were normalised with mean [0.2861], std [0.3528]; this run normalises")
    assert trainer.mean != [0.2861] and trainer.mean == torch.load(trainer.run_dir / "last.pt", weights_only=True)["mean"]
    config = yaml.safe_load((trainer.run_dir / "config.yaml").read_text())
    assert config["model"]["init_from"]["path"] == str(trained_run.absolute())


@needs_fashion
def test_frozen_layers_stay_fixed_batchnorm_statistics_included_and_the_run_records_its_source(
        trained_run: Path, clothes_folder: Path, tmp_path: Path) -> None:
    """init_from.freeze: the loaded layers keep the source's weights and BatchNorm running statistics through training
    (Keras's frozen BatchNormalization runs in inference mode); the new head learns. summary.json, `fcclass runs` and
    the header say where the weights came from."""
    code, output, run = _train(tmp_path, "-c", str(_config(tmp_path, clothes_folder, epochs=2)), "--init-from", str(trained_run),
                               "--set", "model.init_from.freeze=true")
    assert code == 0, output
    assert "loaded (frozen)" in output and "new: the source's classifier, trained on other labels" in output
    source, trained = _state(trained_run / "best.pt"), _state(run / "last.pt")
    for name in BODY:
        assert _equal(_layer(trained, name), _layer(source, name)), name
    assert any(k.endswith("running_mean") for k in _layer(trained, "batch_normalization"))
    assert trained["body.dense_1.weight"].shape == (3, 256)  # a new head, for the folder's 3 labels
    record = json.loads((run / "summary.json").read_text())["init_from"]
    assert record["loaded"] == list(BODY) and record["new"] == ["dense_1"] and record["frozen"] == list(BODY)
    assert Path(record["checkpoint"]) == trained_run.absolute() / "best.pt"
    assert record["path"] == str(trained_run.absolute())
    listing = runner.invoke(app, ["runs", "--runs-dir", str(tmp_path / "runs")])
    assert "Init from" in listing.output and trained_run.name in listing.output
    checkpoint = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["train_state"]["frozen"] == list(BODY)


@needs_fashion
def test_unfreeze_trains_every_layer_from_its_epoch_at_the_scaled_rate_and_resume_keeps_the_freeze(
        trained_run: Path, clothes_folder: Path, tmp_path: Path) -> None:
    """train.unfreeze {epoch: 3}: a run stopped after epoch 1 and resumed for epoch 2 keeps the loaded layers frozen
    (resume re-freezes them); epoch 3 trains them at the schedule's rate x lr_scale."""
    config = _config(tmp_path, clothes_folder, epochs=1)
    code, output, run = _train(tmp_path, "-c", str(config), "--init-from", str(trained_run), "--set",
                               "model.init_from.freeze=true", "--set", "train.unfreeze={epoch: 3, lr_scale: 0.25}")
    assert code == 0, output
    assert "train.unfreeze.epoch 3 comes after this run's last epoch (1): conv2d, conv2d_1, batch_normalization, dense stay " \
        "frozen throughout" in " ".join(output.split())
    source = _state(trained_run / "best.pt")
    code, output, _ = _train(tmp_path, "--resume", str(run), "--set", "train.epochs=2")
    assert code == 0, output
    for name in BODY:
        assert _equal(_layer(_state(run / "last.pt"), name), _layer(source, name)), name
    code, output, _ = _train(tmp_path, "--resume", str(run), "--set", "train.epochs=3")
    assert code == 0, output
    assert "Epoch 3: every layer trains from now on (train.unfreeze)" in output
    after = _state(run / "last.pt")
    for name in ("conv2d", "dense"):
        assert not _equal(_layer(after, name), _layer(source, name)), name
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
    lr = {int(r[0]): float(r[rows[0].index("lr")]) for r in rows[1:]}
    assert lr[3] == pytest.approx(0.003 * 0.25)  # Adam, no schedule: the rate itself, scaled


def test_a_frozen_layer_is_left_out_of_the_optimizer_and_its_batchnorm_runs_in_inference_mode() -> None:
    """trainable: false on a block: no gradient, no optimizer state; its BatchNorm statistics stay put in train mode."""
    from fcclass.config.sections import ModelConfig
    from fcclass.model.network import build_model

    cfg = ModelConfig.model_validate({"layers": [
        {"type": "Conv2D", "filters": 4, "kernel_size": 3, "trainable": False},
        {"type": "BatchNormalization", "trainable": False},
        {"type": "Flatten"}, {"type": "Dense"}]})
    model = build_model(cfg, [1, 8, 8], 3).train()
    norm = model.body.batch_normalization
    assert not norm.training and model.frozen_layers() == ["conv2d", "batch_normalization"]
    before = norm.running_mean.clone()
    model(torch.randn(4, 1, 8, 8) * 5 + 3).sum().backward()
    assert torch.equal(norm.running_mean, before) and model.body.conv2d.weight.grad is None
    summary = model.summary()
    assert summary.trainable_params == 4 * 6 * 6 * 3 + 3  # the Dense only
    model.unfreeze()
    assert norm.training and model.frozen_layers() == [] and model.summary().trainable_params == summary.total_params - 8


# ----------------------------------------------------------------------------- matching rules
def _plan(source_layers: list[dict], target_layers: list[dict], shape: list[int], labels: tuple[list[str], list[str]],
          **spec: object) -> list[tuple[str, str, str | None]]:
    from fcclass.config.sections import InitFromConfig, ModelConfig
    from fcclass.model.init_from import SourceModel, plan_transfer
    from fcclass.model.network import build_model

    src_cfg, dst_cfg = (ModelConfig.model_validate({"layers": layers}) for layers in (source_layers, target_layers))
    src = build_model(src_cfg, shape, len(labels[0]))
    dst = build_model(dst_cfg, shape, len(labels[1]))
    transfer, _ = plan_transfer(dst, dst_cfg.layers, labels[1], SourceModel(src_cfg.layers, src.state_dict(), labels[0]),
                                InitFromConfig(path="x", **spec))
    return [(t.name, t.status, t.source) for t in transfer.layers]


CONV = {"type": "Conv2D", "filters": 4, "kernel_size": 3}
FLAT, HEAD = {"type": "Flatten"}, {"type": "Dense"}
ABC, XYZ = ["a", "b", "c"], ["x", "y", "z"]


def test_layers_match_by_name_then_by_position_and_only_where_shapes_agree() -> None:
    # a named layer finds its namesake wherever it is; default names match by name, else by position and type
    named = _plan([{**CONV, "name": "stem"}, FLAT, {"type": "Dense", "units": 8}, HEAD],
                  [{"type": "BatchNormalization"}, {**CONV, "name": "stem"}, FLAT, {"type": "Dense", "units": 8}, HEAD],
                  [1, 6, 6], (ABC, ABC))
    assert named == [("batch_normalization", "new", None), ("stem", "loaded", "stem"), ("dense", "loaded", "dense"),
                     ("dense_1", "loaded", "dense_1")]  # the same labels: the classifier loads too
    # another width: the dense after it and the head no longer fit
    wider = _plan([CONV, FLAT, {"type": "Dense", "units": 8}, HEAD], [CONV, FLAT, {"type": "Dense", "units": 16}, HEAD],
                  [1, 6, 6], (ABC, ABC))
    assert [s for _, s, _ in wider] == ["loaded", "skipped", "skipped"]
    # other labels, same count: the classifier is new, not a confusion of old labels for new ones
    relabelled = _plan([CONV, FLAT, HEAD], [CONV, FLAT, HEAD], [1, 6, 6], (ABC, XYZ))
    assert relabelled == [("conv2d", "loaded", "conv2d"), ("dense", "new", "dense")]
    chosen = _plan([CONV, FLAT, HEAD], [CONV, FLAT, HEAD], [1, 6, 6], (ABC, ABC), exclude=["dense"])
    assert [s for _, s, _ in chosen] == ["loaded", "new"]
    only = _plan([CONV, FLAT, HEAD], [CONV, FLAT, HEAD], [1, 6, 6], (ABC, ABC), layers=["dense"])
    assert [s for _, s, _ in only] == ["new", "loaded"]


def test_init_from_keys_naming_no_layer_of_the_model_are_errors() -> None:
    from fcclass.errors import ModelError

    with pytest.raises(ModelError, match="init_from.exclude names 'dense_9', which is not a layer of this model; its layers are conv2d"):
        _plan([CONV, FLAT, HEAD], [CONV, FLAT, HEAD], [1, 6, 6], (ABC, ABC), exclude=["dense_9"])
    with pytest.raises(ModelError, match="init_from.layers names 'flatten', which has no weights to load; the layers with weights are conv2d, dense"):
        _plan([CONV, FLAT, HEAD], [CONV, FLAT, HEAD], [1, 6, 6], (ABC, ABC), layers=["flatten"])
    with pytest.raises(ModelError, match="names 'dense' in both layers"):
        _plan([CONV, FLAT, HEAD], [CONV, FLAT, HEAD], [1, 6, 6], (ABC, ABC), layers=["dense"], exclude=["dense"])


# ----------------------------------------------------------------------------- mistakes
@needs_fashion
@pytest.mark.parametrize("case", ["missing", "untrained", "no_best", "not_a_checkpoint", "runs_folder", "torchvision_file",
                                  "no_layer_fits", "everything_frozen", "epoch_1"])
def test_init_from_mistakes_are_messages_and_leave_no_run(case: str, trained_run: Path, clothes_folder: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, clothes_folder)
    source, sets = str(trained_run), []
    if case == "missing":
        source = str(tmp_path / "runs-typo" / "fashion-cnn")
    elif case == "untrained":
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "config.yaml").write_text((trained_run / "config.yaml").read_text())
        source = str(tmp_path / "half")
    elif case == "no_best":  # a finished run whose best.pt was deleted: its last.pt is named, not "untrained"
        import shutil

        shutil.copytree(trained_run, tmp_path / "nobest")
        (tmp_path / "nobest" / "best.pt").unlink()
        source = str(tmp_path / "nobest")
    elif case == "not_a_checkpoint":
        source = str(config)
    elif case == "runs_folder":
        source = str(trained_run.parent)
    elif case == "torchvision_file":
        torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "resnet18.pth")
        source = str(tmp_path / "resnet18.pth")
    elif case == "no_layer_fits":  # an MLP: its dense takes 784 inputs, the source's 2,352
        sets = ["model.layers=[{type: Flatten}, {type: Dense, units: 256}, {type: Dense}]"]
    elif case == "everything_frozen":  # a 10-label folder would load the head too; here: freeze, and exclude nothing new
        sets = ["model.init_from.freeze=true", "model.init_from.layers=[conv2d]",
                "model.layers.6.trainable=false", "model.layers.8.trainable=false", "model.layers.2.trainable=false",
                "model.layers.4.trainable=false"]
    elif case == "epoch_1":
        sets = ["train.unfreeze={epoch: 1}"]
    code, output, run = _train(tmp_path, "-c", str(config), "--init-from", source, *(x for s in sets for x in ("--set", s)))
    expected = {
        "missing": "model.init_from: '" + source + "' does not exist. Give a run directory made by `fcclass train`",
        "untrained": "model.init_from: '" + source + "' has no checkpoint",
        "no_best": f"model.init_from: '{source}' has no best.pt (its last.pt holds epoch 3): give that file, --init-from {source}/last.pt",
        "not_a_checkpoint": "model.init_from: '" + source + "' is not a checkpoint",
        "runs_folder": f"It is a folder of 1 run(s): name one of them, e.g. --init-from {trained_run}.",
        "torchvision_file": "A torchvision model's weights file is not a run's checkpoint: use it as the weights of a Backbone layer",
        "no_layer_fits": "model.init_from: no layer of this model can take weights from",
        "everything_frozen": "Every layer with weights is frozen, so there is nothing to train: init_from.freeze fixed conv2d (the "
                             "layers it loaded); trainable: false fixes conv2d_1, batch_normalization, dense, dense_1. To train, set "
                             "trainable: true on a layer (the classifier, say) or set init_from.freeze: false.",
        "epoch_1": "train.unfreeze.epoch",
    }[case]
    assert code == 1 and expected in " ".join(output.split()), output
    assert "Traceback" not in output and run is None


def test_init_from_path_is_recorded_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fcclass.config.load import load_config
    from fcclass.runs.resume import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(load_config(None, ["model.init_from=runs/src", "model.init_from.exclude=[dense_1]"]))
    assert cfg.model.init_from.path == str(tmp_path / "runs" / "src") and cfg.model.init_from.exclude == ["dense_1"]
    assert cfg.model.with_init_from("other").init_from.exclude == ["dense_1"]


def test_print_config_shows_init_from_given_on_the_command_line(tmp_path: Path) -> None:
    out = runner.invoke(app, ["train", "--init-from", "runs/src", "--set", "model.init_from.freeze=true", "--print-config"])
    assert out.exit_code == 0, out.output
    assert yaml.safe_load(out.output)["model"]["init_from"] == {"path": "runs/src", "layers": None, "exclude": [], "freeze": True}
    assert DATA_ROOT  # the data is not read for --print-config


def test_a_layer_loads_whatever_its_activation_and_padding_and_its_tensors_land_where_they_belong() -> None:
    """A Conv2D with relu is built as conv + activation, one without as the conv alone: their weights still match."""
    from fcclass.config.sections import InitFromConfig, ModelConfig
    from fcclass.model.init_from import SourceModel, load_transfer, plan_transfer
    from fcclass.model.network import build_model

    src_cfg = ModelConfig.model_validate({"layers": [{**CONV, "activation": "relu"}, FLAT, {"type": "Dense", "units": 5, "activation": "relu"}, HEAD]})
    dst_cfg = ModelConfig.model_validate({"layers": [CONV, FLAT, {"type": "Dense", "units": 5}, HEAD]})
    src, dst = build_model(src_cfg, [1, 6, 6], 3), build_model(dst_cfg, [1, 6, 6], 3)
    transfer, loads = plan_transfer(dst, dst_cfg.layers, ABC, SourceModel(src_cfg.layers, src.state_dict(), ABC),
                                    InitFromConfig(path="x"))
    assert transfer.named("loaded") == ["conv2d", "dense", "dense_1"]
    load_transfer(dst, loads)
    x = torch.randn(2, 1, 6, 6)
    assert torch.equal(dst.body.conv2d.weight, src.body.conv2d[0].weight)
    assert torch.equal(dst.body.dense.bias, src.body.dense[0].bias)
    assert torch.allclose(torch.relu(dst.body.conv2d(x)), src.body.conv2d(x))


@pytest.mark.slow  # a resume and a compress with fine-tuning: about 11 s
@needs_fashion
def test_a_run_started_from_a_deleted_run_still_resumes_and_compresses_with_fine_tuning(
        trained_run: Path, clothes_folder: Path, tmp_path: Path) -> None:
    """The source is read once, when the run starts: a resume or compress --finetune later never reads it again."""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(trained_run, source)
    code, output, run = _train(tmp_path, "-c", str(_config(tmp_path, clothes_folder)), "--init-from", str(source),
                               "--set", "model.init_from.freeze=true", "--set", "train.unfreeze={epoch: 2}")
    assert code == 0, output
    shutil.rmtree(source)
    code, output, _ = _train(tmp_path, "--resume", str(run), "--set", "train.epochs=2")
    assert code == 0 and "every layer trains from now on" in output, output
    out = runner.invoke(app, ["compress", str(run), "--prune", "0.5", "--finetune", "1", "--out", str(tmp_path / "small")])
    assert out.exit_code == 0, out.output
    assert "Weights from" not in out.output and "Frozen until" not in out.output


def test_a_backbone_weights_file_is_recorded_absolute_and_a_weight_name_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's config.yaml trains again from any folder: a relative weights file is made absolute, as data.path is."""
    from fcclass.config.load import load_config
    from fcclass.runs.resume import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    layers = "[{type: Backbone, arch: resnet18, weights: w/r18.pth}, {type: Backbone, arch: resnet18, name: b2}, {type: Flatten}, {type: Dense}]"
    cfg = with_absolute_paths(load_config(None, [f"model.layers={layers}"]))
    assert cfg.model.layers[0].weights == str(tmp_path / "w" / "r18.pth") and cfg.model.layers[1].weights == "DEFAULT"


def test_frozen_batchnorm_stays_in_inference_mode_after_syncbatchnorm_conversion() -> None:
    """train.sync_batchnorm (GPUs under torchrun) replaces every BatchNorm module: a frozen one must stay frozen."""
    from torch import nn

    from fcclass.config.sections import ModelConfig
    from fcclass.model.network import build_model

    cfg = ModelConfig.model_validate({"layers": [CONV, {"type": "BatchNormalization", "trainable": False}, FLAT, HEAD]})
    model = nn.SyncBatchNorm.convert_sync_batchnorm(build_model(cfg, [1, 6, 6], 3))
    model.freeze(model.frozen_layers())
    model.train()
    assert isinstance(model.body.batch_normalization, nn.SyncBatchNorm) and not model.body.batch_normalization.training
    assert model.body.conv2d.training
