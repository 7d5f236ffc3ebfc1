"""Image folders decoded once: the memory-mapped decode cache (fcclass/data/cache.py), its reuse, its rebuilds and
its fallbacks to streaming the files."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import SignalAt, folder_config
from PIL import Image
from typer.testing import CliRunner

from fcclass.cli import app
from fcclass.config.load import load_config
from fcclass.config.sections import DataConfig
from fcclass.data import load_dataset, make_loader

runner = CliRunner(env={"COLUMNS": "300"})
ROOT = Path(__file__).resolve().parent.parent


def make_folder(root: Path, per_class: int = 20, labels: tuple[str, ...] = ("ant", "bee", "cat")) -> Path:
    """Random RGB PNGs of 12x10 pixels (tiny, fast), a sub-folder per label."""
    rng = np.random.default_rng(0)
    for k, label in enumerate(labels):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 160, (12, 10, 3), dtype=np.uint8) + 40 * k  # labels differ in brightness: learnable
            Image.fromarray(pixels).save(root / label / f"{i:03d}.png")
    return root


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FCCLASS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files the cache decodes, in the order asked."""
    import fcclass.data.cache as cache

    seen: list[Path] = []
    real = cache.load_resized

    def counting(path: Any, channels: int, size: Any) -> torch.Tensor:
        seen.append(Path(path))
        return real(path, channels, size)

    monkeypatch.setattr(cache, "load_resized", counting)
    return seen


def data_config(folder: Path, **kw: Any) -> DataConfig:
    return DataConfig(dataset="imagefolder", path=str(folder), image_size=[8, 8], channels=1, **kw)


def pixels(split: Any) -> torch.Tensor:
    return torch.cat([x for x, _ in make_loader(split, 16, False, 0, 1, (8, 8), num_workers=0)])


def metrics(run_dir: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader((run_dir / "metrics.csv").open())]


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.u8"))


PIXELS_END = 4096 + 60 * 8 * 8  # header and pixels of make_folder's 60 images at data_config's 1x8x8


def trailer(cache: Path) -> dict[str, Any]:
    """The JSON line after the pixels of a cache of make_folder's images: unreadable rows, file hashes, checksums."""
    return json.loads(cache.read_bytes()[PIXELS_END:])


# ----------------------------------------------------------------------------- build, reuse, rebuild
def test_the_first_run_builds_the_cache_and_later_runs_reuse_it_without_decoding(tmp_path: Path, cache_dir: Path, decodes: list[Path]) -> None:
    folder = make_folder(tmp_path / "imgs")
    first = load_dataset(data_config(folder), seed=0, splits=("train", "val"))
    assert len(decodes) == 60  # the whole pool, once: train, val and the held-out test split
    (entry,) = cache_files(cache_dir)
    assert any(n.startswith(f"Decoded images: cached in {entry} (60 images") for n in first.notes), first.notes
    decodes.clear()
    other_seed = load_dataset(data_config(folder), seed=1, splits=("train", "val"))  # another draw of the same pool
    assert decodes == [] and any(n.startswith(f"Decoded images: reused {entry}") for n in other_seed.notes)
    assert other_seed.train.rows is not None and other_seed.train.images.shape == (60, 1, 8, 8)
    streamed = load_dataset(data_config(folder, cache="off"), seed=1, splits=("train", "val"))
    assert streamed.train.images is None and not any("Decoded images" in n for n in streamed.notes)
    for name in ("train", "val"):  # the very pixels and labels streaming decodes, in the same order
        assert torch.equal(pixels(other_seed.splits[name]), pixels(streamed.splits[name]))
        assert torch.equal(other_seed.splits[name].labels, streamed.splits[name].labels)


