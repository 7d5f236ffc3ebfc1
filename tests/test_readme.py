"""README.md's examples run: every shown command (``$ fcclass ...`` with the output under it, the fcclass lines of
``bash`` blocks), every output block shown without a command, every ``--json`` shape the prose promises and the
Python snippets. A change that makes the README wrong fails here.

How each example is checked is in the registries below (``EXAMPLES``: by command line; ``BLOCKS``: output, config
and code blocks without a ``$`` line, by their first line; ``JSON``: the paragraphs that mention ``--json``, by a
piece of their text). An example the README gains without an entry here fails ``test_every_readme_example_is_registered``
with what to add. Error examples (``Error:`` under the command) are run as shown, from a scratch folder outside the
repository that holds what they refer to: exit status 1, no traceback, nothing on stdout, nothing written, and
each shown line of the message found in the real one. Other examples are run on a small training run (the README's
numbers are not what they check: shapes of lines, titles, column names, exact where nothing varies); the expensive
ones run with ``-m slow``, and the few that need what a test machine lacks say why they are not run.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import readme_examples as readme
import yaml
from conftest import DATA_ROOT, ROOT, SignalAt, fashion_available, needs_fashion
from typer.testing import CliRunner

from fcclass.cli import app
from fcclass.training.callbacks import Callback

runner = CliRunner(env={"COLUMNS": "1000"})  # no line wrapped: the README's lines are compared whole
SMALL = ["--set", "data.limit_train=300", "--set", "data.limit_test=100", "--set", "train.epochs=1"]
IMAGE_SIZE = ["--set", "data.image_size=16"]  # the README's image folders train at 64x64
DEVICES = [(r"Device: \S+ \([^)]*\)", "Device: <device>"),  # the machine's device and precision, whichever it is
           (r"this CPU has (no native bf16|native bf16, AVX512-BF16/AMX)", "this CPU has <bf16 or not>")]


@dataclass
class Check:
    kind: str  # "error" | "run" | "slow" | "not run"
    how: Callable[..., None] | str  # the check, or why the example is not run


EXAMPLES: dict[str, list[Check]] = {}  # command line -> how it is checked (a fast and a slow check, say)
BLOCKS: dict[str, list[Check]] = {}  # readme.block_key(block) -> how it is checked
NOT_RUN = "not run"


def example(*commands: str, kind: str = "run", table: dict[str, list[Check]] = EXAMPLES) -> Callable:
    def register(fn: Callable) -> Callable:
        for command in commands:
            table.setdefault(command, []).append(Check(kind, fn))
        return fn
    return register


def not_run(table: dict[str, list[Check]], key: str, why: str) -> None:
    table.setdefault(key, []).append(Check(NOT_RUN, why))


def block(*first_lines: str, kind: str = "run") -> Callable:
    return example(*first_lines, kind=kind, table=BLOCKS)


JSON: dict[str, Check] = {}  # a piece of the paragraph that mentions --json -> how it is checked


def json_example(anchor: str, kind: str = "run") -> Callable:
    def register(fn: Callable) -> Callable:
        JSON[anchor] = Check(kind, fn)
        return fn
    return register


def paragraph(anchor: str) -> str:
    (found,) = [p for p in readme.paragraphs() if anchor in p]
    return found


def assert_shape(data: Any, anchor: str) -> None:
    errors = readme.shape_errors(data, readme.shape_after(paragraph(anchor), anchor))
    assert not errors, f"README.md, after {anchor!r}:\n" + "\n".join(errors)


def json_of(command: str, cwd: Path) -> Any:
    res = cli(command, cwd)
    assert res.code == 0, res.output
    return json.loads(res.stdout)  # nothing but JSON on stdout



# ----------------------------------------------------------------------------- running commands as the README shows
@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str
    exception: BaseException | None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def cli(command: str, cwd: Path, paths: dict[str, str] | None = None, extra: list[str] | None = None,
        env: dict[str, str] | None = None) -> Ran:
    """Run a README command line in this process from ``cwd`` (``cd DIR && fcclass ...`` from DIR), with the README's
    paths replaced by the real ones (``paths``: shown -> real) and ``extra`` arguments appended."""
    for shown, real in (paths or {}).items():
        command = command.replace(shown, real)
    argv = shlex.split(command)
    if argv[0] == "cd":
        cwd, argv = Path(argv[1]), argv[3:]
    assert argv[0] == "fcclass", command
    old = os.getcwd()
    os.chdir(cwd)
    try:
        res = runner.invoke(app, [*argv[1:], *(extra or [])], env=env)
    finally:
        os.chdir(old)
    return Ran(res.exit_code, res.stdout, res.stderr, res.exception)


@contextlib.contextmanager
def fit_with(*callbacks: Callback) -> Iterator[None]:
    """fcclass.training.fit.fit, which `fcclass train` calls, with ``callbacks`` added for the commands run meanwhile."""
    module = importlib.import_module("fcclass.training.fit")  # the module (fcclass.training.fit is also the function)
    fit = module.fit

    def with_callbacks(*args: Any, **kwargs: Any) -> Any:
        return fit(*args, **kwargs, callbacks=list(callbacks))

    module.fit = with_callbacks
    try:
        yield
    finally:
        module.fit = fit


class TrainingStarted(BaseException):
    """Raised when an error example starts training after all: the test fails at once instead of training."""


class NoTraining(Callback):
    def on_fit_start(self, trainer: Any) -> None:
        raise TrainingStarted("the example started training instead of stopping with its error")


def assert_shown(shown: list[str], real: str, paths: dict[str, str] | None = None, numbers: bool = True,
                 labels: bool = False, skip: tuple[str, ...] = ()) -> None:
    """Every shown line (but elisions and ``skip``) is a line of the real output, once both are normalised (real paths
    written as the README's, timestamps, the device and, with ``numbers``, every number abstracted)."""
    replace = {real_path: shown_path for shown_path, real_path in (paths or {}).items()}
    for pattern, replacement in DEVICES:
        real = re.sub(pattern, replacement, real)
        shown = [re.sub(pattern, replacement, line) for line in shown]
    missing = readme.missing_lines(shown, real, replace=replace, numbers=numbers, labels=labels, skip=skip)
    assert not missing, "README lines that the real output lacks:\n" + "\n".join(missing) + "\n--- real output:\n" + real


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if "decode-cache" not in p.parts)


def check_error(ex: readme.Example, cwd: Path, paths: dict[str, str] | None = None, numbers: bool = False,
                env: dict[str, str] | None = None, watch: Path | None = None) -> Ran:
    """An error example: exit status 1, no traceback, nothing on stdout, no file written (under ``watch``, default
    ``cwd``), and the shown message's lines in the real one."""
    watch = watch or cwd
    before = listing(watch)
    with fit_with(NoTraining()):
        res = cli(ex.command, cwd, paths, env=env)
    assert not isinstance(res.exception, TrainingStarted), f"README.md:{ex.line}: `{ex.command}` is no error any more: it trains"
    assert res.code == 1, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output, res.output
    assert res.stdout == "", res.stdout
    assert res.stderr.startswith("Error: "), res.stderr
    assert "\nepoch " not in res.stderr  # no training started
    assert listing(watch) == before, "the failed command wrote files"
    assert_shown(ex.output, res.stderr, paths, numbers=numbers)
    return res


# ----------------------------------------------------------------------------- the scratch folders the examples run in
BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]"
                                                          for p, n in zip("abcdefgh", "bcdefghi")]) + "\nname: *i\n"


class KilledAt(Callback):
    """Copies the run directory to ``copy`` after the first batch: what the run leaves when killed there."""

    def __init__(self, copy: Path) -> None:
        self.copy, self.run_dir = copy, None

    def on_batch_end(self, trainer: Any, info: Any) -> None:
        if (info.epoch, info.batch) == (1, 1):
            self.run_dir = trainer.run_dir
            shutil.copytree(trainer.run_dir, self.copy)


