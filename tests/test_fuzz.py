"""Property-based: whatever configs, --set strings and files a user throws at fcclass, it answers with exit status 0
or 1 and a message, never a traceback; within bounded time and memory; touching no file it was not asked to write.

Hypothesis (https://hypothesis.readthedocs.io) generates the inputs. The default profile is derandomized, so CI
runs the same examples every time; the deep profile explores many more, at
random (FCCLASS_FUZZ=deep .venv/bin/python -m pytest tests/test_fuzz.py)."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import stat
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from conftest import ROOT, needs_fashion
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fcclass.cli import app

# No shrinking by default: commands take a second or more, and shrinking a failure could run for many minutes in CI;
# the failing example is reported as it is.
settings.register_profile("default", max_examples=20, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.register_profile("deep", max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("FCCLASS_FUZZ", "default"))
DEEP = os.environ.get("FCCLASS_FUZZ") == "deep"

runner = CliRunner(env={"COLUMNS": "200"})
SECONDS = 60  # per command: a hang fails the example instead of the suite
EXTRA_MEMORY = 6 * 2**30  # address space a command may add to this process

# ----------------------------------------------------------------------------- what users type
KEYS = ["name", "seed", "data.dataset", "data.image_size", "data.channels", "data.batch_size", "data.limit_train",
        "data.val_split", "data.test_split", "data.normalize", "data.augment", "data.augment.rotation", "data.sampler",
        "model", "model.input_shape", "model.layers", "model.layers.0", "model.layers.0.filters", "model.layers.0.kernel_size",
        "model.layers.0.strides", "model.layers.0.padding", "model.layers.0.activation", "model.layers.1.pool_size",
        "model.layers.-1", "model.layers.-2.units", "model.layers.-3.units", "model.layers.5.type", "model.layers.9",
        "optimizer", "optimizer.name", "optimizer.lr", "optimizer.weight_decay", "optimizer.momentum", "optimizer.betas",
        "scheduler", "scheduler.name", "scheduler.gamma", "scheduler.milestones", "scheduler.max_lr", "train.epochs",
        "train.device", "train.precision", "train.class_weight", "train.label_smoothing", "train.grad_clip", "train.threads",
        "train.early_stopping.patience", "train.checkpoint.monitor"]
FRAGMENTS = [".inf", "-.inf", ".nan", "1e308", "-1e308", "1e-320", "0", "-1", "99999999999999999999", "-99999999999999999999",
             "2147483648", "9223372036854775808", "null", "~", "true", "no", "''", "[]", "{}", "[1]", "[0, 0]", "[-1, 5]",
             "[100000, 100000]", "[1, 1, 1, 1]", "{type: Dense}", "{type: Conv2D, filters: 100000000, kernel_size: 1}",
             "{type: Nope}", "{name: sgd}", "{name: adam, momentum: 0.9}", "&a [*a]", "*undefined", "!!python/object:os.system x",
             "[[[[[[[[[[]]]]]]]]]]", "{a: {b: {c: {d: 1}}}}", "'\x00'", "\"\\u0000\"", "relu", "same", "valid", "auto",
             "cuda:99", "mps", "bf16", "balanced", "{Shirt: .inf}", "{0: -1}", "- a\n- b", "a: b: c", "{", "]", "'unterminated",
             "1_000", "0x10", "0o7", "1:30", "2026-11-28", "=", "k=v"]
LEAVES = st.one_of(st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12), st.booleans(), st.none(),
                   st.sampled_from(["relu", "Dense", "Conv2D", "Flatten", "same", "adam", "auto", "fashion_mnist", "imagefolder"]))
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(["type", "units", "filters", "kernel_size", "rate", "name", "lr", "x", "layers", "activation"]) | st.text(max_size=6),
    inner, max_size=4), max_leaves=12)


def as_yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


SET_VALUES = st.one_of(st.sampled_from(FRAGMENTS), VALUES.map(as_yaml), st.text(max_size=20))
SET_ITEMS = st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), SET_VALUES),
                      st.builds(lambda k, v: f"{k}={v}", st.text(max_size=15), SET_VALUES), st.text(max_size=25))


def bomb(levels: int, width: int) -> str:
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nname: *l{levels - 1}\n"


def shipped_with(value: Any, key: str) -> str:
    raw = yaml.safe_load((ROOT / "configs" / "fashion_mnist.yaml").read_text())
    section, _, rest = key.partition(".")
    if rest and isinstance(raw.get(section), dict):
        raw[section][rest] = value
    else:
        raw[section] = value
    return yaml.safe_dump(raw)


CONFIG_TEXTS = st.one_of(
    VALUES.map(lambda v: yaml.safe_dump(v)),
    st.builds(shipped_with, VALUES, st.sampled_from(["name", "seed", "data", "model", "model.layers", "optimizer", "train",
                                                     "data.image_size", "optimizer.lr", "train.epochs", "scheduler"])),
    st.builds(bomb, st.integers(1, 12), st.integers(1, 12)),
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.sampled_from(["", "---\n...\n", "[1, 2]", "name: !!python/name:os.system\n", "model: {layers: " + "[" * 3000 + "]" * 3000 + "}",
                     "a: &a\n  b: *a\n", "<<: {name: x}\nname: y\n", "\ufeffname: bom\n"]),
)


# ----------------------------------------------------------------------------- the sandbox
@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder holding what hostile commands aim at: special files, links, a real image, a bad one."""
    work = tmp_path_factory.mktemp("fuzz")
    os.mkfifo(work / "fifo.png")
    (work / "adir").mkdir()
    (work / "notes.txt").write_text("the user's own file\n")
    (work / "link.txt").symlink_to(work / "notes.txt")
    (work / "loop.png").symlink_to(work / "loop.png")
    (work / "empty.png").write_bytes(b"")
    (work / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    from PIL import Image

    Image.new("L", (28, 28), 128).save(work / "gray.png")
    huge = bytearray((work / "gray.png").read_bytes())  # a PNG whose header claims 2^31 x 2^31 pixels
    huge[16:24] = (2**31 - 1).to_bytes(4, "big") * 2
    (work / "huge.png").write_bytes(bytes(huge))
    return work


def snapshot(folder: Path, skip: tuple[str, ...] = ("runs", "out")) -> dict[str, tuple]:
    """Every entry under ``folder`` (but ``skip``) with its type, size and modification time."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if rel.parts[0] in skip:
            continue
        st_ = os.lstat(path)
        out[str(rel)] = (stat.S_IFMT(st_.st_mode), st_.st_size, st_.st_mtime_ns)
    return out


@contextlib.contextmanager
def bounded(work: Path) -> Iterator[None]:
    """Run in ``work``, with an alarm after SECONDS and (on the CPU) address space capped at what this process holds
    plus EXTRA_MEMORY: a hang or a runaway allocation fails the example with an exception."""
    def alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the command ran past {SECONDS} s")

    old_cwd, old_handler = Path.cwd(), signal.signal(signal.SIGALRM, alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if not _uses_cuda():
        resource.setrlimit(resource.RLIMIT_AS, (_address_space() + EXTRA_MEMORY, hard))
    os.chdir(work)
    signal.alarm(SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        os.chdir(old_cwd)


def _address_space() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _uses_cuda() -> bool:
    import torch

    return torch.cuda.is_available()  # the CUDA driver reserves address space by the terabyte


def invoke(work: Path, args: list[str]) -> Any:
    before = snapshot(work)
    started = time.monotonic()
    with bounded(work):
        result = runner.invoke(app, args, catch_exceptions=True)
    elapsed = time.monotonic() - started
    shown = f"fcclass {' '.join(repr(a)[:200] for a in args)}\n{result.output[-3000:]}"
    usage_error = result.exit_code == 2 and result.output.startswith("Usage:")  # Click's convention for a malformed command line
    assert result.exit_code in (0, 1) or usage_error, shown
    assert result.exception is None or isinstance(result.exception, SystemExit), f"{shown}\n{result.exception!r}"
    assert "Traceback" not in result.output, shown
    assert snapshot(work) == before, f"files outside runs/ and out/ changed: {shown}"
    assert elapsed < SECONDS, shown
    return result


# ----------------------------------------------------------------------------- the properties
@given(text=CONFIG_TEXTS, sets=st.lists(SET_ITEMS, max_size=3), command=st.sampled_from(["config", "summary"]),
       json_out=st.booleans())
def test_any_config_and_set_items_give_a_result_or_a_message(sandbox: Path, text: str, sets: list[str], command: str,
                                                              json_out: bool) -> None:
    config = sandbox / "out" / "c.yaml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(text, encoding="utf-8", errors="surrogateescape")
    args = [command, "-c", str(config)] + [a for item in sets for a in ("--set", item)] + (["--json", "-"] if json_out else [])
    invoke(sandbox, args)


INPUTS = ["fifo.png", "adir", "notes.txt", "link.txt", "loop.png", "empty.png", "bad.png", "huge.png", "gray.png", "missing.png",
          "/dev/null", "/dev/zero", "/dev/urandom", "/proc/self/mem", "*.nothing", "adir/*.png", "", "-", "--", "\x00", "é.png"]
TARGETS = ["fifo.png", "adir", "notes.txt/x", "/dev/null", "/dev/full", "out/new.png", "out/sub/new.onnx", "out/a.json",
           "out/x.txt", "out/" + "n" * 300, "out/missing/dir/x.png"]


@needs_fashion
@settings(max_examples=600 if DEEP else 6)
@given(command=st.sampled_from(["predict", "export", "plot", "eval", "export-format", "predict-split"]),
       inputs=st.lists(st.sampled_from(INPUTS) | st.text(max_size=10), min_size=1, max_size=3),
       target=st.sampled_from(TARGETS) | st.text(min_size=1, max_size=10).map(lambda t: "out/" + t),
       extra=st.sampled_from([[], ["--top-k", "0"], ["--top-k", "100000"], ["--batch-size", "1"],
                              ["--batch-size", "100000000"], ["--device", "cuda:7"], ["--device", "tpu"]]))
def test_any_file_inputs_and_output_targets_give_a_result_or_a_message(sandbox: Path, trained_run: Path, command: str,
                                                                        inputs: list[str], target: str, extra: list[str]) -> None:
    run = sandbox / "runs" / "r"
    if not run.exists():
        shutil.copytree(trained_run, run)
    device = extra if extra and extra[0] == "--device" else []
    args = {
        "predict": ["predict", *inputs, "--run", str(run), *extra],
        "predict-split": ["predict", "--split", inputs[0], "--run", str(run), *extra],
        "export": ["export", str(run), "-o", target],
        "export-format": ["export", str(run), "--format", inputs[0], "-o", target],
        "plot": ["plot", str(run), "-o", target],
        "eval": ["eval", str(run), "--split", inputs[0], "--no-save", "--json", target, *device],
    }[command]
    invoke(sandbox, args)


TRAIN_KEYS = ["seed", "data.batch_size", "data.val_split", "data.image_size", "data.channels", "data.augment.rotation",
              "data.sampler", "data.normalize", "model.layers.0.filters", "model.layers.0.kernel_size", "model.layers.-3.units",
              "model.layers.-2.rate", "optimizer.lr", "optimizer.name", "optimizer.weight_decay", "scheduler.name",
              "train.label_smoothing", "train.grad_clip", "train.class_weight", "train.precision", "train.threads"]


# Mostly plausible values (so that many examples really train), sometimes anything.
PLAUSIBLE = st.one_of(st.integers(0, 64).map(str), st.floats(0, 3, allow_nan=False).map(repr),
                      st.lists(st.integers(1, 40), min_size=2, max_size=2).map(str),
                      st.sampled_from(["sgd", "adam", "rmsprop", "onecycle", "cosine", "none", "balanced", "bf16", "fp32", "auto",
                                       "{mean: [0.5], std: [0.25]}", "none", "auto"]))
TRAIN_SETS = st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(TRAIN_KEYS), st.one_of(PLAUSIBLE, PLAUSIBLE, SET_VALUES)),
                      min_size=1, max_size=3)


@needs_fashion
@settings(max_examples=300 if DEEP else 4)
@given(sets=TRAIN_SETS)
def test_training_with_any_overrides_finishes_or_explains(sandbox: Path, sets: list[str]) -> None:
    args = ["train", "--set", "data.limit_train=300", "--set", "data.limit_test=100", "--set", "train.epochs=1",
            "--set", f"data.root={ROOT / 'data'}", "--set", "data.download=false", "--set", "train.runs_dir=runs"]
    result = invoke(sandbox, args + [a for item in sets for a in ("--set", item)])
    runs = sandbox / "runs"
    made = [p for p in runs.iterdir() if p.name != "r"] if runs.exists() else []
    if result.exit_code == 0:
        assert made and all((p / "best.pt").is_file() for p in made)  # a run that says it finished left a model
    for p in made:
        shutil.rmtree(p)

