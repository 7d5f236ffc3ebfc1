from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fcclass.config.load import SHIPPED_CONFIGS, config_from_dict, load_config, resolve_config_path, shipped_configs
from fcclass.config.sections import Config, OptimizerConfig, SchedulerConfig
from fcclass.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


MINIMAL = """
model:
  layers:
    - {type: Flatten}
    - {type: Dense}
"""


def test_every_shipped_config_validates() -> None:
    configs = shipped_configs()
    assert {"fashion_mnist", "mlp", "cifar10"} <= set(configs), "fcclass/configs/ must ship example configs"
    for path in configs.values():
        assert path.parent == SHIPPED_CONFIGS and isinstance(load_config(path), Config), path
    assert (ROOT / "configs").resolve() == SHIPPED_CONFIGS.resolve()  # the repo's configs/ is the packaged folder


def test_configs_are_package_data() -> None:
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "configs/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["fcclass"]


def test_shipped_configs_are_found_by_name_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # as after `pip install fcclass`: no configs/ folder here
    shipped = shipped_configs()
    assert resolve_config_path(None) == shipped["fashion_mnist"]
    for name in ("fashion_mnist", "fashion_mnist.yaml", "configs/fashion_mnist.yaml"):
        assert resolve_config_path(name) == shipped["fashion_mnist"], name
    assert load_config("configs/mlp.yaml").name == "fashion-mlp"
    mine = write(tmp_path, MINIMAL)
    (tmp_path / "mlp.yaml").write_text(mine.read_text())
    assert resolve_config_path("mlp.yaml") == Path("mlp.yaml")  # a file of that name here comes first
    with pytest.raises(ConfigError) as e:
        resolve_config_path("elsewhere/mlp.yaml")
    msg = str(e.value)
    assert "'elsewhere/mlp.yaml' not found" in msg and ", ".join(shipped) in msg and "fcclass init" in msg


def test_config_and_layer_types_load_without_torch() -> None:
    # config errors must be instant: the layer classes import torch only when they build
    code = "import sys; from fcclass.config import layers; from fcclass.config import load_config; load_config(sys.argv[1]); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "configs" / "fashion_mnist.yaml")], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_defaults_follow_the_contract(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.data.dataset == "fashion_mnist"
    assert cfg.data.val_split == 0.1
    assert cfg.optimizer.name == "adam" and cfg.optimizer.lr == 0.001
    assert cfg.train.checkpoint.monitor == "val_accuracy"
    assert cfg.train.runs_dir == "runs"


def test_unknown_key_names_it_and_suggests_the_closest(tmp_path: Path) -> None:
    text = MINIMAL + "train:\n  epohcs: 3\n"
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    msg = str(e.value)
    assert "train.epohcs" in msg and "Did you mean 'epochs'" in msg


def test_unknown_layer_argument_suggests_within_the_layer(tmp_path: Path) -> None:
    text = "model:\n  layers:\n    - {type: Conv2D, filter: 8, kernel_size: 3}\n    - {type: Flatten}\n    - {type: Dense}\n"
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    msg = str(e.value)
    assert "model.layers[0].filter" in msg and "Did you mean 'filters'" in msg


