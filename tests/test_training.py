"""Training options: each test fails if its config key were ignored."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import DATA_ROOT, ROOT, folder_config, needs_fashion, small_config
from PIL import Image
from typer.testing import CliRunner

from fcclass.cli import app
from fcclass.config.registries import OPTIMIZERS
from fcclass.config.sections import OptimizerConfig, SchedulerConfig
from fcclass.errors import FcclassError
from fcclass.runs.checkpoint import Checkpoint
from fcclass.training.fit import fit
from fcclass.training.schedule import LRSchedule
from fcclass.training.setup import start_trainer
from fcclass.training.state import TrainingDiverged

runner = CliRunner(env={"COLUMNS": "200"})


def metrics(run_dir: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader((run_dir / "metrics.csv").open())]


def no_time(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in history]


# ----------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize(
    ("name", "cls", "options", "check"),
    [
        ("sgd", torch.optim.SGD, {"momentum": 0.9, "nesterov": True}, {"momentum": 0.9, "nesterov": True}),
        ("adam", torch.optim.Adam, {"betas": [0.8, 0.99]}, {"betas": (0.8, 0.99)}),
        ("adamw", torch.optim.AdamW, {"weight_decay": 0.05}, {"weight_decay": 0.05}),
        ("rmsprop", torch.optim.RMSprop, {"momentum": 0.5, "rho": 0.8}, {"momentum": 0.5, "alpha": 0.8}),
        ("adadelta", torch.optim.Adadelta, {"rho": 0.95, "lr": 1.0}, {"rho": 0.95, "lr": 1.0}),
    ],
)
def test_optimizer_names_and_options_reach_torch(name: str, cls: type, options: dict, check: dict) -> None:
    opt = OPTIMIZERS[name]([torch.nn.Parameter(torch.zeros(2))], OptimizerConfig(name=name, **options))
    assert type(opt) is cls
    for key, value in check.items():
        assert opt.param_groups[0][key] == value


# ----------------------------------------------------------------------------- schedules
def lr_per_epoch(name: str, epochs: int = 4, steps: int = 5, lr: float = 1.0, metric=lambda e: 1.0, **kw) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    sched = LRSchedule(opt, SchedulerConfig(name=name, **kw), epochs, steps)
    out = []
    for epoch in range(epochs):
        used = []
        for _ in range(steps):
            used.append(sched.lr)
            opt.step()
            sched.after_batch()
        out.append(sum(used) / len(used))
        sched.after_epoch(metric(epoch))
    return out


def test_step_multistep_exponential_schedules() -> None:
    assert lr_per_epoch("none") == [1.0] * 4
    assert lr_per_epoch("step", step_size=1, gamma=0.5) == pytest.approx([1, 0.5, 0.25, 0.125])
    assert lr_per_epoch("step", step_size=2, gamma=0.1) == pytest.approx([1, 1, 0.1, 0.1])
    assert lr_per_epoch("multistep", milestones=[1, 3], gamma=0.1) == pytest.approx([1, 0.1, 0.1, 0.01])
    assert lr_per_epoch("exponential", gamma=0.5) == pytest.approx([1, 0.5, 0.25, 0.125])


def test_cosine_and_onecycle_step_per_batch() -> None:
    cos = lr_per_epoch("cosine", min_lr=0.0)
    assert cos[0] > cos[1] > cos[2] > cos[3] and cos[3] < 0.2
    one = lr_per_epoch("onecycle", epochs=5, max_lr=2.0, pct_start=0.3)
    peak = one.index(max(one))
    assert 0 < peak < 4 and one[0] < one[peak] and one[-1] < one[0] and max(one) <= 2.0


@pytest.mark.parametrize(("epochs", "steps", "pct_start"), [(1, 5, 0.2), (1, 4, 0.25), (2, 1, 0.5), (1, 10, 0.1), (1, 3, 0.3)])
def test_onecycle_survives_a_warm_up_of_one_step(epochs: int, steps: int, pct_start: float) -> None:
    # pct_start x total steps == 1 made torch's OneCycleLR divide by zero (a 640-image `fcclass bench` hit it)
    lrs = lr_per_epoch("onecycle", epochs=epochs, steps=steps, max_lr=2.0, pct_start=pct_start)
    assert all(0 < lr <= 2.0 for lr in lrs)


def test_plateau_reduces_when_the_monitored_metric_stalls() -> None:
    assert lr_per_epoch("plateau", epochs=4, factor=0.5, patience=0, metric=lambda e: 1.0) == pytest.approx([1, 1, 0.5, 0.25])
    assert lr_per_epoch("plateau", epochs=4, factor=0.5, patience=0, metric=lambda e: 1.0 - e) == pytest.approx([1, 1, 1, 1])


def test_linear_warmup_precedes_the_schedule() -> None:
    lrs = lr_per_epoch("step", epochs=4, step_size=1, gamma=0.5, warmup_epochs=2)
    assert lrs[0] < lrs[1] < 1.0  # rising
    assert lrs[2:] == pytest.approx([1.0, 0.5])  # then the step schedule from its start


@needs_fashion
def test_lr_used_each_epoch_is_logged(tmp_path: Path) -> None:
    result = fit(small_config(tmp_path, **{"train.epochs": 3, "data.limit_train": 500, "optimizer.lr": 0.004,
                                           "scheduler": {"name": "step", "step_size": 1, "gamma": 0.5}}))
    assert [r["lr"] for r in metrics(result.run_dir)] == pytest.approx([0.004, 0.002, 0.001])


# ----------------------------------------------------------------------------- loss options
@needs_fashion
def test_label_smoothing_raises_the_training_and_validation_loss(tmp_path: Path) -> None:
    base = {"train.epochs": 1, "data.limit_train": 1000}
    plain = fit(small_config(tmp_path / "a", **base)).history[0]
    smooth = fit(small_config(tmp_path / "b", **base, **{"train.label_smoothing": 0.5})).history[0]
    assert smooth["train_loss"] > plain["train_loss"] + 0.2
    # as in Keras, val_loss uses the same loss function, so the two curves compare like with like
    assert smooth["val_loss"] > plain["val_loss"] + 0.2


@needs_fashion
def test_grad_clip_limits_the_update(tmp_path: Path) -> None:
    base = {"train.epochs": 1, "data.limit_train": 2000, "data.batch_size": 64, "optimizer.name": "sgd",
            "optimizer.lr": 0.05, "optimizer.momentum": 0.9, "scheduler": {"name": "none"}}
    free = fit(small_config(tmp_path / "a", **base)).history[0]["val_accuracy"]
    clipped = fit(small_config(tmp_path / "b", **base, **{"train.grad_clip": 1e-5})).history[0]["val_accuracy"]
    assert free > clipped + 0.2


@needs_fashion
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_best(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, **{"train.epochs": 4, "data.limit_train": 600, "optimizer.name": "sgd", "optimizer.lr": 0.01,
                                    "scheduler": {"name": "exponential", "gamma": 1.0e7}})
    with pytest.raises(TrainingDiverged, match=r"epoch 2, batch \d+\. The weights became non-finite.* optimizer.lr is 0.01 "
                       r"\(learning rate now .*\)\. Lower it, or set train.grad_clip") as caught:
        fit(cfg)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert Checkpoint.load(run_dir / "best.pt").epoch == 1
    assert f"is kept in {run_dir}." in str(caught.value)  # the message points only to what exists


# ----------------------------------------------------------------------------- early stopping, best checkpoint
@needs_fashion
def test_early_stopping_and_best_checkpoint(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, **{"train.epochs": 6, "data.limit_train": 600, "train.early_stopping.monitor": "val_accuracy",
                                    "train.early_stopping.patience": 2, "train.early_stopping.min_delta": 1.0})
    result = fit(cfg)
    assert result.stopped_early and len(result.history) == 3  # epoch 1 sets the mark; 2 and 3 can't beat it by 1.0
    best_epoch = max(result.history, key=lambda r: (r["val_accuracy"], -r["val_loss"]))["epoch"]  # a tie: the lower loss
    assert Checkpoint.load(result.run_dir / "best.pt").epoch == best_epoch
    from fcclass.inference.evaluate import evaluate

    assert evaluate(result.run_dir).checkpoint.endswith("best.pt")


def _epochs(*figures: tuple[float, float], split: str = "val") -> list[dict]:
    other = "train" if split == "val" else "val"
    return [{"epoch": i, f"{split}_accuracy": a, f"{split}_loss": loss, f"{other}_accuracy": None if split == "train" else 0.5,
             f"{other}_loss": None if split == "train" else 1.0} for i, (a, loss) in enumerate(figures, 1)]


def test_a_tie_for_the_best_epoch_goes_to_the_epoch_better_on_the_other_metric() -> None:
    from fcclass.runs.metrics import best_row, better_epoch, tie_breaker

    assert [tie_breaker(m) for m in ("val_accuracy", "val_loss", "train_accuracy", "train_loss")] == \
        ["val_loss", "val_accuracy", "train_loss", "train_accuracy"]
    # 100 % val accuracy from epoch 3 on while the val loss keeps falling: the last epoch, not the first at 100 %
    rows = _epochs((0.9, 0.3), (0.95, 0.2), (1.0, 0.05), (1.0, 0.01), (1.0, 0.0008), (0.99, 0.0001))
    assert best_row(rows, "val_accuracy")["epoch"] == 5
    assert best_row(rows, "val_loss")["epoch"] == 6  # a loss monitor: the lowest loss, whatever the accuracy
    tied_loss = _epochs((0.9, 0.2), (0.95, 0.2), (0.93, 0.2))
    assert best_row(tied_loss, "val_loss")["epoch"] == 2  # equal losses: the higher accuracy
    assert best_row(_epochs((1.0, 0.1), (1.0, 0.1)), "val_accuracy")["epoch"] == 1  # a tie on both: the earlier epoch
    no_val = _epochs((0.8, 0.5), (1.0, 0.2), (1.0, 0.1), split="train")  # data.val_split 0: the training metrics stand in
    assert best_row(no_val, "val_accuracy")["epoch"] == 3 and best_row(no_val, "val_loss")["epoch"] == 3
    assert best_row([], "val_accuracy") is None
    assert better_epoch(rows[0], None, "val_accuracy") and not better_epoch(rows[3], rows[4], "val_accuracy")


@needs_fashion
def test_a_real_run_at_100_percent_keeps_the_epoch_with_the_lowest_val_loss(clothes_folder: Path, tmp_path: Path) -> None:
    from fcclass.config.load import load_config
    from fcclass.runs.listing import list_runs
    from fcclass.runs.metrics import read_metrics

    result = fit(load_config(folder_config(tmp_path, clothes_folder, epochs=4), ["train.test_at_end=false"]))
    top = max(r["val_accuracy"] for r in result.history)
    tied = [r for r in result.history if r["val_accuracy"] == top]
    assert len(tied) >= 2, result.history  # three easy labels: several epochs at the same (100 %) val accuracy
    expected = min(tied, key=lambda r: r["val_loss"])["epoch"]
    assert expected != tied[0]["epoch"]  # the first tied epoch is not the best one here: the tie was broken
    assert result.best_epoch == expected == Checkpoint.load(result.run_dir / "best.pt").epoch
    assert json.loads((result.run_dir / "summary.json").read_text())["best"]["epoch"] == expected
    assert len(read_metrics(result.run_dir)) == 4
    (result.run_dir / "summary.json").unlink()  # a run from before summary.json: listed from config.yaml and metrics.csv
    (row,) = list_runs(tmp_path / "runs")
    assert row.best_epoch == expected


# ----------------------------------------------------------------------------- device, precision, reproducibility
def test_precision_and_device_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from fcclass.device import select_device, select_precision

    with pytest.raises(FcclassError, match="fp16 needs a CUDA device"):
        select_precision("fp16", torch.device("cpu"))
    monkeypatch.setenv("FCCLASS_CPU_BF16", "0")  # a CPU without native bf16: fp32 unless asked
    assert select_precision("auto", torch.device("cpu")) is None
    monkeypatch.setenv("FCCLASS_CPU_BF16", "1")
    assert select_precision("auto", torch.device("cpu")) is torch.bfloat16
    assert select_precision("fp32", torch.device("cpu")) is None
    if not torch.cuda.is_available():
        assert select_device("auto").type in ("cpu", "mps")
        with pytest.raises(FcclassError, match="CUDA is not available"):
            select_device("cuda")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


NATIVE_BF16 = bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def test_native_bf16_detection_agrees_with_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from fcclass.device import cpu_bf16_native

    monkeypatch.delenv("FCCLASS_CPU_BF16", raising=False)
    if not Path("/proc/cpuinfo").exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    assert cpu_bf16_native() == NATIVE_BF16


@pytest.mark.skipif(not NATIVE_BF16, reason="the CPU has no native bf16 (avx512_bf16 / amx_bf16)")
@needs_fashion
def test_auto_precision_trains_in_bf16_on_a_cpu_that_has_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.precision auto picks bf16 on such a CPU, records it, and learns about as well as fp32 (same seed)."""
    monkeypatch.delenv("FCCLASS_CPU_BF16", raising=False)
    auto = fit(small_config(tmp_path / "auto", **{"train.device": "cpu", "train.precision": "auto"}))  # the tests pin fp32
    fp32 = fit(small_config(tmp_path / "fp32", **{"train.device": "cpu", "train.precision": "fp32"}))
    assert auto.precision == "bf16" and fp32.precision == "fp32"
    # 3,000 images, 3 epochs: a few points of run-to-run noise; the full default config is compared in RESULTS.md
    assert abs(auto.history[-1]["val_accuracy"] - fp32.history[-1]["val_accuracy"]) < 0.05
    assert json.loads((auto.run_dir / "summary.json").read_text())["precision"] == "bf16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_fashion
