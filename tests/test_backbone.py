"""Backbone layers: torchvision feature extractors with pretrained weights (a local file, torchvision's cache), their
shapes and parameter counts, their errors, and a frozen backbone trained, summarised, exported and evaluated."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import DATA_ROOT, needs_fashion
from typer.testing import CliRunner

from fcclass.cli import app
from fcclass.config.load import config_from_dict
from fcclass.config.registries import BACKBONES
from fcclass.config.sections import ModelConfig
from fcclass.errors import ConfigError, FcclassError, ModelError
from fcclass.model.backbones import load_pretrained, normalises_input, output_shape
from fcclass.model.network import build_model

runner = CliRunner(env={"COLUMNS": "300"})
HEAD = [{"type": "GlobalAveragePooling2D"}, {"type": "Dense", "activation": "softmax"}]
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
RESNET18_FILE = "resnet18-f37072fd.pth"  # the basename of torchvision's IMAGENET1K_V1 (= DEFAULT) url


def model_cfg(arch: str = "resnet18", weights: str | None = None, **layer: object) -> ModelConfig:
    return ModelConfig.model_validate({"layers": [{"type": "Backbone", "arch": arch, "weights": weights, **layer}, *HEAD]})


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole torchvision resnet18's state_dict (random weights, random BatchNorm statistics) saved as torchvision's
    own files are."""
    torch.manual_seed(7)
    net = torchvision.models.resnet18()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = tmp_path_factory.mktemp("weights") / RESNET18_FILE
    torch.save(net.state_dict(), path)
    return path


def assert_features_equal(features: torch.nn.Module, state: dict[str, torch.Tensor]) -> int:
    mine = features.state_dict()
    compared = 0
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        assert torch.equal(mine[key].cpu(), value), key
        compared += 1
    return compared


def test_every_listed_arch_is_a_torchvision_model_with_default_weights() -> None:
    available = set(torchvision.models.list_models(module=torchvision.models))
    assert set(BACKBONES) <= available, set(BACKBONES) - available
    for arch in BACKBONES:
        assert "DEFAULT" in torchvision.models.get_model_weights(arch).__members__, arch


FAMILIES = ["resnext50_32x4d", "mobilenet_v2", "efficientnet_v2_s", "convnext_tiny", "densenet121", "vgg11_bn"]


@pytest.mark.parametrize("arch", [pytest.param(a, marks=[] if a in FAMILIES else pytest.mark.slow) for a in BACKBONES])
def test_each_arch_has_a_feature_extractor_of_image_shape(arch: str) -> None:
    shape = output_shape(arch, 64, 64)
    assert shape is not None and len(shape) == 3 and min(shape) > 0, (arch, shape)
    assert shape[0] == {"densenet121": 1024, "mobilenet_v2": 1280, "vgg11_bn": 512, "convnext_tiny": 768}.get(arch, shape[0])


# each arch at one input shape in the default suite (resnet18 at both), the other with -m slow: the builds cost seconds
SLOW = pytest.mark.slow


@pytest.mark.parametrize(("arch", "shape"), [
    ("resnet18", (1, 28, 28)), ("resnet18", (3, 32, 32)), ("mobilenet_v3_small", (3, 32, 32)), ("efficientnet_b0", (1, 28, 28)),
    pytest.param("mobilenet_v3_small", (1, 28, 28), marks=SLOW), pytest.param("efficientnet_b0", (3, 32, 32), marks=SLOW)])
def test_a_backbone_builds_for_small_images_with_a_pooling_and_dense_head(arch: str, shape: tuple[int, int, int]) -> None:
    net = build_model(model_cfg(arch), shape, 10)
    out = net.body.backbone(torch.rand(2, *shape))
    s = net.summary()
    assert s.layers[0].name == "backbone" and s.layers[0].type == "Backbone"
    assert s.layers[0].output_shape == tuple(out.shape[1:])  # the meta forward's shape is the real one
    assert net(torch.rand(2, *shape)).shape == (2, 10)
    reference = torchvision.models.get_model(arch)
    head = reference.fc if arch == "resnet18" else reference.classifier
    stats = sum(b.numel() for n, b in reference.named_buffers() if n.endswith(("running_mean", "running_var")))
    # Keras's count: the feature extractor's weights, plus its BatchNorm statistics as non-trainable parameters
    assert s.layers[0].params == sum(p.numel() for p in reference.parameters()) - sum(p.numel() for p in head.parameters()) + stats
    assert s.layers[0].trainable_params == s.layers[0].params - stats