@pytest.mark.parametrize("change", ["modified", "added", "removed"])
def test_a_changed_folder_rebuilds_the_cache_and_removes_the_old_one(change: str, tmp_path: Path, cache_dir: Path, decodes: list[Path]) -> None:
    folder = make_folder(tmp_path / "imgs")
    load_dataset(data_config(folder), 0, splits=("train", "val"))
    (old,) = cache_files(cache_dir)
    victim = folder / "bee" / "003.png"
    if change == "modified":
        Image.fromarray(np.full((12, 10, 3), 255, dtype=np.uint8)).save(victim)
        os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    elif change == "added":
        Image.fromarray(np.zeros((12, 10, 3), dtype=np.uint8)).save(folder / "bee" / "new.png")
    else:
        victim.unlink()
    decodes.clear()
    ds = load_dataset(data_config(folder), 0, splits=("train", "val"))
    assert len(decodes) == {"modified": 60, "added": 61, "removed": 59}[change]
    (new,) = cache_files(cache_dir)  # the stale one is gone
    assert new != old and any("replaces this folder's older cache" in n for n in ds.notes), ds.notes
    if change == "modified":
        row = sorted(folder.rglob("*.png")).index(victim)
        assert ds.train.images[row].min() == 255  # the pixels as the file is now


def test_a_truncated_or_foreign_cache_file_is_rebuilt_never_read(tmp_path: Path, cache_dir: Path, decodes: list[Path]) -> None:
    folder = make_folder(tmp_path / "imgs")
    good = pixels(load_dataset(data_config(folder), 0, splits=("train",)).train)
    (entry,) = cache_files(cache_dir)
    for spoil, why in ((lambda b: b[:5000], "truncated or damaged"), (lambda b: b"x" * len(b), "not an fcclass image cache")):
        entry.write_bytes(spoil(entry.read_bytes()))
        decodes.clear()
        ds = load_dataset(data_config(folder), 0, splits=("train",))
        assert len(decodes) == 60 and any(why in n and "is replaced" in n for n in ds.notes), ds.notes
        assert torch.equal(pixels(ds.train), good)
    assert [p.name for p in cache_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_what_a_killed_build_left_behind_is_removed(tmp_path: Path, cache_dir: Path) -> None:
    folder = make_folder(tmp_path / "imgs")
    load_dataset(data_config(folder), 0, splits=("train",))
    (entry,) = cache_files(cache_dir)
    entry.unlink()
    left = cache_dir / f".{entry.name}.k1ll3d.tmp"  # as files.atomic_write_chunks names its temp file
    left.write_bytes(b"\0" * 5000)
    load_dataset(data_config(folder), 0, splits=("train",))
    assert entry.exists() and not left.exists()


def test_the_cli_says_what_it_cached_and_reused(tmp_path: Path, cache_dir: Path) -> None:
    cfg = folder_config(tmp_path, make_folder(tmp_path / "imgs"), epochs=1)
    first = runner.invoke(app, ["train", "-c", str(cfg), "--no-test"])
    assert first.exit_code == 0, first.output
    (entry,) = cache_files(cache_dir)
    assert f"Decoded images: cached in {entry} (60 images, 28.1 KB, built in" in " ".join(first.output.split())
    second = runner.invoke(app, ["train", "-c", str(cfg), "--no-test", "--set", "seed=1"])
    assert f"Decoded images: reused {entry} (60 images, 28.1 KB)." in " ".join(second.output.split())


# ----------------------------------------------------------------------------- falling back to streaming
def test_a_cache_over_the_size_limit_streams_with_a_note_saying_how_to_raise_it(tmp_path: Path, cache_dir: Path) -> None:
    folder = make_folder(tmp_path / "imgs")
    ds = load_dataset(data_config(folder, cache_max_gb=1e-6), 0, splits=("train", "val"))
    assert ds.train.images is None and ds.train.files and not cache_dir.exists()
    (note,) = [n for n in ds.notes if "Decoded images" in n]
    assert "not cached" in note and "over data.cache_max_gb (1e-06)" in note and "--set data.cache_max_gb=0.1" in note


def test_an_unwritable_cache_folder_streams_with_a_note(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "imgs")
    (tmp_path / "a_file").write_text("")
    ds = load_dataset(data_config(folder, cache_dir=str(tmp_path / "a_file" / "cache")), 0, splits=("train", "val"))
    assert ds.train.images is None
    (note,) = [n for n in ds.notes if "Decoded images" in n]
    assert f"the cache folder '{tmp_path / 'a_file' / 'cache'}' cannot be written (a part of the path is a file, not a folder)" in note


def test_a_disk_that_fills_up_during_the_build_streams_and_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcclass.data.cache as cache

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        monkeypatch.setattr(cache, "DISK_RESERVE", 0)
        folder = make_folder(tmp_path / "imgs")

        class FillDisk:  # another program takes every free byte just as the build starts
            def start(self, total: int, what: str) -> None:
                with open(mnt / "filler", "wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * 65536)
                            f.flush()
                    except OSError:
                        pass

            def advance(self, done: int) -> None: ...

            def end(self) -> None: ...

        ds = load_dataset(data_config(folder, cache_dir=str(mnt)), 0, splits=("train", "val"), progress=FillDisk())
        assert ds.train.images is None
        assert any("cannot be written (no space left on the device)" in n for n in ds.notes), ds.notes
        assert sorted(p.name for p in mnt.iterdir() if not p.name.endswith(".lock")) == ["filler"]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_run_reading_a_small_part_of_the_folder_streams_rather_than_build(tmp_path: Path, cache_dir: Path, decodes: list[Path]) -> None:
    folder = make_folder(tmp_path / "imgs")
    ds = load_dataset(data_config(folder, limit_train=10), 0, splits=("train", "val"))
    assert ds.train.images is None and decodes == [] and not cache_files(cache_dir)
    assert any("this run reads 10 of the 60 images" in n for n in ds.notes), ds.notes
    load_dataset(data_config(folder), 0, splits=("train", "val"))  # a full run builds it...
    decodes.clear()
    ds = load_dataset(data_config(folder, limit_train=10), 0, splits=("train", "val"))
    assert ds.train.rows is not None and decodes == []  # ...which a small one then reuses


def test_bad_pixel_data_in_the_splits_is_the_error_streaming_gives(tmp_path: Path, cache_dir: Path, decodes: list[Path]) -> None:
    """The cache keeps the rows of files it cannot decode as zeros and lists them in its trailer: a run that reads one
    stops with every such file named (the next one too, without decoding again), or with skip leaves them out."""
    from fcclass.errors import DataError

    folder = make_folder(tmp_path / "imgs")
    for name in ("ant/001.png", "cat/007.png"):
        path = folder / name
        path.write_bytes(path.read_bytes()[:60])  # the header survives: only decoding finds it
    for _ in range(2):
        with pytest.raises(DataError) as e:
            load_dataset(data_config(folder, val_split=0.0, test_split=0.05), 0, splits=("train", "val"))
        text = str(e.value)
        assert text.startswith("Cannot read 2 image(s): ") and "ant/001.png" in text and "cat/007.png" in text
        assert text.endswith("Remove or replace these files and run again.")
    (cache,) = cache_files(cache_dir)
    why = "cannot decode image (image file is truncated); the file is corrupt or truncated."
    assert trailer(cache)["unreadable"] == [[1, why], [47, why]]
    assert len(decodes) == 60  # the second run read the cache's list: nothing decoded again
    ds = load_dataset(data_config(folder, val_split=0.0, test_split=0.05, on_unreadable="skip"), 0, splits=("train", "val"))
    assert len(decodes) == 60 and sorted(p.name for p, _ in ds.skipped) == ["001.png", "007.png"]
    kept = {f.relative_to(folder).as_posix() for f in ds.train.files}
    assert "ant/001.png" not in kept and "cat/007.png" not in kept and len(kept) == 60 - 3 - 2  # 3 test images
    assert not (pixels(ds.train).flatten(1) == 0).all(1).any()  # no zero row (an unreadable file's) is served
    record = ds.record()
    assert sorted(s["file"] for s in record.skipped) == ["ant/001.png", "cat/007.png"]
    assert not {"ant/001.png", "cat/007.png"} & {f for rec in record.splits.values() for f in rec["files"]}


def test_a_cache_whose_list_of_unreadable_files_is_damaged_is_rebuilt(tmp_path: Path, cache_dir: Path, decodes: list[Path]) -> None:
    folder = make_folder(tmp_path / "imgs")
    load_dataset(data_config(folder), 0, splits=("train", "val"))
    (cache,) = cache_files(cache_dir)
    good = cache.read_bytes()
    meta = trailer(cache)
    assert meta["unreadable"] == [] and len(meta["blake2b"]) == 60 and len(meta["crc32"]) == 1
    pixels_end = PIXELS_END
    bad_rows = json.dumps({**meta, "unreadable": [[9999999, "x"]]}).encode() + b"\n"
    short_hashes = json.dumps({**meta, "blake2b": meta["blake2b"][:-1]}).encode() + b"\n"
    for damaged in (good[:pixels_end], good[:-1], good[:pixels_end] + bad_rows, good[:pixels_end] + short_hashes):
        cache.write_bytes(damaged)
        decodes.clear()
        ds = load_dataset(data_config(folder), 0, splits=("train", "val"))
        assert len(decodes) == 60 and cache.read_bytes() == good, ds.notes
        assert any("replaced" in n for n in ds.notes), ds.notes


def same_size_other_pixels(path: Path) -> None:
    """Rewrite an image of make_folder in place with other pixels at the very same byte size, its mtime restored
    (``touch -r``): nothing but the content tells it changed."""
    before = path.stat()
    size = before.st_size
    for seed in range(1, 500):
        other = np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)
        Image.fromarray(other).save(path)
        if path.stat().st_size == size:
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
            return
    pytest.fail("no same-size PNG found")


def test_a_file_changed_in_place_with_its_size_and_time_restored_rebuilds_the_cache(tmp_path: Path, cache_dir: Path,
                                                                                    decodes: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import fcclass.data.splits as splits
    from fcclass.data import dataset_from_record

    folder = make_folder(tmp_path / "imgs")
    every = ("train", "val", "test")
    trained = load_dataset(data_config(folder), 0, splits=every)
    record = trained.record()
    victim = folder / "bee" / "003.png"
    same_size_other_pixels(victim)
    row = sorted(folder.rglob("*.png")).index(victim)
    hashed: list[Path] = []
    real = splits.file_digest
    monkeypatch.setattr(splits, "file_digest", lambda path: hashed.append(path) or real(path))
    decodes.clear()
    ds = load_dataset(data_config(folder), 0, splits=every)
    assert len(decodes) == 60, ds.notes  # rebuilt, never the old pixels
    assert any("1 of its images' files changed since it was built, though their size and time did not" in n and "is replaced" in n
               for n in ds.notes), ds.notes
    streamed = load_dataset(data_config(folder, cache="off"), 0, splits=every)
    for name in every:
        assert torch.equal(pixels(ds.splits[name]), pixels(streamed.splits[name]))
    assert not torch.equal(ds.train.images[row], trained.train.images[row])  # the old cache's pixels of that file
    hashed.clear()
    facts = ds.record().splits
    assert len(hashed) == 0  # splits.json reuses the hashes the cache's check computed: the folder is hashed once a run
    assert splits.file_digest(victim) in {d for rec in facts.values() for d in rec["blake2b"]}
    same_size_other_pixels(folder / record.splits["test"]["files"][0])  # after training: eval reads what the files hold now
    evaluated = dataset_from_record(data_config(folder), record, ("test",))  # 3 test images: too few to rebuild for
    assert torch.equal(pixels(evaluated.test), pixels(dataset_from_record(data_config(folder, cache="off"), record, ("test",)).test))
    assert any("(the cache there is unusable: 1 of its images' files changed" in n for n in evaluated.notes), evaluated.notes


def test_damaged_pixels_in_a_cache_are_never_served(tmp_path: Path, cache_dir: Path, decodes: list[Path]) -> None:
    folder = make_folder(tmp_path / "imgs")
    good = pixels(load_dataset(data_config(folder), 0, splits=("train",)).train)
    (cache,) = cache_files(cache_dir)
    with open(cache, "r+b") as f:  # header, size and trailer intact; a few pixel bytes flipped (a bad disk, a stray write)
        f.seek(4096 + 100)
        f.write(b"\xff\x00\xff")
    decodes.clear()
    ds = load_dataset(data_config(folder), 0, splits=("train",))
    assert len(decodes) == 60 and torch.equal(pixels(ds.train), good)
    assert any("1 of its 1 blocks of pixels fail their checksum: damaged" in n and "is replaced" in n for n in ds.notes), ds.notes


def test_a_fifo_where_the_cache_file_goes_is_replaced_never_read(tmp_path: Path, cache_dir: Path, decodes: list[Path]) -> None:
    folder = make_folder(tmp_path / "imgs")
    good = pixels(load_dataset(data_config(folder), 0, splits=("train",)).train)
    (cache,) = cache_files(cache_dir)
    cache.unlink()
    os.mkfifo(cache)
    decodes.clear()
    ds = load_dataset(data_config(folder), 0, splits=("train",))  # opened without blocking, then renamed over
    assert len(decodes) == 60 and torch.equal(pixels(ds.train), good) and cache.is_file()
    assert any("(not a regular file of this user) and is replaced" in n for n in ds.notes), ds.notes


def test_a_folder_where_the_cache_file_goes_streams_with_a_note(tmp_path: Path, cache_dir: Path) -> None:
    folder = make_folder(tmp_path / "imgs")
    good = pixels(load_dataset(data_config(folder), 0, splits=("train",)).train)
    (cache,) = cache_files(cache_dir)
    cache.unlink()
    (cache / "inside").mkdir(parents=True)
    ds = load_dataset(data_config(folder), 0, splits=("train",))
    assert ds.train.images is None and torch.equal(pixels(ds.train), good)
    assert any(n.startswith(f"Decoded images: not cached, since '{cache}' is a folder where the cache file of the 60 images") and
               "Remove that folder" in n for n in ds.notes), ds.notes


@pytest.mark.parametrize("planted", ["fifo", "folder", "link"])
def test_what_is_not_a_regular_file_at_the_lock_path_streams_with_a_note_and_never_blocks(planted: str, tmp_path: Path, cache_dir: Path) -> None:
    folder = make_folder(tmp_path / "imgs")
    good = pixels(load_dataset(data_config(folder), 0, splits=("train",)).train)
    (cache,) = cache_files(cache_dir)
    (lock,) = cache_dir.glob(".*.lock")
    cache.unlink()
    lock.unlink()
    {"fifo": os.mkfifo, "folder": os.mkdir, "link": lambda p: os.symlink(tmp_path / "elsewhere", p)}[planted](lock)

    def hung(*_: Any) -> None:
        raise TimeoutError("blocked on the FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        ds = load_dataset(data_config(folder), 0, splits=("train",))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert ds.train.images is None and torch.equal(pixels(ds.train), good)
    assert any(n.startswith(f"Decoded images: not cached, since the cache's lock file '{lock}' is not a regular file") for n in ds.notes), ds.notes


# ----------------------------------------------------------------------------- two processes
BUILDER = """
import os, sys, time
from pathlib import Path
import fcclass.data.cache as cache
from fcclass.config import DataConfig
from fcclass.data import load_dataset

real = cache.load_resized
here, peer = Path(sys.argv[2] + "." + sys.argv[3]), Path(sys.argv[2] + "." + str(1 - int(sys.argv[3])))
waited = []


def peer_waits_on_the_lock():  # /proc/locks lists a blocked flock request as '->' with the waiting pid
    pid = peer.read_text() if peer.exists() else ""
    return pid and any("->" in line and f" {pid} " in line for line in Path("/proc/locks").read_text().splitlines())


def building(*args):  # whoever builds holds its first decode until the other process waits on the cache's lock
    if not waited:
        deadline = time.monotonic() + 60
        while not peer_waits_on_the_lock() and time.monotonic() < deadline:
            time.sleep(0.005)
        waited.append(True)
    return real(*args)


cache.load_resized = building
here.write_text(str(os.getpid()))
ds = load_dataset(DataConfig(dataset="imagefolder", path=sys.argv[1], image_size=[8, 8], channels=1), 0, splits=("train",))
print(int(ds.train.images.long().sum()), [n for n in ds.notes if "Decoded images" in n][0])
"""


def test_two_processes_building_one_cache_build_it_once(tmp_path: Path, cache_dir: Path) -> None:
    folder = make_folder(tmp_path / "imgs")
    arrived = tmp_path / "arrived"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(folder), str(arrived), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    sums, notes = zip(*(out.strip().split(" ", 1) for out, _ in outs))
    assert sums[0] == sums[1]
    assert sorted(n.split(" ")[2] for n in notes) == ["cached", "reused"], notes
    assert any("built by another process while this one waited" in n for n in notes), notes
    assert len(cache_files(cache_dir)) == 1 and not list(cache_dir.glob(".*.tmp"))


# ----------------------------------------------------------------------------- training, eval, resume
def test_cached_training_matches_streaming_and_eval_and_resume_reuse_the_cache(tmp_path: Path, cache_dir: Path, decodes: list[Path]) -> None:
    from fcclass.training.fit import fit

    folder = make_folder(tmp_path / "imgs")
    cfg = folder_config(tmp_path, folder, epochs=2, workers=0)
    streamed = fit(load_config(cfg, ["data.cache=off", f"train.runs_dir={tmp_path / 'off'}"]))
    assert decodes == [] and not cache_dir.exists()
    cached = fit(load_config(cfg, [f"train.runs_dir={tmp_path / 'on'}"]))
    assert len(decodes) == 60
    assert metrics(cached.run_dir) == metrics(streamed.run_dir)  # same seed: the same batches, pixels and numbers
    assert cached.test == streamed.test
    decodes.clear()
    stopped = fit(load_config(cfg, [f"train.runs_dir={tmp_path / 'resumed'}"]), callbacks=[SignalAt(2, 1, signal.SIGTERM)])
    assert stopped.interrupted == "SIGTERM"
    fit(resume=stopped.run_dir, overrides=["data.cache_max_gb=4"])  # the cache's keys may change on resume
    assert decodes == [] and metrics(stopped.run_dir) == metrics(streamed.run_dir)
    res = runner.invoke(app, ["eval", str(cached.run_dir), "--json", "-", "--no-save"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert any(n.startswith("Decoded images: reused") for n in report["notes"]) and decodes == []
    assert report["accuracy"] == cached.test["accuracy"]


def test_a_cache_in_a_relative_folder_resolves_like_the_other_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fcclass.runs.resume import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.dataset=imagefolder", "data.path=imgs", "data.cache_dir=cache"])
    assert with_absolute_paths(cfg).data.cache_dir == str(tmp_path / "cache")
    res = runner.invoke(app, ["config", "--set", "data.cache=sometimes"])
    assert res.exit_code == 1 and "data.cache" in res.output


def test_the_cache_folder_defaults_follow_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fcclass.data import cache_folder

    monkeypatch.setenv("FCCLASS_CACHE_DIR", str(tmp_path / "env"))
    assert cache_folder(str(tmp_path / "cfg")) == tmp_path / "cfg" and cache_folder(None) == tmp_path / "env"
    monkeypatch.delenv("FCCLASS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder(None) == tmp_path / "xdg" / "fcclass"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_folder(None) == tmp_path / "home" / ".cache" / "fcclass"


def test_a_subset_of_a_cached_split_reads_the_same_rows() -> None:
    from fcclass.data import Split

    pool = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    split = Split(torch.arange(4), pool, rows=torch.tensor([7, 2, 9, 4]))
    sub = split.subset(torch.tensor([3, 0]))
    assert sub.images is pool and sub.take(slice(None)).flatten().tolist() == [4, 7]
    assert torch.cat([x for x, _ in make_loader(split, 3, False, 0, 1, (1, 1))]).flatten().tolist() == [7, 2, 9, 4]