def test_trains_on_cuda_with_bf16(tmp_path: Path) -> None:  # pragma: no cover - runs where a GPU is present
    result = fit(small_config(tmp_path, **{"train.epochs": 1, "train.device": "cuda", "train.precision": "bf16"}))
    assert result.device.startswith("cuda") and result.history[0]["val_accuracy"] > 0.5


@needs_fashion
def test_fit_leaves_the_callers_thread_count_and_matplotlib_backend_as_it_found_them(tmp_path: Path) -> None:
    """A library user's process is theirs: train.threads applies while fit() trains, and drawing curves.png does not
    switch matplotlib's backend (it used to set Agg for the whole process)."""
    import matplotlib

    matplotlib.use("svg")
    threads = torch.get_num_threads()
    wanted = 1 if threads != 1 else 2
    result = fit(small_config(tmp_path, **{"data.limit_train": 300, "train.epochs": 1, "train.threads": wanted}))
    assert (result.run_dir / "curves.png").is_file()
    assert torch.get_num_threads() == threads and matplotlib.get_backend() == "svg"


@needs_fashion
def test_same_seed_gives_the_same_metrics(tmp_path: Path) -> None:
    over = {"train.epochs": 2, "data.limit_train": 500, "data.augment.random_crop_padding": 2}
    a = fit(small_config(tmp_path / "a", **over)).history
    b = fit(small_config(tmp_path / "b", **over)).history
    c = fit(small_config(tmp_path / "c", **over, seed=1)).history
    assert no_time(a) == no_time(b)
    assert no_time(a) != no_time(c)