def test_all_errors_reported_at_once_with_dotted_paths(tmp_path: Path) -> None:
    text = (
        "data: {batch_size: -4, dataset: fashion}\n"
        "optimizer: {lr: fast}\n"
        "model:\n  layers:\n    - {type: Dense, units: 10, activation: relux}\n    - {type: Conv3D}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    msg = str(e.value)
    assert "has 5 errors" in msg
    assert "data.batch_size" in msg
    assert "data.dataset" in msg and "'fashion_mnist'" in msg and "'imagefolder'" in msg  # lists valid datasets
    assert "optimizer.lr" in msg
    assert "model.layers[0].activation" in msg and "'gelu'" in msg  # lists valid activations
    assert "model.layers[1].type: unknown layer type 'Conv3D'" in msg and "MaxPooling2D" in msg


def test_unknown_initializer_lists_valid_ones(tmp_path: Path) -> None:
    text = "model:\n  layers:\n    - {type: Flatten}\n    - {type: Dense, kernel_initializer: he_normall}\n"
    with pytest.raises(ConfigError, match=r"model.layers\[1\].kernel_initializer.*'he_normal'"):
        load_config(write(tmp_path, text))


def test_keras_aliases_and_case_are_accepted(tmp_path: Path) -> None:
    text = "model:\n  layers:\n    - {type: conv2d, filters: 4, kernel_size: 3}\n    - {type: MaxPool2D}\n    - {type: flatten}\n    - {type: dense}\n"
    cfg = load_config(write(tmp_path, text))
    assert [layer.type for layer in cfg.model.layers] == ["Conv2D", "MaxPooling2D", "Flatten", "Dense"]


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line 3, column 14: mapping values are not allowed"):
        load_config(write(tmp_path, "name: x\nseed: 0\ndata: dataset: mnist\n"))


def test_python_tags_are_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = f"name: !!python/object/apply:os.system ['touch {marker}']\n" + MINIMAL
    with pytest.raises(ConfigError, match="safe loading"):
        load_config(write(tmp_path, text))
    assert not marker.exists()


def test_set_overrides_parse_values_as_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    cfg = load_config(path, ["train.epochs=3", "optimizer.lr=0.01", "data.image_size=[32, 32]",
                             "model.layers.1.units=10", "train.class_weight=balanced"])
    assert cfg.train.epochs == 3
    assert cfg.optimizer.lr == 0.01
    assert cfg.data.image_size == [32, 32]
    assert cfg.model.layers[1].units == 10
    assert cfg.train.class_weight == "balanced"


def test_bad_set_override_is_a_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(path, ["train.epochs"])
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        load_config(path, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="index from 0 to 1"):
        load_config(path, ["model.layers.7.units=3"])


def errors(path: Path, overrides: list[str] | None = None) -> list[str]:
    """The error lines of a config that must fail, without their '  - ' bullets."""
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return [line.removeprefix("  - ") for line in str(e.value).splitlines()[1:] if line.startswith("  - ")]


CONV = MINIMAL.replace("- {type: Flatten}", "- {type: Conv2D, filters: 4, kernel_size: 3}\n    - {type: MaxPooling2D}\n    - {type: Flatten}")


def test_sizes_are_one_int_or_a_pair_and_their_errors_name_the_key(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, CONV + "data: {image_size: 8}\n"))
    assert cfg.data.image_size == [8, 8]  # like kernel_size: 8 means 8x8
    conv, pool = cfg.model.layers[:2]
    assert (conv.kernel_size, conv.strides, pool.pool_size, pool.strides) == ([3, 3], [1, 1], [2, 2], None)
    bad = {
        "strides: 0": "model.layers[0].strides: Input should be greater than 0 (got 0).",
        "strides: [1, 0]": "model.layers[0].strides: Input should be greater than 0 (got [1, 0]).",
        "strides: [1, 2, 3]": "model.layers[0].strides: must be one positive integer or a list of two, e.g. 3 or [3, 2] (got [1, 2, 3]).",
        "strides: two": "model.layers[0].strides: Input should be a valid integer, unable to parse string as an integer (got 'two').",
    }
    for text, line in bad.items():
        assert errors(write(tmp_path, CONV.replace("kernel_size: 3", f"kernel_size: 3, {text}"))) == [line]
    assert errors(write(tmp_path, CONV + "data: {image_size: [0, 8]}\n")) == ["data.image_size: Input should be greater than 0 (got [0, 8])."]