class Workspace:
    """Scratch folders outside the repository, as a user's: ``data`` (a link to the test data), ``samples/``, and the
    runs the examples name. Each scenario is built when an example first needs it, once per module."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.request: pytest.FixtureRequest | None = None

    def folder(self, name: str) -> Path:
        path = self.factory.mktemp(name)
        (path / "data").symlink_to(DATA_ROOT, target_is_directory=True)
        shutil.copytree(ROOT / "samples", path / "samples")
        return path

    @cached_property
    def home(self) -> Path:
        """Two small trained runs, as `runs compare` shows them: ``cnn-lr01`` (trained with ``--json -``, optimizer.lr
        0.01), then ``cnn`` (the default config, the newest trained run)."""
        if not fashion_available():
            pytest.skip("Fashion-MNIST not installed")
        home = self.folder("readme")
        self.train_json = cli("fcclass train --json -", home, extra=[*SMALL, "--set", "name=cnn-lr01", "--set", "optimizer.lr=0.01"])
        assert self.train_json.code == 0, self.train_json.output
        self.train_human = cli("fcclass train", home, extra=[*SMALL, "--set", "name=cnn", "--log-interval", "0.001"])
        assert self.train_human.code == 0, self.train_human.output
        (self.lr01,) = (home / "runs").glob("cnn-lr01-*")
        (self.trained,) = (home / "runs").glob("cnn-2*")
        return home

    @cached_property
    def exported(self) -> Ran:
        return cli("fcclass export runs/fashion-cnn-20261127-234551", self.home, {"fashion-cnn-20261127-234551": self.trained.name})

    @cached_property
    def stopped(self) -> Path:
        """A folder whose runs are a trained run and a newer one killed in its first epoch: what `kill -9` leaves (a
        copy of the run directory taken during the first epoch; Ctrl-C there would remove the run)."""
        from fcclass.config.load import load_config
        from fcclass.training.fit import fit

        folder = self.folder("stopped")
        shutil.copytree(self.home / "runs" / self.trained.name, folder / "runs" / self.trained.name)
        cfg = load_config(None, [f"train.runs_dir={folder / 'runs'}", "data.limit_train=300", "data.limit_test=100"])
        snapshot = KilledAt(folder / "killed")
        result = fit(cfg, callbacks=[snapshot, SignalAt(1, 1, signal.SIGINT)])
        assert result.removed and snapshot.run_dir is not None
        self.stopped_run = snapshot.run_dir
        (folder / "killed").rename(self.stopped_run)
        return folder

    @cached_property
    def sig(self) -> dict[int, Ran]:
        """The README's interrupted-and-resumed run, command by command (SIGINT arrives in epoch 3), on fewer images."""
        folder, runs = self.folder("sig"), self.factory.mktemp("sig")  # /tmp/sig is not under the folder the commands run in
        examples = [e for e in readme.examples() if "/tmp/sig" in e.command]
        results, run = {}, ""
        for number, ex in enumerate(examples):
            with fit_with(*([SignalAt(3, 1, signal.SIGINT)] if number == 0 else [])):
                results[ex.line] = cli(ex.command, folder, {"/tmp/sig": str(runs), "fashion-cnn-20261127-232148": run},
                                       extra=SMALL[:4] if number == 0 else [])
            run = run or next(runs.iterdir()).name
        self.sig_dir = runs
        return results

    @cached_property
    def images(self) -> Path:
        """/tmp/readme of the README's image-folder examples, with `photos` (real Fashion-MNIST PNGs, 3 labels), and
        the two trainings of the decode-cache example on it (at 16x16, not 64x64), in the README's order. The first
        run stands in for the recorded-splits examples' run of data/my_images."""
        assert self.request is not None
        folder = self.factory.mktemp("images")
        shutil.copytree(self.request.getfixturevalue("clothes_folder"), folder / "photos")
        self.photos_runs = {}
        for ex in [e for e in readme.examples() if "data.path=photos" in e.command]:
            before = set((folder / "runs").glob("*")) if (folder / "runs").exists() else set()
            self.photos_runs[ex.line] = res = cli(ex.command, folder, extra=IMAGE_SIZE, env={"FCCLASS_CACHE_DIR": "cache"})
            assert res.code == 0, res.output
            (run,) = set((folder / "runs").glob("*")) - before
            self.my_images_run = getattr(self, "my_images_run", run)
        return folder


    def clothes(self) -> list[Path]:
        """The clothes_folder fixture's images (real Fashion-MNIST PNGs), to build other image folders from."""
        assert self.request is not None
        return sorted(self.request.getfixturevalue("clothes_folder").rglob("*.png"))

    def image_folder(self, root: Path, counts: dict[str, int], suffix: str = ".png") -> None:
        """``root/<label>/000<suffix>...``: ``counts[label]`` real images each, a different source label for each."""
        from PIL import Image

        images = self.clothes()
        per_label = len(images) // 3
        for n, (label, count) in enumerate(counts.items()):
            (root / label).mkdir(parents=True)
            for i in range(count):
                Image.open(images[(n % 3) * per_label + i % per_label]).save(root / label / f"{i:03d}{suffix}")

    @cached_property
    def unreadable(self) -> Path:
        """/tmp/unr/r2 of the README's data.on_unreadable examples: ``data/photos`` with train/ and test/ (labels ant,
        bee, cat as JPEGs; 153 files), three of train/'s unreadable (a text file named .png and an empty .jpg, which the
        header scan finds, and a JPEG cut in half, which the cache's build finds), ``photos.yaml`` (``on_unreadable:
        skip``, 16x16) and the run its training made (``self.photos_run``, the output ``self.photos_train``)."""
        from PIL import Image

        folder = self.factory.mktemp("unr")
        photos = folder / "data" / "photos"
        self.image_folder(photos / "train", {"ant": 40, "bee": 40, "cat": 40}, ".jpg")
        self.image_folder(photos / "test", {"ant": 10, "bee": 10, "cat": 10}, ".jpg")
        (photos / "train" / "ant" / "README.png").write_text("not an image\n")
        (photos / "train" / "cat" / "IMG_0007.jpg").write_bytes(b"")
        big = folder / "big.jpg"
        Image.open(self.clothes()[0]).convert("RGB").resize((280, 280)).save(big, quality=95)
        (photos / "train" / "bee" / "IMG_0042.jpg").write_bytes(big.read_bytes()[:big.stat().st_size // 2])
        big.unlink()
        config = (ROOT / "fcclass" / "configs" / "imagefolder.yaml").read_text()
        for old, new in {"name: my-images": "name: photos", "path: data/my_images": "path: data/photos\n  on_unreadable: skip",
                         "image_size: [64, 64]": "image_size: [16, 16]", "epochs: 20": "epochs: 3"}.items():
            assert old in config, old
            config = config.replace(old, new)
        (folder / "photos.yaml").write_text(config)
        self.photos_train = cli("fcclass train -c photos.yaml", folder, env={"FCCLASS_CACHE_DIR": "cache"})
        assert self.photos_train.code == 0, self.photos_train.output
        (self.photos_run,) = (folder / "runs").iterdir()
        return folder


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace(tmp_path_factory)


def process(command: str, cwd: Path, extra: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """A README command in its own process (what starts processes of its own, like --nproc-per-node, or must)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), "COLUMNS": "1000"}
    argv = shlex.split(command)
    return subprocess.run([sys.executable, "-m", "fcclass.cli", *argv[1:], *extra], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ----------------------------------------------------------------------------- the examples of "Train"


@block("text: Model / ┏━┳━┳━┓")
def _training_output(ex: readme.Example, ws: Workspace) -> None:
    out = ws.home and ws.train_human.stdout
    model_table = ex.output[:ex.output.index(next(line for line in ex.output if line.startswith("└"))) + 1]
    assert_shown(model_table, out, numbers=False)  # the default model's layers and parameter counts, exactly
    # Debian's files are unpacked once per data root (the tests' is unpacked already)
    assert_shown(ex.output[len(model_table):], out, skip=(r"^Unpacked Debian's",))


@block("text: epoch #/# batch #/# loss # acc #% #s")
def _progress_line_in_a_pipe(ex: readme.Example, ws: Workspace) -> None:
    assert_shown(ex.output, ws.home and ws.train_human.stdout)  # trained with --log-interval 0.001, not to a terminal


@example("fcclass train --set data.limit_train=3000 --set train.epochs=1")
def _short_run(ex: readme.Example, ws: Workspace) -> None:
    """The home runs are short runs of the default config too (300 images, 100 test images): the same header line,
    numbers aside, and the epoch, Best epoch and Test split lines."""
    assert_shown(ex.output, ws.home and ws.train_human.stdout)


@example("fcclass train --set data.limit_train=3000 --set train.epochs=1", kind="slow")
def _short_run_as_written(ex: readme.Example, ws: Workspace) -> None:
    res = cli(ex.command, ws.folder("short-run"))
    assert res.code == 0, res.output
    assert_shown(ex.output, res.stdout, numbers=False, skip=(r"^Device:", r"^epoch ", r"^Best epoch", r"^Next:", r"^Test split"))
    assert_shown(ex.output, res.stdout)
    accuracy = float(re.search(r"^Test split .*: accuracy ([\d.]+)%", res.stdout, re.M).group(1))
    assert accuracy >= 65, res.stdout  # what a quick try of the default config reaches (the README: 78.8-80.5 %)


@json_example("On 3,000 images × 1 epoch this reached")
def _short_run_batch_recorded(anchor: str, ws: Workspace) -> None:
    """`--json` and summary.json record the batch a short run trained with (the home runs: 300 images, batch 16)."""
    assert ws.home and json.loads(ws.train_json.stdout)["batch_size"] == 16
    assert json.loads((ws.lr01 / "summary.json").read_text())["batch_size"] == 16


class HeaderShown(Exception):
    """Raised once the training header is printed: the examples that show only the header train nothing."""


class StopAfterHeader(Callback):
    def on_fit_start(self, trainer: Any) -> None:
        raise HeaderShown


@block("text: ┏━┳━┳━┳━┳━┓ / ┃ Label ┃ Train ┃ Val ┃ Test (held out) ┃ Drawn / epoch ┃")
def _balanced_sampler_header(ex: readme.Example, ws: Workspace) -> None:
    """The header of a training with data.sampler: balanced on an image folder of three labels, one of them rare
    (20, 20 and 4 images, a test/ folder of 5 each), stopped once the header is printed."""
    folder = ws.factory.mktemp("sampler")
    ws.image_folder(folder / "images" / "train", {"Pullover": 20, "Shirt": 4, "T-shirt-top": 20})
    ws.image_folder(folder / "images" / "test", {"Pullover": 5, "Shirt": 5, "T-shirt-top": 5})
    with fit_with(StopAfterHeader()):
        res = cli("fcclass train -c imagefolder --set data.path=images --set data.image_size=8 --set data.sampler=balanced", folder)
    assert isinstance(res.exception, HeaderShown), res.output
    assert_shown(ex.output, res.stdout)
    drawn = re.findall(r"^│ (?:Pullover|Shirt|T-shirt-top) .* │ +≈(\d+) │$", res.stdout, re.M)
    assert drawn == ["13", "13", "13"], res.stdout  # 40 training images, each label drawn as often


@example("fcclass train -c configs/fashion_mnist.yaml --set train.epochs=3 --set optimizer.lr=0.01",
         "fcclass train -c configs/fashion_mnist.yaml --nproc-per-node 2")
def _config_of_a_shown_training(ex: readme.Example, ws: Workspace) -> None:
    """Run with --print-config from the repository (configs/ is its folder): the command's config is valid."""
    res = cli(ex.command, ROOT, extra=["--print-config"])
    assert res.code == 0, res.output
    config = yaml.safe_load(res.stdout)
    for key, value in re.findall(r"--set ([\w.]+)=(\S+)", ex.command):
        section, name = key.split(".")
        assert config[section][name] == yaml.safe_load(value)


@example("fcclass train --set train.epochs=3 --print-config")
def _print_config(ex: readme.Example, ws: Workspace) -> None:
    tmp_path = ws.factory.mktemp("print-config")
    res = cli(ex.command, tmp_path)
    assert res.code == 0 and yaml.safe_load(res.stdout)["train"]["epochs"] == 3, res.output
    assert not (tmp_path / "runs").exists()  # trains nothing


@example("fcclass eval runs/fashion-cnn-20261127-231530", kind="error")
def _eval_of_a_run_stopped_in_its_first_epoch(ex: readme.Example, ws: Workspace) -> None:
    check_error(ex, ws.stopped, {"fashion-cnn-20261127-231530": ws.stopped_run.name})


@block("text: Run: runs/<run> (the newest trained run in runs; passed over # newer run(s) with no completed epoch:")
def _newest_trained_run_passes_over_the_stopped_one(ex: readme.Example, ws: Workspace) -> None:
    res = cli("fcclass predict samples/test_0.png", ws.stopped)
    assert res.code == 0, res.output
    assert_shown(ex.output, res.output)


def _sig(ex: readme.Example, ws: Workspace) -> None:
    res = ws.sig[ex.line]
    first = ex.line == min(ws.sig)
    assert res.code == (130 if first else 0), res.output
    assert "Traceback" not in res.output
    assert_shown(ex.output, res.output, {"/tmp/sig": str(ws.sig_dir)})


example("fcclass train --set data.limit_train=4000 --set train.epochs=4 --set train.runs_dir=/tmp/sig",
        "fcclass train --resume /tmp/sig/fashion-cnn-20261127-232148",
        "fcclass train --resume /tmp/sig/fashion-cnn-20261127-232148 --set train.epochs=6", kind="slow")(_sig)  # 4 trainings

not_run(BLOCKS, "text: epoch #/# train loss # acc #% val loss # acc #% lr # #s / Error: Cannot write last.pt in '/tmp/small",
        "needs a small file system that fills up; tests/test_resume.py::test_a_full_or_read_only_disk_stops_cleanly_and_the_run_resumes "
             "fills one and checks this message and the resume")


# ----------------------------------------------------------------------------- DDP
for _command, _why in {
    "./setup.sh && .venv/bin/fcclass train": "creates .venv (minutes) and trains 9 full epochs; tests/test_packaging.py (slow) installs the "
                                             "wheel into a fresh environment and uses it from another folder",
    "torchrun --standalone --nproc-per-node 2 -m fcclass train -c configs/fashion_mnist.yaml":
        "the job that --nproc-per-node 2 starts (through torchrun's launcher), run by the slow example below and tests/test_distributed.py",
    "torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:29400 --rdzv-id fashion-1 -m fcclass train -c "
    "configs/fashion_mnist.yaml": "needs two machines with 4 GPUs; tests/test_distributed.py::test_two_torchrun_agents_meet_through_c10d_rendezvous "
                                  "(slow) runs two agents as two nodes on one machine",
    'srun torchrun --nnodes "$SLURM_NNODES" --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint "$head:29400" --rdzv-id "$SLURM_JOB_ID" '
    "-m fcclass train -c configs/fashion_mnist.yaml": "needs a SLURM cluster",
    'fcclass train -c fashion_mnist.yaml --set train.epochs=2 --set data.limit_train=2000 --set \'tracking.mlflow={uri: "http://127.0.0.1:5055", '
    "experiment: fashion}'": "needs an MLflow server on port 5055; tests/test_tracking.py trains against a real `mlflow server` and reads the run back",
}.items():
    not_run(EXAMPLES, _command, _why)

not_run(BLOCKS, "text: epoch #/# train loss # acc #% val loss # acc #% lr # #s / Error: rank # of #: lost contact with the ",
        "tests/test_distributed.py::test_a_killed_rank_takes_the_job_down_and_the_run_resumes (slow) kills a rank with SIGKILL and "
             "checks both messages")
not_run(BLOCKS, "text: <run> FINISHED # params / {'optimizer.lr': '#', 'model.layers.0.filters': '#', 'train.epochs': '#', ",
        "read back from an MLflow server; tests/test_tracking.py::test_a_run_and_its_resume_are_one_mlflow_run_on_a_real_server "
             "checks these params, tags, metrics and artifacts")


@example("fcclass train --nproc-per-node 2 --set train.epochs=3", kind="slow")
def _ddp(ex: readme.Example, ws: Workspace) -> None:
    out = process(ex.command, ws.home, [*SMALL, "--set", "name=ddp"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert_shown(ex.output, out.stdout)


# ----------------------------------------------------------------------------- runs, compare
@example("fcclass runs")
def _runs_table(ex: readme.Example, ws: Workspace) -> None:
    res = cli(ex.command, ws.stopped)  # a finished run and one stopped in its first epoch, as the README's last
    assert res.code == 0, res.output
    assert_shown(ex.output, res.output)


@example("fcclass runs compare cnn-20261128-011039 cnn-lr01-20261128-011132")
def _runs_compare(ex: readme.Example, ws: Workspace) -> None:
    res = cli(ex.command, ws.home, {"cnn-20261128-011039": ws.trained.name, "cnn-lr01-20261128-011132": ws.lr01.name})
    assert res.code == 0, res.output
    assert_shown(ex.output, res.output)
    assert (ws.home / "compare.png").stat().st_size > 0


# ----------------------------------------------------------------------------- sweeps, MLflow
def _sweep_folder(ws: Workspace) -> Path:
    folder = ws.folder("sweep")
    shutil.copy(ROOT / "configs" / "fashion_mnist.yaml", folder / "fashion_mnist.yaml")  # what `fcclass init` writes
    return folder


@example("fcclass sweep -c fashion_mnist.yaml --set data.limit_train=6000 --set train.epochs=4 --set train.test_at_end=false "
         "-p 'optimizer.lr=loguniform(3e-4,3e-2)' -p model.layers.-3.units=64,128,256 -n 8 --workers 2", kind="slow")
def _sweep(ex: readme.Example, ws: Workspace) -> None:
    folder = _sweep_folder(ws)
    out = process(ex.command, folder, ["--set", "data.limit_train=1000", "--set", "data.limit_test=200", "-n", "4"])
    assert out.returncode == 0, out.stderr[-3000:]
    # a trial is pruned or not by its numbers
    assert_shown(ex.output, out.stdout + out.stderr, {"/tmp/demo2": str(folder)}, skip=("pruned",))


def _diverging_sweep(ws: Workspace, ex: readme.Example) -> tuple[Path, subprocess.CompletedProcess]:
    if "diverging_sweep" not in ws.__dict__:
        folder = _sweep_folder(ws)
        out = process(ex.command, folder, ["--set", "data.limit_train=600", "--set", "data.limit_test=200", "--json", "report.json"])
        ws.__dict__["diverging_sweep"] = folder, out
    return ws.__dict__["diverging_sweep"]


@example("fcclass sweep --set data.val_split=0 --set data.limit_train=2000 --set train.epochs=2 --set train.test_at_end=false "
         "-p optimizer.lr=0.03,0.3,1.0e+20 --sampler grid -n 3", kind="slow")
def _sweep_without_validation(ex: readme.Example, ws: Workspace) -> None:
    folder, out = _diverging_sweep(ws, ex)
    assert out.returncode == 0, out.stderr[-3000:]
    # the Note column is wrapped at the README's width, and the progress line cuts the reason at a length
    assert_shown(ex.output, out.stdout + out.stderr, {"/tmp/demo3": str(folder)}, skip=(r"^│ +│", r"│ The training loss", "now\\.\\.\\."))
    (failed,) = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("trial 2  optimizer.lr=1e+20  fail  ")]
    assert "The training loss became nan in epoch 1, batch 2. The weights became non-finite" in failed
    report = json.loads((folder / "report.json").read_text())
    trial = next(t for t in report["trials"] if t["state"] == "fail")
    assert {"retry_of", "fail_reason", "error"} <= set(trial)  # as the bullets say `retry_of`, `fail_reason` (also `error`)
    assert trial["fail_reason"].startswith("The training loss became nan") and trial["error"] == trial["fail_reason"]


@example("fcclass train -c fashion_mnist.yaml --set train.epochs=2 --set data.limit_train=1000 --set tracking.mlflow.uri=http://127.0.0.1:9",
         kind="slow")
def _mlflow_server_down(ex: readme.Example, ws: Workspace) -> None:
    pytest.importorskip("mlflow")
    folder = _sweep_folder(ws)
    out = process(ex.command, folder, ["--set", "data.limit_test=200"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert_shown(ex.output, out.stdout + out.stderr)


# ----------------------------------------------------------------------------- eval, predict, export
@example("fcclass eval --misclassified 24")
def _eval(ex: readme.Example, ws: Workspace) -> None:
    res = cli(ex.command, ws.home)
    assert res.code == 0, res.output
    # which labels a small model confuses most is its own
    assert_shown(ex.output, res.output, skip=(r"│ +\d+ │ +[\d.]+% │$",))
    assert (ws.trained / "misclassified.png").exists()


@example("fcclass predict samples/", "fcclass predict --split test --top-k 2")
def _predict(ex: readme.Example, ws: Workspace) -> None:
    res = cli(ex.command, ws.home)
    assert res.code == (1 if "not_an_image" in "".join(ex.output) else 0), res.output
    assert_shown(ex.output, res.output, labels=True)  # the labels a small model predicts are its own


@block("json: [ / {")
def _predict_json_sample(ex: readme.Example, ws: Workspace) -> None:
    res = cli("fcclass predict samples/test_0.png --json -", ws.home)
    assert res.code == 0, res.output

    def shape(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items()}
        return [shape(v) for v in value] if isinstance(value, list) else type(value).__name__

    assert shape(json.loads(res.stdout)) == shape(json.loads("\n".join(ex.output)))


@example("fcclass export runs/fashion-cnn-20261127-234551")
def _export(ex: readme.Example, ws: Workspace) -> None:
    assert ws.exported.code == 0, ws.exported.output
    assert_shown(ex.output, ws.exported.output)


def _classify(ws: Workspace) -> subprocess.CompletedProcess:
    """The README's onnxruntime snippet saved as classify.py and run as its `$ python classify.py ...` line shows."""
    pytest.importorskip("onnxruntime")
    assert ws.exported.code == 0, ws.exported.output
    (snippet,) = [b for b in readme.shown_blocks() if b.lang == "python" and "onnxruntime.InferenceSession" in "\n".join(b.lines)]
    (script,) = [e for e in readme.examples() if e.command.startswith("python classify.py ")]
    (ws.home / "classify.py").write_text("\n".join(snippet.lines) + "\n")
    argv = shlex.split(re.sub(r"fashion-cnn-\d{8}-\d{6}", ws.trained.name, script.command))
    return subprocess.run([sys.executable, *argv[1:]], cwd=ws.home, capture_output=True, text=True, timeout=300)


@block("python: import json, sys / ")
@example("python classify.py runs/fashion-cnn-20261207-152029/model.onnx samples/test_0.png")
def _onnxruntime_snippet(ex: readme.Example, ws: Workspace) -> None:
    """The README's onnxruntime snippet, as a user would save and run it, prints the label fcclass predict gives and
    its probability, in the shape the README shows."""
    out = _classify(ws)
    assert out.returncode == 0, out.stderr
    label, probability = out.stdout.strip().rsplit(" ", 1)
    predicted = json.loads(cli("fcclass predict samples/test_0.png --json -", ws.home).stdout)[0]
    assert label == predicted["label"] and abs(float(probability) - predicted["probability"]) < 1e-3
    if ex.command.startswith("python classify.py"):
        (shown,) = ex.output
        assert re.fullmatch(r"(.+) \d\.\d{3}", shown) and shown.rsplit(" ", 1)[0] in readme.LABELS


@example("fcclass compress runs/fashion-cnn-20261128-053143 --prune 0.5 --structured --finetune 2 --quantize int8", kind="slow")
def _compress(ex: readme.Example, ws: Workspace) -> None:
    res = cli(ex.command, ws.home, {"fashion-cnn-20261128-053143": ws.trained.name}, extra=["--finetune", "1", "--rounds", "1"])
    assert res.code == 0, res.output
    assert_shown(ex.output, res.output)


# ----------------------------------------------------------------------------- serve
SERVE = "fcclass serve runs/fashion-cnn-20261207-180312"
CURL_OK = "curl -s -F files=@samples/test_0.png 'http://127.0.0.1:8000/v1/predict?top_k=2'"
CURL_BAD = "curl -s -F files=@samples/not_an_image.png http://127.0.0.1:8000/v1/predict"


@example(SERVE, kind="slow")
def _serve(ex: readme.Example, ws: Workspace) -> None:
    """The shown start-up lines, then Ctrl-C: the line saying it stopped, exit status 0."""
    from serve_support import ServeProcess

    home = ws.home  # trains the runs (ws.trained) the first time
    server = ServeProcess.start(f"runs/{ws.trained.name}", cwd=home)
    status, rest = server.stop(signal.SIGINT)
    out = "\n".join(server.lines) + "\n" + rest
    assert status == 0 and "Traceback" not in out, out
    assert_shown(ex.output, out.replace("--port 0", ""), {"runs/fashion-cnn-20261207-180312": f"runs/{ws.trained.name}"})


@example(CURL_OK, CURL_BAD, kind="slow")
def _curl(ex: readme.Example, ws: Workspace) -> None:
    """curl as shown, against a real server: the answer has the shown shape, predict's label and probability for the
    file, and the shown error for the non-image, word for word."""
    from serve_support import ServeProcess

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    home = ws.home  # trains the runs (ws.trained) the first time
    server = ServeProcess.start(f"runs/{ws.trained.name}", cwd=home)
    try:
        argv = shlex.split(ex.command.replace("http://127.0.0.1:8000", server.url))
        out = subprocess.run(argv, cwd=ws.home, capture_output=True, text=True, timeout=60)
    finally:
        server.stop()
    real, shown = json.loads(out.stdout), json.loads("\n".join(ex.output))
    if "error" in shown:
        assert real == shown
        return
    # the served run by name: other examples may have trained newer runs in the same folder by now
    predicted = json.loads(cli(f"fcclass predict samples/test_0.png --run runs/{ws.trained.name} --top-k 2 --json -", ws.home).stdout)[0]
    assert real["predictions"] == [predicted | {"path": "test_0.png"}]
    assert set(real) == set(shown) and set(real["predictions"][0]) == set(shown["predictions"][0])


JSON["`fcclass predict --json` gives for the same file"] = Check(NOT_RUN, "tests/test_serve_process.py compares a real server's "
                                                                          "answers with `fcclass predict --json` for 12 PNGs")


# ----------------------------------------------------------------------------- report
REPORT_RUN, REPORT_OTHER = "fashion-cnn-20261207-190923", "fashion-cnn-5k-20261207-192334"
SECTION_TITLES = ["Metrics", "Per-label table", "Confusion matrix", "Misclassified images", "Reliability", "Precision–recall",
                  "Training curves", "Config"]


@example(f"fcclass report runs/{REPORT_RUN}", f"fcclass report runs/{REPORT_RUN} --compare runs/{REPORT_OTHER} -o compare.html")
def _report(ex: readme.Example, ws: Workspace) -> None:
    """The shown line, and a page with every section (of a run) or both runs' (a comparison), as one file."""
    paths = {REPORT_RUN: ws.trained.name, REPORT_OTHER: ws.lr01.name}
    res = cli(ex.command, ws.home, paths)
    assert res.code == 0, res.output
    assert_shown(ex.output, res.output, paths)
    if "--compare" in ex.command:
        page = (ws.home / "compare.html").read_text(encoding="utf-8")
        assert ws.trained.name in page and ws.lr01.name in page and "<h2>Config differences</h2>" in page
    else:
        page = (ws.trained / "report.html").read_text(encoding="utf-8")
        assert re.findall(r"<h2>([^<]+)</h2>", page) == SECTION_TITLES


@json_example("so its numbers are the ones")
def _report_numbers(anchor: str, ws: Workspace) -> None:
    """The report's accuracy, macro F1, log loss and ECE are `fcclass eval --json`'s, formatted as eval shows them."""
    want = json_of("fcclass eval --json - --no-save", ws.home)
    res = cli("fcclass report -o numbers.html", ws.home)
    assert res.code == 0, res.output
    page = (ws.home / "numbers.html").read_text(encoding="utf-8")
    for key, text in (("accuracy", f"{want['accuracy']:.2%}"), ("macro_avg.f1", f"{want['macro_avg']['f1']:.2%}"),
                      ("log_loss", f"{want['log_loss']:.4f}"), ("expected_calibration_error", f"{want['expected_calibration_error']:.2%}")):
        assert f'data-key="{key}">{text}<' in page


# ----------------------------------------------------------------------------- summary, bench, init
@example("fcclass summary --set model.layers.0.filters=100000000")
def _summary_of_an_absurd_model(ex: readme.Example, ws: Workspace) -> None:
    res = cli(ex.command, ws.factory.mktemp("summary"))
    assert res.code == 0, res.output
    assert_shown(ex.output, res.output)  # the memory this machine has is its own


@example("fcclass bench --mode tta --model default --target 0.92 --target 0.93", kind="slow")
def _bench_tta(ex: readme.Example, ws: Workspace) -> None:
    res = cli(ex.command, ws.home, extra=["--set", "data.limit_train=1000", "--set", "train.epochs=1"])
    assert res.code == 0, res.output
    # a short run reaches neither target ("-"), and the Device cell is this machine's precision
    assert_shown(ex.output, res.output, skip=(r"^│ default",))


not_run(BLOCKS, "text: Training throughput (same model, same Fashion-MNIST images, one process) / ┏━┳━┳━┳━┳━┳━┳━┳━┳━┓",
        "trains three loops (Keras among them) for minutes; tests/test_bench.py::test_throughput_mode_compares_three_ways (slow) "
             "runs this mode and checks its columns")


@block("text: Warning: fcclass's loop (default model) varied by #% over its # repeats (# to # images/s, more than ")
def _bench_repeat_warning(ex: readme.Example, ws: Workspace) -> None:
    """The warning of fcclass.bench.runner for the README's repeats (173, 610 and one between), as `bench` prints it."""
    from fcclass.bench.runner import ThroughputResult

    result = ThroughputResult("default", {}, {}, 1.0, 1.0, repeat_rates={"fcclass": [173.0, 400.0, 610.0]})
    (warning,) = result.warnings
    assert_shown(ex.output, f"Warning: {warning['message']}", numbers=False)


@json_example("A busy machine makes these figures meaningless")
def _bench_json_warnings(anchor: str, ws: Workspace) -> None:
    """What `bench --json` holds of each result (fcclass.bench.runner.ThroughputResult.to_dict): `spread`,
    `repeat_images_per_s` and `warnings`; a quiet loop gives no warning."""
    from fcclass.bench.runner import ThroughputResult

    rates = {"fcclass": [173.0, 400.0, 610.0], "reference": [100.0, 101.0, 99.0]}
    data = ThroughputResult("default", {"images_per_s": 610.0}, {"images_per_s": 101.0}, 1.0, 1.0, repeat_rates=rates).to_dict()
    assert data["repeat_images_per_s"] == rates and set(data["spread"]) == set(rates)
    assert [w["measurement"] for w in data["warnings"]] == ["fcclass's loop (default model)"] and data["spread"]["fcclass"] > 0.2


@json_example("`--json` lists the same under `warnings`", kind="slow")
def _bench_json_run(anchor: str, ws: Workspace) -> None:
    """The README's command with --json -: top-level `warnings` (the matmul peak's and the loops'), and each result's
    `spread` and `repeat_images_per_s`."""
    data = json_of("fcclass bench --images 640 --model default --no-keras --repeats 3 --json -", ws.factory.mktemp("bench"))
    assert isinstance(data["warnings"], list)
    for result in data["results"]:
        assert set(result["repeat_images_per_s"]) == set(result["spread"]) == {"fcclass", "reference"}
        assert all(len(rates) == 3 for rates in result["repeat_images_per_s"].values())


@example("fcclass init")
def _init(ex: readme.Example, ws: Workspace) -> None:
    folder = ws.factory.mktemp("init")
    res = cli(ex.command, folder)
    assert res.code == 0, res.output
    assert_shown(ex.output, res.output, numbers=False)
    assert (folder / "fashion_mnist.yaml").exists()


# ----------------------------------------------------------------------------- configs and their mistakes
def _configs_dir() -> str:
    import fcclass

    return str(Path(fcclass.__file__).parent / "configs")


@example("fcclass train --set train.epohcs=3 --set model.layers.0.activation=relux --set data.batch_size=-1",
         "fcclass train --set optimizer.name=adam", kind="error")
def _config_mistakes(ex: readme.Example, ws: Workspace) -> None:
    check_error(ex, ws.factory.mktemp("mistakes"), {"/work/main/fcclass/configs": _configs_dir()})


@block("yaml: tracking: / mlflow: {uri: \"http://127.0.0.1:#\", experiment: fashion}")
def _tracking_section(ex: readme.Example, ws: Workspace) -> None:
    folder = ws.factory.mktemp("tracking")
    (folder / "c.yaml").write_text((ROOT / "configs" / "fashion_mnist.yaml").read_text() + "\n".join(ex.output) + "\n")
    res = cli("fcclass config -c c.yaml --json -", folder)
    assert res.code == 0, res.output
    assert json.loads(res.stdout)["tracking"]["mlflow"] == yaml.safe_load("\n".join(ex.output))["tracking"]["mlflow"]


@block("yaml: name: fashion-cnn # run directory prefix / seed: #")
def _config_reference(ex: readme.Example, ws: Workspace) -> None:
    """The annotated config lists every key of `data` and `train` that `fcclass config` has, and no other."""
    res = cli("fcclass config --json -", ws.factory.mktemp("config"))
    assert res.code == 0, res.output
    real, shown = json.loads(res.stdout), yaml.safe_load("\n".join(ex.output))
    assert set(shown) <= set(real)
    for section in ("data", "train"):
        assert set(shown[section]) == set(real[section]), section
    assert set(shown["scheduler"]) <= set(real["scheduler"]) and set(shown["optimizer"]) <= set(real["optimizer"])


# ----------------------------------------------------------------------------- pretrained backbones
BACKBONE_YAML = "yaml: name: fashion-resnet18 / model:"


def backbone_folder(ws: Workspace) -> Path:
    """A folder with the README's resnet18.yaml and, as its weights file, a torchvision resnet18's state_dict (random
    weights: what the examples show does not depend on their values, and the test machine has no internet)."""
    import torch
    import torchvision

    folder = ws.folder("backbone")
    (yaml_block,) = [b for b in readme.shown_blocks() if readme.block_key(b) == BACKBONE_YAML]
    (folder / "resnet18.yaml").write_text("\n".join(yaml_block.lines) + "\n")
    (folder / "weights").mkdir()
    torch.save(torchvision.models.resnet18().state_dict(), folder / "weights" / "resnet18-f37072fd.pth")
    return folder


@block(BACKBONE_YAML)
def _backbone_config(ex: readme.Example, ws: Workspace) -> None:
    res = cli("fcclass config -c resnet18.yaml --json -", backbone_folder(ws))
    assert res.code == 0, res.output
    layer = json.loads(res.stdout)["model"]["layers"][0]
    assert layer == {"type": "Backbone", "name": None, "trainable": False, "arch": "resnet18", "weights": "weights/resnet18-f37072fd.pth"}


@example("fcclass summary -c resnet18.yaml", "fcclass train -c resnet18.yaml")
def _backbone_commands(ex: readme.Example, ws: Workspace) -> None:
    res = cli(ex.command, backbone_folder(ws), extra=SMALL if " train " in f" {ex.command} " else [])
    assert res.code == 0, res.output
    assert_shown(ex.output, res.output, numbers=False)


# ----------------------------------------------------------------------------- your own images


@example("fcclass train -c imagefolder --set data.path=photos --set train.epochs=1",
         "fcclass train -c imagefolder --set data.path=photos --set train.epochs=1 --set seed=1")
def _decode_cache(ex: readme.Example, ws: Workspace) -> None:
    assert_shown(ex.output, ws.images and ws.photos_runs[ex.line].output)


IMAGES = {"/tmp/readme/data/my_images": "{folder}/photos", "/tmp/readme": "{folder}"}


def images_paths(ws: Workspace, **more: str) -> dict[str, str]:
    """The README's /tmp/readme paths -> the scratch folder's (`photos` stands for data/my_images)."""
    return {**{shown: real.format(folder=ws.images) for shown, real in IMAGES.items()}, **more}


@block("text: # image(s) in '/tmp/readme/data/my_images' are not in any split recorded for this run (added after t")
def _added_images_are_left_out(ex: readme.Example, ws: Workspace) -> None:
    folder = ws.images
    tshirts = folder / "photos" / "tshirt"
    for i, image in enumerate(sorted(tshirts.iterdir())[:20]):  # 20 images copied into tshirt/ after training
        shutil.copy(image, tshirts / f"added-{i}.png")
    try:
        res = cli(f"fcclass eval {ws.my_images_run} --no-save", folder)
    finally:
        for added in tshirts.glob("added-*"):
            added.unlink()
    assert res.code == 0, res.output
    assert_shown(ex.output, res.output, images_paths(ws))


@block("text: Error: The test split recorded for this run has changed under '/tmp/readme/data/my_images' since tra")
def _a_vanished_file_is_an_error(ex: readme.Example, ws: Workspace) -> None:
    folder = ws.images
    splits = json.loads((ws.my_images_run / "splits.json").read_text())
    test = next(path for path in splits["splits"]["test"]["files"] if path.startswith("sneaker/"))
    gone = folder / "photos" / test
    kept = gone.read_bytes()
    gone.unlink()
    try:
        res = cli(f"fcclass eval {ws.my_images_run}", folder)
    finally:
        gone.write_bytes(kept)
    assert res.code == 1 and res.stdout == "" and "Traceback" not in res.output, res.output
    assert_shown(ex.output, res.stderr, images_paths(ws, **{"sneaker/1108.png": test}))


RELOC = "my-images-20261207-150506"


@example("cd /tmp && fcclass eval /tmp/reloc/runs/my-images-20261207-150506", kind="error")
def _eval_after_the_folder_moved(ex: readme.Example, ws: Workspace) -> None:
    folder = ws.images
    elsewhere = ws.factory.mktemp("elsewhere")
    images = folder / "photos"
    images.rename(elsewhere / "photos")
    try:
        check_error(ex, folder, {"/tmp/reloc/data/my_images": str(images), "cd /tmp": f"cd {elsewhere}", "/tmp/reloc": str(folder),
                                 RELOC: ws.my_images_run.name})
    finally:
        (elsewhere / "photos").rename(images)


def _reloc(ws: Workspace) -> tuple[Path, dict[str, str]]:
    """/tmp/reloc of the relocate examples: a copy of the image-folder run (trained on ws.images's photos, which
    stand for /tmp/reloc/data/my_images), ``archive/my_images`` (a copy of photos) and ``other`` (the same, less one
    test file); and the README's paths -> the real ones."""
    if "reloc" not in ws.__dict__:
        folder, images = ws.factory.mktemp("reloc"), ws.images / "photos"
        shutil.copytree(ws.my_images_run, folder / "runs" / ws.my_images_run.name)
        shutil.copytree(images, folder / "archive" / "my_images")
        shutil.copytree(images, folder / "other")
        splits = json.loads((ws.my_images_run / "splits.json").read_text())
        gone = next(path for path in splits["splits"]["test"]["files"] if path.startswith("tshirt/"))
        (folder / "other" / gone).unlink()
        ws.__dict__["reloc"] = folder, {"/tmp/reloc/data/my_images": str(images), "/tmp/reloc": str(folder),
                                        RELOC: ws.my_images_run.name, "tshirt/113.png": gone}
    return ws.__dict__["reloc"]


@example("fcclass runs relocate runs/my-images-20261207-150506 --data-root archive/my_images")
def _relocate(ex: readme.Example, ws: Workspace) -> None:
    folder, paths = _reloc(ws)
    res = cli(ex.command, folder, paths)
    assert res.code == 0, res.output
    assert_shown(ex.output, res.output, paths)
    config = yaml.safe_load((folder / "runs" / ws.my_images_run.name / "config.yaml").read_text())
    assert config["data"]["path"] == str(folder / "archive" / "my_images")
    res = cli(f"fcclass eval runs/{ws.my_images_run.name} --no-save", folder)  # no --data-root needed any more
    assert res.code == 0, res.output


@example("fcclass runs relocate runs/my-images-20261207-150506 --data-root other", kind="error")
def _relocate_to_other_data(ex: readme.Example, ws: Workspace) -> None:
    folder, paths = _reloc(ws)
    run = folder / "runs" / ws.my_images_run.name
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    check_error(ex, folder, paths)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing was changed


@json_example("- `fcclass runs relocate RUN --data-root DIR` records the new place once")
def _relocate_json(anchor: str, ws: Workspace) -> None:
    """Relocated back to where it was trained, with --json - (the run is a copy: the image-folder run is left as is)."""
    folder, paths = _reloc(ws)
    run = folder / "runs" / ws.my_images_run.name
    if yaml.safe_load((run / "config.yaml").read_text())["data"]["path"] == paths["/tmp/reloc/data/my_images"]:
        _relocate(readme.Example(f"fcclass runs relocate runs/{RELOC} --data-root archive/my_images"), ws)
    change = json_of(f"fcclass runs relocate runs/{run.name} --data-root {paths['/tmp/reloc/data/my_images']} --json -", folder)
    assert {"key", "old", "new", "checked", "rewritten"} <= set(change), change
    assert (change["key"], change["new"]) == ("data.path", paths["/tmp/reloc/data/my_images"]), change


# ----------------------------------------------------------------------------- data.on_unreadable, predict FOLDER
UNREADABLE = {"/tmp/unr/r2": "{folder}"}


def unreadable_paths(ws: Workspace) -> dict[str, str]:
    return {shown: real.format(folder=ws.unreadable) for shown, real in UNREADABLE.items()}


@example("fcclass train -c photos.yaml --set data.on_unreadable=error", kind="error")
def _unreadable_is_an_error(ex: readme.Example, ws: Workspace) -> None:
    check_error(ex, ws.unreadable, unreadable_paths(ws))


@example("fcclass train -c photos.yaml")
def _unreadable_skipped(ex: readme.Example, ws: Workspace) -> None:
    assert_shown(ex.output, ws.unreadable and ws.photos_train.output, unreadable_paths(ws))
    skipped = json.loads((ws.photos_run / "summary.json").read_text())["skipped"]
    assert sorted(Path(s["path"]).name for s in skipped) == ["IMG_0007.jpg", "IMG_0042.jpg", "README.png"], skipped


@example("fcclass eval --no-save")
def _eval_says_what_was_skipped(ex: readme.Example, ws: Workspace) -> None:
    before = listing(ws.unreadable and ws.photos_run)
    res = cli(ex.command, ws.unreadable)
    assert res.code == 0, res.output
    assert_shown(ex.output, res.output, unreadable_paths(ws))
    assert listing(ws.photos_run) == before, "eval --no-save wrote into the run"


@example("fcclass predict data/photos/test -k 1")
def _predict_a_labelled_folder(ex: readme.Example, ws: Workspace) -> None:
    res = cli(ex.command, ws.unreadable)
    assert res.code == 0, res.output
    predicted = re.compile(r"│ (?:ant|bee|cat) \((\d+\.\d%)\) │$", re.M)  # which label a row gets is the small model's own
    assert_shown([predicted.sub(r"│ <label> (\1) │", line) for line in ex.output], predicted.sub(r"│ <label> (\1) │", res.output))
    rows = re.findall(r"^│ data/photos/test/(\w+)/\d{3}\.jpg +│ (\w+) +│", res.output, re.M)
    assert len(rows) == 30 and all(folder == true for folder, true in rows), res.output  # the true label is the folder's


@example("fcclass predict data/photos/test --json - --json-summary | tail -13")
def _predict_json_summary(ex: readme.Example, ws: Workspace) -> None:
    res = cli(ex.command.split(" | ")[0], ws.unreadable)
    assert res.code == 0, res.output
    assert_shown(ex.output, "\n".join(res.stdout.splitlines()[-13:]))
    data = json.loads(res.stdout)
    assert len(data["predictions"]) == data["summary"]["images"] == data["summary"]["labelled"] == 30


@json_example("`--json-summary` puts the summary into the JSON too")
def _json_summary_keys(anchor: str, ws: Workspace) -> None:
    data = json_of("fcclass predict samples/test_0.png --json - --json-summary", ws.home)
    assert set(data) == {"predictions", "summary"} and len(data["predictions"]) == 1
    shown = paragraph(anchor).split('"summary": {', 1)[1].split("}}`", 1)[0]  # "images", ..., "predicted": {"<label>": count}, ...
    assert set(data["summary"]) == set(re.findall(r'"(\w+)"', shown)), data["summary"]
    assert data["summary"]["accuracy"] is None and data["summary"]["labelled"] == 0  # no true labels


# ----------------------------------------------------------------------------- hostile input
@example("fcclass export runs/fashion-cnn-20261128-001122 -o pipe.onnx", "fcclass plot runs/fashion-cnn-20261128-001122 -o /dev/full",
         kind="error")
def _unwritable_outputs(ex: readme.Example, ws: Workspace) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    pipe = ws.home / "pipe.onnx"
    if not pipe.exists():
        os.mkfifo(pipe)
    check_error(ex, ws.home, {"fashion-cnn-20261128-001122": ws.trained.name})


@example("fcclass train --set data.image_size=4000", kind="error")
def _too_large_to_train(ex: readme.Example, ws: Workspace) -> None:
    check_error(ex, ws.factory.mktemp("large"), numbers=True)  # the memory this machine has is its own


@example("fcclass train --nproc-per-node 64", "fcclass train --nproc-per-node 64 --oversubscribe --set data.batch_size=64", kind="error")
def _too_many_processes(ex: readme.Example, ws: Workspace) -> None:
    from fcclass import memory
    from fcclass.training import distributed

    with pytest.MonkeyPatch.context() as mp:  # the README's machine: 2 cores, 22.7 GB available
        mp.setattr(memory, "cores", lambda: 2)
        mp.setattr(memory, "available", lambda device=None: (int(22.7e9), "available on this machine"))
        mp.setattr(distributed, "launch", lambda *a: pytest.fail("processes started"))
        check_error(ex, ws.factory.mktemp("nproc"))


@example("fcclass config -c laughs.yaml", kind="error")
def _billion_laughs(ex: readme.Example, ws: Workspace) -> None:
    folder = ws.factory.mktemp("laughs")
    (folder / "laughs.yaml").write_text(BOMB)
    check_error(ex, folder)


@example("fcclass runs --runs-dir damaged")
def _damaged_runs(ex: readme.Example, ws: Workspace) -> None:
    """Runs whose summary.json is a FIFO (its config.yaml an alias bomb) or holds NaN: listed as damaged, with why (the
    rows' dates are the folders')."""
    runs = ws.factory.mktemp("damaged-runs") / "damaged"
    fifo, nan = runs / "fashion-cnn-20261130-120000", runs / "fashion-mlp-20261129-093000"
    shutil.copytree(ws.trained, runs / "fashion-cnn-20261128-001122")
    for run in (fifo, nan):
        run.mkdir()
    os.mkfifo(fifo / "summary.json")
    (fifo / "config.yaml").write_text(BOMB)  # damaged too: the first reason is shown
    (nan / "summary.json").write_text('{"state": "finished", "wall_seconds": NaN}')
    res = cli(ex.command, runs.parent)
    assert res.code == 0, res.output
    damaged = [line for line in ex.output if line.startswith("Damaged ")]
    assert len(damaged) == 2 and all(line in res.output for line in damaged), res.output


@json_example("A run directory's files are read back guarded")
def _damaged_runs_json(anchor: str, ws: Workspace) -> None:
    """`runs --json -` is strict JSON (null, never NaN) and names why a run is damaged (tests/test_run_readers.py has more)."""
    runs = ws.factory.mktemp("damaged-json") / "runs"
    (runs / "nan").mkdir(parents=True)
    (runs / "nan" / "summary.json").write_text('{"state": "finished", "wall_seconds": NaN}')
    (row,) = json.loads(cli("fcclass runs --json -", runs.parent).stdout, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert row["state"] == "damaged" and "wall_seconds" in row["damaged"]


# ----------------------------------------------------------------------------- Python
@block("python: from fcclass import load_config, build_model, fit, evaluate, predict / ")
def _python_api(ex: readme.Example, ws: Workspace) -> None:
    """The snippet as written, in a folder of its own, on 500 training images (load_config gets the limits added)."""
    import fcclass

    folder = ws.folder("python")
    load_config = fcclass.load_config
    old = os.getcwd()
    os.chdir(folder)
    try:
        fcclass.load_config = lambda config, sets: load_config(config, [*sets, "data.limit_train=300", "data.limit_test=100"])
        namespace: dict[str, Any] = {}
        exec(compile("\n".join(ex.output), "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    finally:
        fcclass.load_config = load_config
        os.chdir(old)
    report = namespace["report"]
    assert 0 <= report.accuracy <= 1 and set(report.per_class["Shirt"]) >= {"accuracy", "precision", "f1", "support"}
    assert namespace["result"].run_dir.parent == folder / "runs"


@block("python: from fcclass import load_config, build_model, fit, evaluate, predict / ", kind="slow")
def _python_api_as_written(ex: readme.Example, ws: Workspace) -> None:
    """Exactly as written (2 epochs on all 54,000 images), in a fresh process."""
    folder = ws.folder("python-full")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", "\n".join(ex.output)], cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    accuracy, shirt = out.stdout.splitlines()[0].split(" ", 1)
    assert 0 <= float(accuracy) <= 1 and "'support': 1000" in shirt, out.stdout
    assert out.stdout.splitlines()[1] in readme.LABELS


# ----------------------------------------------------------------------------- the --json outputs the prose describes
@json_example('`--json -` prints only JSON on stdout: `{"run_dir"')
def _train_json(anchor: str, ws: Workspace) -> None:
    assert ws.home and ws.train_json.code == 0
    assert_shape(json.loads(ws.train_json.stdout), anchor)


@json_example("`fcclass runs [--runs-dir DIR]` lists the runs")
def _runs_json(anchor: str, ws: Workspace) -> None:
    runs = json_of("fcclass runs --json -", ws.stopped)
    assert sorted(r["state"] for r in runs) == ["finished", "interrupted"]


@json_example("`--json FILE` (or `--json -`: only JSON on stdout) writes")
def _eval_json(anchor: str, ws: Workspace) -> None:
    assert_shape(json_of("fcclass eval --json -", ws.home), anchor)


@json_example("`--json -` prints a list of")
def _predict_json(anchor: str, ws: Workspace) -> None:
    res = cli("fcclass predict samples/test_0.png samples/not_an_image.png --json -", ws.home)
    assert res.code == 1, res.output  # one file could not be read
    good, failed = json.loads(res.stdout)
    assert_shape(good, anchor)
    assert_shape(failed, "(a failed file gets ")


@json_example('`--json -` prints `{"rows"', kind="slow")
def _compress_json(anchor: str, ws: Workspace) -> None:
    assert_shape(json_of(f"fcclass compress runs/{ws.trained.name} --prune 0.5 --structured --quantize int8 --rounds 1 --json -", ws.home), anchor)


@json_example('`--json -` prints `{"input_shape"')
def _summary_json(anchor: str, ws: Workspace) -> None:
    assert_shape(json_of("fcclass summary --json -", ws.factory.mktemp("summary-json")), anchor)


@json_example("(`--json -` as JSON)")
def _config_json(anchor: str, ws: Workspace) -> None:
    folder = ws.factory.mktemp("config-json")
    res = cli("fcclass config", folder)
    assert res.code == 0, res.output
    assert json_of("fcclass config --json -", folder) == yaml.safe_load(res.stdout)  # the same config, as JSON


@json_example("`fcclass sweep -c CONFIG --param KEY=SPEC ...` searches", kind="slow")
@json_example("`retry_of` in `--json`", kind="slow")
@json_example("`fail_reason` in `--json`", kind="slow")
def _sweep_json(anchor: str, ws: Workspace) -> None:
    """The diverging sweep's slow example writes --json and checks `retry_of`, `fail_reason` and `error`."""
    (ex,) = [e for e in readme.examples() if "1.0e+20" in e.command]
    _sweep_without_validation(ex, ws)


JSON["`-o`, `--json` and `--csv` write atomically"] = Check(NOT_RUN, "how outputs are written: tests/test_hostile.py")
JSON["`tests/test_readme.py` keeps this README true"] = Check(NOT_RUN, "describes this module")


# ----------------------------------------------------------------------------- the tests
# ----------------------------------------------------------------------------- packed datasets on S3
SHOWN_ENDPOINT = "http://127.0.0.1:9555"
PACK = "fcclass data pack data/my_images --out s3://datasets/my_images"
SHARDS_TRAIN = "fcclass train -c imagefolder --set data.dataset=shards --set data.path=s3://datasets/my_images --set train.epochs="


class PackedPlace:
    """The README's packed-dataset scenario: ``data/my_images`` (3 labels of real Fashion-MNIST PNGs) packed into
    s3://datasets/my_images on a moto server of its own, then 30 images added and packed again; the outputs."""

    def __init__(self, ws: "Workspace") -> None:
        from s3_support import started

        self.folder = ws.factory.mktemp("packed")
        images = self.folder / "data" / "my_images"
        ws.image_folder(images, {"ankle_boot": 60, "sandal": 60, "sneaker": 60})
        self.server = started("datasets")
        import atexit

        atexit.register(self.server.stop)
        self.env = {**self.server.env, "FCCLASS_CACHE_DIR": str(self.folder / "cache")}
        self.first = self.run(PACK)
        self.versions = [self.version(self.first)]
        for label in ("ankle_boot", "sandal", "sneaker"):  # 30 new images: the others, flipped
            from PIL import Image

            for i, png in enumerate(sorted((images / label).glob("*.png"))[:10]):
                Image.open(png).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(images / label / f"new-{i:02d}.png")
        self.second = self.run(PACK)
        self.versions.append(self.version(self.second))

    def run(self, command: str, extra: list[str] | None = None) -> Ran:
        res = cli(command, self.folder, extra=extra, env=self.env)
        assert res.code == 0, res.output
        return res

    @staticmethod
    def version(res: Ran) -> str:
        return re.search(r"version (\w+)", res.output).group(1)  # type: ignore[union-attr]

    def paths(self) -> dict[str, str]:
        shown = ["33506d023c10bba2", "c4ae35ceb8a1916b"]
        return {SHOWN_ENDPOINT: self.server.endpoint, **dict(zip(shown, self.versions))}


def _packed(ws: "Workspace") -> PackedPlace:
    if not hasattr(ws, "packed_place"):
        ws.packed_place = PackedPlace(ws)
    return ws.packed_place


@example(PACK)
def _pack(ex: readme.Example, ws: "Workspace") -> None:
    place = _packed(ws)
    res = place.second if "(30 new)" in " ".join(ex.output) else place.first
    assert_shown(ex.output, res.output, place.paths())
    assert "(parent" in place.second.output and place.versions[0] in place.second.output


@example("fcclass data ls s3://datasets/my_images")
def _pack_ls(ex: readme.Example, ws: "Workspace") -> None:
    place = _packed(ws)
    res = place.run(ex.command)
    assert_shown(ex.output, res.output, place.paths())


@json_example("`fcclass data ls --json -` gives the same as")
def _pack_ls_json(anchor: str, ws: "Workspace") -> None:
    place = _packed(ws)
    data = json.loads(place.run("fcclass data ls s3://datasets/my_images --json -").stdout)
    assert_shape(data, anchor)
    assert [v["id"] for v in data["versions"]] == place.versions and data["versions"][1]["parent"] == place.versions[0]


@json_example("prints `version`, `images`, `shards`, `bytes_written`")
def _pack_json(anchor: str, ws: "Workspace") -> None:
    place = _packed(ws)
    data = json.loads(place.run(PACK + " --json -").stdout)  # nothing new: the same version, nothing written
    assert {"version", "images", "shards", "bytes_written", "bytes_total"} <= set(data)
    assert data["version"] == place.versions[1] and data["bytes_written"] == 0 and data["images"] == 210


@example("fcclass data verify s3://datasets/my_images", kind="error")
def _pack_unreachable(ex: readme.Example, ws: "Workspace") -> None:
    from s3_support import free_port

    place = _packed(ws)
    dead = f"http://127.0.0.1:{free_port()}"
    check_error(ex, place.folder, {SHOWN_ENDPOINT: dead}, env={**place.env, "AWS_ENDPOINT_URL": dead})


@example(SHARDS_TRAIN + "3", kind="slow")
def _train_from_shards(ex: readme.Example, ws: "Workspace") -> None:
    place = _packed(ws)
    res = place.run(ex.command + " --set data.version=" + place.versions[0], extra=IMAGE_SIZE)
    assert_shown(ex.output, res.stdout, place.paths(), skip=(r"^Decoded images", r"^Shards: fetched"))
    assert "Shards: fetched" in res.output and "Decoded images: cached" in res.output


@example(SHARDS_TRAIN + "1", kind="slow")
def _train_from_the_cache_offline(ex: readme.Example, ws: "Workspace") -> None:
    """With the server stopped: a new run trains on the newest version in the cache, the first one (the run before
    trained on it; the second was packed, never fetched)."""
    place = _packed(ws)
    place.run(SHARDS_TRAIN + "1 --set data.version=" + place.versions[0], extra=IMAGE_SIZE)
    place.server.stop()
    res = place.run(ex.command, extra=IMAGE_SIZE)
    assert_shown(ex.output, res.stdout, place.paths())
    assert f"Using version {place.versions[0]}" in " ".join(res.stdout.split())
    first = sorted((place.folder / "runs").iterdir())[0]
    assert place.run(f"fcclass eval {first} --no-save").code == 0  # a run of a cached version evaluates offline


def _checks(kinds: tuple[str, ...]) -> list[tuple[str, Any, Check]]:
    """(name, example or JSON anchor, check) for every README example with a check of one of these kinds."""
    found = []
    for ex in readme.examples():
        found += [(f"README.md:{ex.line}: {ex.command}", ex, c) for c in EXAMPLES.get(ex.command, []) if c.kind in kinds]
    for b in readme.shown_blocks():
        ex = readme.Example(readme.block_key(b), b.lines, b.line)
        found += [(f"README.md:{b.line}: block {ex.command}", ex, c) for c in BLOCKS.get(ex.command, []) if c.kind in kinds]
    found += [(f"README.md: --json paragraph {anchor}", anchor, c) for anchor, c in JSON.items() if c.kind in kinds]
    return found


@needs_fashion
def test_readme_examples(ws: Workspace, request: pytest.FixtureRequest) -> None:
    """Every fast check, in one test: the scratch runs are built once, in one pytest-xdist worker. Each failing
    example is reported (by its README line), not only the first."""
    ws.request = request
    failures, skipped = [], []
    for name, ex, check in _checks(("error", "run")):
        assert callable(check.how)
        try:
            check.how(ex, ws)
        except pytest.skip.Exception as e:
            skipped.append(f"{name}: {e}")
        except (Exception, TrainingStarted) as e:  # an AssertionError, or what the command raised
            failures.append(f"{name}\n{type(e).__name__}: {e}")
    assert not failures, f"{len(failures)} README example(s) do not hold:\n\n" + "\n\n".join(failures)
    if skipped:
        pytest.skip("; ".join(skipped))


@pytest.mark.slow
@needs_fashion
@pytest.mark.parametrize(("name", "ex", "check"), [pytest.param(*c, id=c[0][:90]) for c in _checks(("slow",))])
def test_readme_example_slow(name: str, ex: Any, check: Check, ws: Workspace, request: pytest.FixtureRequest) -> None:
    ws.request = request
    assert callable(check.how)
    check.how(ex, ws)


# ----------------------------------------------------------------------------- transfer learning
SHOES_YAML = "yaml: # The default model on your own #x# grayscale images, starting from another run's weights / name: sh"
SOURCE_RUN = "pretrain-20261207-175540"


def _shoes(ws: Workspace) -> Path:
    """The README's shoes example, small: ``data/shoes`` (train/ and test/ of three labels of real Fashion-MNIST PNGs),
    shoes.yaml as the README shows it, and runs/pretrain-20261207-175540: a copy of the home run (the default model
    on all ten labels), so its classifier is trained on other labels, as the README's is."""
    if not hasattr(ws, "shoes_dir"):
        folder = ws.factory.mktemp("shoes")
        ws.image_folder(folder / "data" / "shoes" / "train", {"Sandal": 30, "Shirt": 30, "Sneaker": 30})
        ws.image_folder(folder / "data" / "shoes" / "test", {"Sandal": 10, "Shirt": 10, "Sneaker": 10})
        (block,) = [b for b in readme.shown_blocks() if readme.block_key(b) == SHOES_YAML]
        (folder / "shoes.yaml").write_text("\n".join(block.lines) + "\n")
        shutil.copytree(ws.home / "runs" / ws.trained.name, folder / "runs" / SOURCE_RUN)
        ws.shoes_dir = folder
    return ws.shoes_dir


@block(SHOES_YAML)
def _shoes_config(ex: readme.Example, ws: Workspace) -> None:
    from fcclass.config.load import load_config

    cfg = load_config(_shoes(ws) / "shoes.yaml")
    assert cfg.model.init_from is not None and cfg.model.init_from.freeze and cfg.train.unfreeze.epoch == 2


@example(f"fcclass train -c shoes.yaml --init-from runs/{SOURCE_RUN}")
def _shoes_transfer(ex: readme.Example, ws: Workspace) -> None:
    """The weights table (every layer of the body loaded and frozen, a new classifier), the notes, the thaw at epoch 2,
    with numbers abstracted; then the loaded layers are the source's own at epoch 0 (last.pt before the first step is
    gone by then, so: frozen through epoch 1, which trains only the head)."""
    import torch

    folder = _shoes(ws)
    res = cli(ex.command, folder, extra=["--set", "train.epochs=10"])
    assert res.code == 0, res.output
    assert_shown(ex.output, res.stdout)
    (run,) = [p for p in (folder / "runs").iterdir() if p.name.startswith("shoes-")]
    record = json.loads((run / "summary.json").read_text())["init_from"]
    assert record["loaded"] == record["frozen"] == ["conv2d", "conv2d_1", "batch_normalization", "dense"]
    source = torch.load(folder / "runs" / SOURCE_RUN / "best.pt", weights_only=True)["model_state"]
    assert source["body.dense.0.weight"].shape == torch.load(run / "best.pt", weights_only=True)["model_state"]["body.dense.0.weight"].shape


@example("fcclass train -c shoes.yaml --init-from runs/pretrain", kind="error")
def _shoes_missing_source(ex: readme.Example, ws: Workspace) -> None:
    folder = _shoes(ws)
    check_error(ex, folder, {"/tmp/rtl": str(folder)})


HOW_TO_REGISTER = ("Add it to tests/test_readme.py: a check (@example for a `$` command or an fcclass line of a bash block, @block "
                   "for a block shown without a command, @json_example for a --json paragraph), or not_run(...) with the reason.")


def test_every_readme_example_is_registered() -> None:
    unknown = [f"README.md:{e.line}: {e.command}" for e in readme.examples() if e.command not in EXAMPLES]
    unknown += [f"README.md:{b.line}: block {readme.block_key(b)!r}" for b in readme.shown_blocks() if readme.block_key(b) not in BLOCKS]
    unknown += [f"README.md: --json in: {p[:100]}..." for p in readme.paragraphs() if "--json" in p and not any(a in p for a in JSON)]
    assert not unknown, "README examples that no test checks:\n" + "\n".join(unknown) + "\n" + HOW_TO_REGISTER


def test_every_registered_example_is_in_the_readme() -> None:
    text = " ".join(readme.paragraphs())
    stale = [c for c in EXAMPLES if c not in {e.command for e in readme.examples()}]
    stale += [k for k in BLOCKS if k not in {readme.block_key(b) for b in readme.shown_blocks()}]
    stale += [a for a in JSON if a not in text]
    assert not stale, "tests/test_readme.py checks examples the README no longer has (remove or update them):\n" + "\n".join(stale)


def test_error_examples_are_checked_as_errors() -> None:
    """A command shown with `Error:` under it is run as an error example (exit 1, nothing started), and only those."""
    for ex in readme.examples():
        shown_error = bool(ex.output) and ex.output[0].startswith("Error:")
        kinds = {c.kind for c in EXAMPLES.get(ex.command, [])}
        assert shown_error == ("error" in kinds), f"README.md:{ex.line}: {ex.command} (kinds {kinds}, shown error {shown_error})"


def test_the_readme_reader_finds_commands_outputs_and_shapes() -> None:
    text = "## A\n\n```\n$ fcclass eval x\nError: no\n  - a\n$ fcclass runs\nRuns\n```\n\n  ```bash\n  fcclass train \\\n    -c y  # c\n  ```\n"
    assert [(e.command, e.output) for e in readme.examples(text)] == [
        ("fcclass eval x", ["Error: no", "  - a"]), ("fcclass runs", ["Runs"]), ("fcclass train -c y", [])]
    shape = readme.parse_shape('{"a", "b": [{"c"}], "d": {"<label>": {"e"}}, ...}')
    assert readme.shape_errors({"a": 1, "b": [{"c": 1}], "d": {"x": {"e": 1}}, "z": 0}, shape) == []
    assert readme.shape_errors({"a": 1, "b": [{"c": 1, "f": 2}], "d": {}}, shape) == [".b[0]: the output has ['f'], which the README does not list"]
    assert readme.normalise("Run saved in runs/cnn-lr01-20261128-011132 at 0.7s, 93.02%") == "Run saved in runs/<run> at #s, #%"