# ----------------------------------------------------------------------------- class imbalance
@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real Fashion-MNIST: T-shirt and Pullover with 300 training images each, Shirt with 30; 100 each to test."""
    from fcclass.config.sections import DataConfig
    from fcclass.data import load_dataset

    if not (ROOT / "data").exists():
        pytest.skip("no data")
    ds = load_dataset(DataConfig(root=str(DATA_ROOT), download=False), 0, splits=("train", "test"))
    root = tmp_path_factory.mktemp("imb")
    for split, part, counts in (("train", ds.train, {0: 300, 2: 300, 6: 30}), ("test", ds.test, {0: 100, 2: 100, 6: 100})):
        for label, n in counts.items():
            folder = root / split / ds.info.class_names[label].replace("/", "-")
            folder.mkdir(parents=True)
            for i in (part.labels == label).nonzero().flatten()[:n].tolist():
                Image.fromarray(part.images[i, 0].numpy(), "L").save(folder / f"{i}.png")
    return root


def _shirt_recall(tmp_path: Path, folder: Path, **extra: object) -> float:
    from fcclass.config.load import config_from_dict
    from fcclass.inference.evaluate import evaluate

    raw = {
        "name": "imb", "seed": 0,
        "data": {"dataset": "imagefolder", "path": str(folder), "channels": 1, "val_split": 0.0, "batch_size": 32, "num_workers": 0},
        "model": {"layers": [{"type": "Flatten"}, {"type": "Dense", "units": 64, "activation": "relu"}, {"type": "Dense"}]},
        "optimizer": {"lr": 0.002}, "train": {"epochs": 6, "runs_dir": str(tmp_path / "runs")},
    }
    for key, value in extra.items():
        section, name = key.split(".")
        raw[section][name] = value
    result = fit(config_from_dict(raw))
    return evaluate(result.run_dir).per_class["Shirt"]["accuracy"]


@pytest.mark.slow  # four trainings and evaluations: 12 s; the header test below checks the weights reach the loss
@needs_fashion
def test_class_weights_and_balanced_sampler_raise_minority_recall(imbalanced: Path, tmp_path: Path) -> None:
    plain = _shirt_recall(tmp_path / "plain", imbalanced)
    weighted = _shirt_recall(tmp_path / "weighted", imbalanced, **{"train.class_weight": "balanced"})
    sampled = _shirt_recall(tmp_path / "sampled", imbalanced, **{"data.sampler": "balanced"})
    manual = _shirt_recall(tmp_path / "manual", imbalanced, **{"train.class_weight": {"Shirt": 20.0}})
    print(f"Shirt recall: plain {plain:.2f}, balanced weights {weighted:.2f}, balanced sampler {sampled:.2f}, manual {manual:.2f}")
    assert weighted > plain + 0.05  # fixed seed: measured 0.12 -> 0.22
    assert sampled > plain + 0.05
    assert manual > plain + 0.05


@needs_fashion
def _train_on_imbalanced(imbalanced: Path, tmp_path: Path, data: str = "", train: str = "") -> str:
    """One epoch of a linear model on the imbalanced folder; the training output."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data: {{dataset: imagefolder, path: '{imbalanced}', channels: 1, num_workers: 0{data}}}\n"
        "model: {layers: [{type: Flatten}, {type: Dense}]}\n"
        f"train: {{epochs: 1, runs_dir: '{tmp_path / 'runs'}'{train}}}\n"
    )
    res = runner.invoke(app, ["train", "-c", str(cfg)])
    assert res.exit_code == 0, res.output
    return res.output