def test_resnet18_summary_counts_like_keras_and_frozen_moves_them_to_non_trainable() -> None:
    s = build_model(model_cfg(trainable=False), (3, 32, 32), 10).summary()
    assert [layer.output_shape for layer in s.layers] == [(512, 1, 1), (512,), (10,)]
    # torchvision's resnet18 has 11,689,512 parameters, 513,000 of them in fc; 4,800 BatchNorm channels x 2 statistics
    assert s.layers[0].params == 11_689_512 - 513_000 + 9_600 == s.non_trainable_params
    assert s.trainable_params == 512 * 10 + 10


def test_a_local_file_loads_exactly_and_the_first_layer_normalises(resnet18_file: Path) -> None:
    cfg = model_cfg(weights=str(resnet18_file))
    net = build_model(cfg, (1, 28, 28), 10)
    notes = load_pretrained(net, cfg)
    assert assert_features_equal(net.body.backbone.features, torch.load(resnet18_file)) == 120  # BatchNorm stats included
    assert notes == [f"Backbone 'backbone': resnet18, weights from {resnet18_file}; input normalised with the weights' "
                     "mean/std; 1-channel images repeated to 3 channels"]
    assert normalises_input(cfg)
    assert net.body.backbone.input_mean.flatten().tolist() == pytest.approx(IMAGENET[0])
    assert net.body.backbone.input_std.flatten().tolist() == pytest.approx(IMAGENET[1])
    x = torch.rand(2, 1, 28, 28)
    reference = torchvision.models.resnet18()
    reference.load_state_dict(torch.load(resnet18_file))
    reference.eval(), net.eval()
    normalised = (x.expand(-1, 3, -1, -1) - torch.tensor(IMAGENET[0]).view(1, 3, 1, 1)) / torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)
    with torch.no_grad():  # the torchvision model's own forward, up to its pooling, on the normalised RGB image
        want = torch.nn.Sequential(*list(reference.children())[:-2])(normalised)
        torch.testing.assert_close(net.body.backbone(x), want)


def test_common_wrappers_load_and_a_backbone_after_another_layer_does_not_normalise(resnet18_file: Path, tmp_path: Path) -> None:
    state = torch.load(resnet18_file)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)  # a DDP training script's
    cfg = ModelConfig.model_validate({"layers": [{"type": "Conv2D", "filters": 3, "kernel_size": 1},
                                                 {"type": "Backbone", "arch": "resnet18", "weights": str(wrapped)}, *HEAD]})
    net = build_model(cfg, (3, 32, 32), 10)
    (note,) = load_pretrained(net, cfg)
    assert assert_features_equal(net.body.backbone.features, state) == 120
    assert "not normalised" in note and not normalises_input(cfg) and not net.body.backbone.normalise
    torch.save({"model": state}, wrapped)
    load_pretrained(net, cfg)


def test_default_weights_come_from_the_torch_home_cache(resnet18_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / RESNET18_FILE).write_bytes(resnet18_file.read_bytes())

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("downloaded although the file is in the cache")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    cfg = model_cfg(weights="DEFAULT")
    net = build_model(cfg, (3, 32, 32), 10)
    (note,) = load_pretrained(net, cfg)
    assert assert_features_equal(net.body.backbone.features, torch.load(resnet18_file)) == 120
    assert f"torchvision weights IMAGENET1K_V1 from {cache / RESNET18_FILE}" in note


def test_offline_the_error_names_the_file_and_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cfg = model_cfg(weights="IMAGENET1K_V1")
    with pytest.raises(ModelError) as e:
        load_pretrained(build_model(cfg, (3, 32, 32), 10), cfg)
    message = str(e.value)
    assert f"put the file {RESNET18_FILE} in {tmp_path / 'torch' / 'hub' / 'checkpoints'}/" in message
    assert "Temporary failure in name resolution" in message and f"weights: /path/to/{RESNET18_FILE}" in message


def _whole_model(path: Path) -> None:
    torch.save(torchvision.models.resnet18(), path)