def leaf_keys(node: object, prefix: str = "") -> list[str]:
    """Dotted --set keys of every value in a dumped config (layers by index), except the layers' 'type'."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if node and isinstance(node, list) and isinstance(node[0], dict) else None
    if not items:
        return [prefix]
    return [key for k, v in items if k != "type" for key in leaf_keys(v, f"{prefix}.{k}" if prefix else str(k))]


def test_every_key_reports_its_errors_under_its_own_path() -> None:
    # pydantic labels union branches in error locations (".constrained-int", ".literal[...]"): no key may leak them
    path = ROOT / "configs" / "fashion_mnist.yaml"
    dumped = load_config(path, ["data.image_size=28", "train.class_weight=balanced"]).model_dump(mode="json")
    keys = leaf_keys(dumped)
    assert {"data.normalize", "data.image_size", "train.class_weight", "model.input_shape", "model.layers.0.strides"} <= set(keys)
    for key in keys:
        expected = re.sub(r"\.(\d+)", r"[\1]", key)
        for bad in ("{bad: [[]]}", "[-1]"):
            for line in errors(path, [f"{key}={bad}"]):
                assert re.match(re.escape(expected) + r"(\.[a-z][a-z0-9_]*|\[\d+\])*: ", line), (key, bad, line)


def test_normalize_errors_speak_of_the_form_the_user_wrote(tmp_path: Path) -> None:
    base = MINIMAL + "data:\n  normalize: "
    assert errors(write(tmp_path, base + "standard\n")) == [
        "data.normalize: must be auto, none or a mapping {mean: [...], std: [...]} with one value per channel (got 'standard')."]
    assert errors(write(tmp_path, base + "{mean: [0.5], std: [0]}\n")) == ["data.normalize.std[0]: Input should be greater than 0 (got 0)."]
    assert errors(write(tmp_path, base + "{mean: [0.5]}\n")) == ["data.normalize.std: required key is missing."]
    assert load_config(write(tmp_path, base + "{mean: [0.5], std: [0.25]}\n")).data.normalize.std == [0.25]


def test_class_weight_accepts_digit_labels_and_reports_one_line_per_mistake(tmp_path: Path) -> None:
    # class folders named 3 and 8: YAML reads the keys as numbers, the labels are the folder names
    cfg = load_config(write(tmp_path, MINIMAL + "train:\n  class_weight: {3: 5.0, 8: 2}\n"))
    assert cfg.train.class_weight == {"3": 5.0, "8": 2.0}
    assert Config.model_validate(cfg.to_dict()) == cfg
    assert errors(write(tmp_path, MINIMAL + "train:\n  class_weight: {3: -1}\n")) == [
        "train.class_weight: the weight of label '3' must be a number greater than 0 (got -1)."]
    assert errors(write(tmp_path, MINIMAL + "train:\n  class_weight: inverse\n")) == [
        "train.class_weight: must be balanced or a mapping from label to weight, e.g. {Shirt: 2.0} (got 'inverse')."]


def test_keys_the_chosen_optimizer_or_scheduler_does_not_read_are_errors(tmp_path: Path) -> None:
    text = MINIMAL + "optimizer: {name: adam, momentum: 0.9}\nscheduler: {name: cosine, milestones: [3], min_lr: 0.0001}\n"
    assert errors(write(tmp_path, text)) == [
        "optimizer.momentum: does not apply to adam; it is used by sgd and rmsprop. Remove it, or change optimizer.name.",
        "scheduler.milestones: does not apply to cosine; it is used by multistep. Remove it, or change scheduler.name.",
    ]
    cfg = load_config(write(tmp_path, MINIMAL + "optimizer: {name: sgd, momentum: 0.9, nesterov: true}\nscheduler: {name: plateau, min_lr: 0.0001}\n"))
    assert (cfg.optimizer.momentum, cfg.scheduler.min_lr) == (0.9, 0.0001)


@pytest.mark.parametrize("section", [OptimizerConfig, SchedulerConfig])
def test_a_resolved_config_keeps_only_the_keys_its_choice_reads_and_validates_again(tmp_path: Path, section: type) -> None:
    for name, choice in section.registry.items():
        cfg = load_config(write(tmp_path, MINIMAL), [f"{section.section}.name={name}"])
        written = cfg.to_dict()[section.section]
        assert set(written) == {"name", *section.shared_keys, *choice.keys}, name
        assert load_config(write(tmp_path, cfg.to_yaml())) == cfg


def test_a_config_stored_by_an_earlier_version_with_every_key_still_loads() -> None:
    # earlier versions wrote every optimizer and scheduler key into a run's config.yaml and checkpoints
    cfg = load_config(ROOT / "configs" / "fashion_mnist.yaml", ["optimizer={name: adam, lr: 0.003}"])
    old = cfg.to_dict()
    old["optimizer"] = {key: getattr(cfg.optimizer, key) for key in OptimizerConfig.model_fields}
    old["scheduler"] = {key: getattr(cfg.scheduler, key) for key in SchedulerConfig.model_fields}
    assert old["optimizer"]["momentum"] == 0.0 and cfg.optimizer.name == "adam"
    assert config_from_dict(old, "run/config.yaml", stored=True) == cfg
    with pytest.raises(ConfigError, match="optimizer.momentum: does not apply to adam"):
        config_from_dict(old, "run/config.yaml")
    # what the user sets on top (fcclass train --resume RUN --set ...) is still checked
    with pytest.raises(ConfigError, match="optimizer.rho: does not apply to adam"):
        config_from_dict(old, "run/config.yaml", stored=True, overrides=["optimizer.rho=0.5"])
    assert old["optimizer"]["momentum"] == 0.0  # the caller's mapping is left as it was


def test_errors_that_come_from_a_set_override_say_so(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "data: {batch_size: 0}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.epochs=0", "data.root=elsewhere"])
    assert str(e.value).splitlines() == [
        f"{path} with --set overrides has 2 errors:",
        "  - data.batch_size: Input should be greater than 0 (got 0).",  # this one is in the file
        "  - train.epochs: Input should be greater than 0 (got 0). (from --set train.epochs=0)",
    ]
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))} has 1 error:\n  - data.batch_size: [^\n]*\(got 0\)\.$"):
        load_config(path, ["data.root=elsewhere"])
    # a key in the file that no longer applies once --set changed the name
    assert errors(write(tmp_path, MINIMAL + "scheduler: {name: onecycle, pct_start: 0.2}\n"), ["scheduler.name=none"]) == [
        "scheduler.pct_start: does not apply to none; it is used by onecycle. Remove it, or change scheduler.name. (from --set scheduler.name=none)"]


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config("fashion_mnist")
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


def test_switching_a_scheduler_by_set_explains_how_to_replace_the_section(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "scheduler: {name: onecycle, pct_start: 0.2}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["scheduler.name=cosine"])
    assert "scheduler.pct_start: does not apply to cosine" in str(e.value)
    assert "--set 'scheduler={name: cosine}'" in str(e.value)
    assert load_config(path, ["scheduler={name: cosine}"]).scheduler.name == "cosine"  # what the hint says works