def test_training_header_shows_device_counts_and_class_weights(imbalanced: Path, tmp_path: Path) -> None:
    output = _train_on_imbalanced(imbalanced, tmp_path, train=", class_weight: balanced")
    from fcclass.device import select_device

    assert f"Device: {select_device('auto')}" in output and "Class weight" in output
    # 300 + 300 + 30 images, 10% held out for validation: 270 + 270 + 27 train -> weight n / (3 * count)
    assert "270" in output and "27 " in output
    assert "7.000" in output and "0.700" in output  # 567 / (3 x 27) and 567 / (3 x 270), worked by hand


@needs_fashion
def test_training_header_says_the_balanced_sampler_is_on_and_what_it_draws(imbalanced: Path, tmp_path: Path) -> None:
    output = _train_on_imbalanced(imbalanced, tmp_path, data=", sampler: balanced")
    out = " ".join(output.split())
    # 270 + 270 + 27 training images: an epoch draws 567, 189 of each label on average
    assert "Drawn / epoch" in output and output.count("≈189") == 4  # three rows and the note
    assert "Balanced sampler (data.sampler: balanced): each epoch draws 567 training images with replacement" in out
    assert "every label equally often (≈189 each" in out and "applies on top" not in out


def test_balanced_draws_leave_out_labels_without_images() -> None:
    from fcclass.training.console import balanced_draws, balanced_sampler_line

    assert balanced_draws([270, 270, 27]) == [189.0, 189.0, 189.0]
    assert balanced_draws([10, 0, 20]) == [15.0, 0.0, 15.0] and balanced_draws([0, 0]) == [0.0, 0.0]
    assert "train.class_weight applies on top of it" in balanced_sampler_line([10, 20], weighted=True)