def _other_arch(path: Path) -> None:
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)


def _other_shape(path: Path, source: Path) -> None:
    state = torch.load(source)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, path)


def _deeper(path: Path) -> None:
    torch.save(torchvision.models.resnet34().state_dict(), path)


@pytest.mark.parametrize(("make", "message"), [
    (lambda p, s: None, "does not exist"),
    (lambda p, s: p.mkdir(), "is not a file"),
    (lambda p, s: p.write_text("not weights"), "is not a readable PyTorch weights file"),
    (lambda p, s: p.write_bytes(s.read_bytes()[:100_000]), "is not a readable PyTorch weights file"),
    (lambda p, s: _whole_model(p), "holds Python objects, not only tensors"),
    (lambda p, s: torch.save([1, 2], p), "holds no state_dict"),
    (lambda p, s: _other_arch(p), "100 keys missing (e.g. conv1.weight, bn1.weight)"),
    (lambda p, s: _other_shape(p, s), "1 tensors of another shape (e.g. layer1.0.conv1.weight [64, 64, 1, 1] (model: [64, 64, 3, 3]))"),
    (lambda p, s: _deeper(p), "unexpected keys (e.g. layer1.2.conv1.weight"),
])
def test_weights_that_do_not_load_are_an_error_naming_the_file(make, message: str, resnet18_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    make(path, resnet18_file)
    cfg = model_cfg(weights=str(path))
    with pytest.raises(ModelError) as e:
        load_pretrained(build_model(cfg, (3, 32, 32), 10), cfg)
    assert message in str(e.value) and str(path) in str(e.value) and "model.layers[0] (Backbone 'backbone')" in str(e.value)


def test_shape_and_name_mistakes_are_errors_before_training() -> None:
    with pytest.raises(ModelError, match="no weights 'IMAGENET1K_V9' for resnet50; it has IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        build_model(model_cfg("resnet50", "IMAGENET1K_V9"), (3, 32, 32), 10, device="meta")
    with pytest.raises(ModelError, match=r"has 4 channels .* Set data.channels: 3"):
        build_model(model_cfg(), (4, 32, 32), 10, device="meta")
    with pytest.raises(ModelError, match=r"vgg11 needs images of at least 32x32 pixels, but its input is 28x28.*image_size: \[32, 32\]"):
        build_model(model_cfg("vgg11"), (1, 28, 28), 10, device="meta")
    with pytest.raises(ModelError, match="needs image input"):
        build_model(ModelConfig.model_validate({"layers": [{"type": "Flatten"}, {"type": "Backbone", "arch": "resnet18"}, *HEAD]}),
                    (3, 32, 32), 10, device="meta")


def test_config_mistakes_name_the_key_and_the_fix() -> None:
    layers = [{"type": "backbone", "arch": "resnet19"}, *HEAD]
    with pytest.raises(ConfigError, match=r"model.layers\[0\].arch: got 'resnet19'; did you mean 'resnet18'\? Valid values are 'resnet18'"):
        config_from_dict({"model": {"layers": layers}})
    cfg = config_from_dict({"data": {"normalize": {"mean": [0.5], "std": [0.5]}},
                            "model": {"layers": [{"type": "backbone", "arch": "resnet18"}, *HEAD]}})
    with pytest.raises(ConfigError, match="normalises its input with its pretrained weights' own statistics"):
        normalises_input(cfg.model, cfg.data.normalize)
    assert not normalises_input(model_cfg(weights=None))


def frozen_config(tmp_path: Path, weights: Path) -> Path:
    cfg = tmp_path / "backbone.yaml"
    cfg.write_text(
        f"name: frozen\ndata: {{dataset: fashion_mnist, root: '{DATA_ROOT}', download: false, limit_train: 300, limit_test: 100}}\n"
        f"model:\n  layers:\n    - {{type: Backbone, arch: resnet18, weights: '{weights}', trainable: false}}\n"
        "    - {type: GlobalAveragePooling2D}\n    - {type: Dense, activation: softmax}\n"
        f"optimizer: {{name: adam, lr: 0.01}}\ntrain: {{epochs: 1, precision: fp32, runs_dir: '{tmp_path / 'runs'}'}}\n")
    return cfg


@needs_fashion
def test_a_frozen_backbone_trains_summarises_exports_and_evaluates(resnet18_file: Path, tmp_path: Path) -> None:
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(resnet18_file.read_bytes())
    cfg = frozen_config(tmp_path, weights)
    res = runner.invoke(app, ["train", "-c", str(cfg)])
    assert res.exit_code == 0, res.output
    assert f"Backbone 'backbone': resnet18, weights from {weights}; input normalised" in res.output
    weights.unlink()  # the run's checkpoints hold the weights: nothing below reads the file
    (run_dir,) = (tmp_path / "runs").iterdir()
    best = torch.load(run_dir / "best.pt", weights_only=False)
    state = {k.removeprefix("body.backbone.features."): v for k, v in best["model_state"].items() if k.startswith("body.backbone.features.")}
    source = torch.load(resnet18_file)
    for key, value in source.items():  # weights AND BatchNorm statistics: frozen BatchNorm runs in inference mode
        if not key.startswith("fc."):
            assert torch.equal(state[key], value), key
    assert best["mean"] == [] and best["std"] == []  # the backbone normalises; the pipeline does not, here or in eval
    assert not torch.equal(best["model_state"]["body.dense.weight"], torch.zeros(1))  # the head trained

    summary = runner.invoke(app, ["summary", "-c", str(cfg), "--json", "-"])
    assert summary.exit_code == 0, summary.output
    s = json.loads(summary.stdout)
    assert s["layers"][0] == {"name": "backbone", "type": "Backbone", "output_shape": [512, 1, 1], "params": 11_186_112}
    assert s["trainable_params"] == 5130 and s["non_trainable_params"] == 11_186_112

    ev = runner.invoke(app, ["eval", str(run_dir), "--json", "-"])
    assert ev.exit_code == 0, ev.output
    report = json.loads(ev.stdout)
    assert report["num_samples"] == 100
    exported = runner.invoke(app, ["export", str(run_dir), "--format", "onnx"])
    assert exported.exit_code == 0, exported.output
    import onnxruntime

    from fcclass.inference.load import load_for_inference

    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        want = load_for_inference(run_dir, device="cpu").model.predict_proba(x).numpy()
    got = onnxruntime.InferenceSession(str(run_dir / "model.onnx")).run(None, {"image": x.numpy()})[0]
    assert abs(got - want).max() < 1e-4  # the normalisation inside the model went into the ONNX file
    described = json.loads((run_dir / "model.onnx.json").read_text())["input"]["normalization_inside_model"]
    assert described == {"mean": IMAGENET[0], "std": IMAGENET[1]}  # the backbone's, not the run's empty mean/std
    resumed = runner.invoke(app, ["train", "--resume", str(run_dir), "--set", "train.epochs=2", "--no-test"])
    assert resumed.exit_code == 0, resumed.output
    assert "epoch 2/2" in resumed.output and "Backbone 'backbone'" not in resumed.output


@pytest.mark.slow  # the frozen test above trains the same way; this one checks that trainable: true lets them move
@needs_fashion
def test_a_trainable_backbone_moves_its_batchnorm_statistics(resnet18_file: Path, tmp_path: Path) -> None:
    from fcclass.config.load import load_config
    from fcclass.training.fit import fit

    cfg = load_config(frozen_config(tmp_path, resnet18_file), ["model.layers.0.trainable=true", "train.test_at_end=false"])
    result = fit(cfg)
    best = torch.load(result.run_dir / "best.pt", weights_only=False)["model_state"]
    source = torch.load(resnet18_file)
    assert not torch.equal(best["body.backbone.features.bn1.running_mean"], source["bn1.running_mean"])
    assert not torch.equal(best["body.backbone.features.conv1.weight"], source["conv1.weight"])


def test_an_explicit_normalize_with_a_pretrained_backbone_fails_before_loading_data(resnet18_file: Path, tmp_path: Path) -> None:
    cfg = frozen_config(tmp_path, resnet18_file)
    res = runner.invoke(app, ["train", "-c", str(cfg), "--set", "data.normalize={mean: [0.5], std: [0.5]}",
                              "--set", "data.root=/nonexistent"])
    assert res.exit_code == 1 and "normalises its input with its pretrained weights' own statistics" in res.output
    assert isinstance(res.exception, SystemExit) and not isinstance(res.exception, FcclassError)