def test_unknown_label_in_class_weight_mapping_is_an_error(imbalanced: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data: {{dataset: imagefolder, path: '{imbalanced}', num_workers: 0}}\nmodel: {{layers: [{{type: Flatten}}, {{type: Dense}}]}}\n"
        f"train: {{epochs: 1, class_weight: {{Shirts: 2}}, runs_dir: '{tmp_path / 'runs'}'}}\n"
    )
    res = runner.invoke(app, ["train", "-c", str(cfg)])
    assert res.exit_code == 1 and "Shirts" in res.output and "Pullover" in res.output


# ----------------------------------------------------------------------------- plots
@needs_fashion
def test_curves_png_is_drawn_and_redrawn(trained_run: Path) -> None:
    png = trained_run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()
    res = runner.invoke(app, ["plot", str(trained_run)])
    assert res.exit_code == 0 and png.exists()
    with Image.open(png) as img:
        assert img.width > 1000


# ----------------------------------------------------------------------------- no validation split
@needs_fashion
def test_without_a_validation_split_train_metrics_stand_in_and_nothing_prints_nan(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(small_config(tmp_path, **{"data.val_split": 0.0, "data.limit_train": 500, "train.epochs": 2,
                                            "train.early_stopping.patience": 5}).to_yaml())
    res = runner.invoke(app, ["train", "-c", str(cfg)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "nan" not in text.lower()
    assert "No validation split (data.val_split is 0): best.pt keeps the epoch with the best train_accuracy and early " \
           "stopping follows train_loss instead." in text
    assert "(no validation split)" in text
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [r["val_loss"] for r in rows] == ["", ""]
    best = max(rows, key=lambda r: (float(r["train_accuracy"]), -float(r["train_loss"])))
    assert Checkpoint.load(run_dir / "best.pt").epoch == int(best["epoch"])
    js = runner.invoke(app, ["train", "-c", str(cfg), "--json", "-"])
    assert js.exit_code == 0 and json.loads(js.stdout)["history"][0]["val_loss"] is None  # valid JSON: null, never NaN


# ----------------------------------------------------------------------------- Apple-silicon GPUs have no float64
@needs_fashion
def test_the_training_loop_computes_nothing_in_float64(tmp_path: Path) -> None:
    """MPS has no float64: one op in it would crash training there. Every op of an epoch and its validation is
    watched (on the CPU) for a float64 result."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves


    class NoFloat64(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_leaves(out)):
                self.seen.add(str(func))
            return out

    cfg = small_config(tmp_path, **{"data.limit_train": 300, "train.class_weight": "balanced", "train.label_smoothing": 0.1,
                                    "data.augment.rotation": 10, "data.augment.random_crop_padding": 2, "train.grad_clip": 1.0})
    trainer = start_trainer(cfg)
    with NoFloat64() as watch:
        row = trainer.train_epoch(1)
        row |= trainer.validate()
    assert row["val_accuracy"] is not None and not watch.seen, watch.seen


def test_the_training_loop_imports_no_rendering_and_runs_no_model_builder() -> None:
    """Progress, tables and curves are callbacks: importing the trainer pulls in neither Rich nor matplotlib, and the
    run-directory module does not depend on the model builder (nor on torch until a checkpoint is read)."""
    import subprocess
    import sys

    code = ("import sys, fcclass.training.trainer; bad = [m for m in ('rich', 'matplotlib') if m in sys.modules]; "
            "import fcclass.runs.checkpoint; print(bad)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
    code = "import sys, fcclass.runs.checkpoint; print([m for m in ('fcclass.model', 'torch') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


@needs_fashion
def test_a_terminal_gets_a_live_progress_bar(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    out = io.StringIO()
    fit(small_config(tmp_path, **{"data.limit_train": 300, "train.epochs": 1}), console=Console(file=out, force_terminal=True, width=120))
    text = out.getvalue()
    assert "epoch 1/1" in text and "loss " in text and "nan" not in text
