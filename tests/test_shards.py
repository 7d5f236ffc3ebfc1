"""Packed datasets on a folder: `fcclass data pack/ls/verify`, versions, incremental packs, training and evaluation
from the shard cache, the cache limit, and every bad input (tests/test_shards_s3.py: the same on an S3 server)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import DATA_ROOT, needs_fashion
from typer.testing import CliRunner

from fcclass.cli import app

runner = CliRunner(env={"COLUMNS": "300"})


def cli(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


def pack_json(src: Path | str, dest: Path | str, mb: str = "0.02") -> dict:
    out = cli("data", "pack", str(src), "--out", str(dest), "--shard-mb", mb, "--json", "-")
    return json.loads(out[out.index("{"):])


@pytest.fixture
def folder(clothes_folder: Path, tmp_path: Path) -> Path:
    """A copy of the clothes folder (3 labels x 60 real Fashion-MNIST PNGs) this test may change."""
    return Path(shutil.copytree(clothes_folder, tmp_path / "clothes"))


def shards_config(tmp_path: Path, dest: Path | str, epochs: int = 3, **data: object) -> Path:
    cfg = {"name": "packed", "seed": 0,
           "data": {"dataset": "shards", "path": str(dest), "image_size": [20, 20], "channels": 1, "batch_size": 32,
                    "num_workers": 0, "cache_dir": str(tmp_path / "cache"), **data},
           "model": {"layers": [{"type": "Conv2D", "filters": 8, "kernel_size": 3, "activation": "relu"}, {"type": "MaxPooling2D"},
                                {"type": "Flatten"}, {"type": "Dense", "activation": "softmax"}]},
           "optimizer": {"lr": 0.01}, "train": {"epochs": epochs, "runs_dir": str(tmp_path / "runs"), "precision": "fp32"}}
    path = tmp_path / f"shards-{len(list(tmp_path.glob('shards-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def newest_run(tmp_path: Path) -> Path:
    return sorted((tmp_path / "runs").iterdir())[-1]


def files_of(dest: Path) -> dict[str, int]:
    return {p.relative_to(dest).as_posix(): p.stat().st_size for p in dest.rglob("*") if p.is_file()}


def test_pack_is_incremental_and_versions_are_kept(folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "packed"
    first = pack_json(folder, dest)
    assert first["images"] == 180 and first["shards"] > 3 and first["bytes_written"] > first["bytes_total"] > 0
    again = pack_json(folder, dest)  # the same images: nothing written, the same version
    assert again["version"] == first["version"] and again["bytes_written"] == 0 and again["existed"]
    from PIL import Image

    for i, png in enumerate(sorted((folder / "tshirt").glob("*.png"))[:4]):  # 2% more images, new content
        Image.open(png).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(folder / "tshirt" / f"flipped-{i}.png")
    (sorted((folder / "sneaker").glob("*.png"))[0]).unlink()  # and one removed
    second = pack_json(folder, dest)
    assert second["version"] != first["version"] and second["parent"] == first["version"]
    assert second["images"] == 183 and second["new_images"] == 4
    assert 0 < second["bytes_written"] < 0.2 * second["bytes_total"]
    listed = json.loads(cli("data", "ls", str(dest), "--json", "-"))
    assert [v["id"] for v in listed["versions"]] == [first["version"], second["version"]]
    assert listed["versions"][1]["labels"]["train"] == {"sneaker": 59, "trouser": 60, "tshirt": 64}
    assert "match their hashes" in cli("data", "verify", str(dest), "--version", first["version"])
    table = cli("data", "ls", str(dest))
    assert first["version"] in table and "183" in table


def test_train_eval_and_resume_from_the_cache(folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "packed"
    version = pack_json(folder, dest)["version"]
    out = cli("train", "-c", str(shards_config(tmp_path, dest, epochs=3)))
    assert f"version {version}" in out and "Shards: fetched" in out
    run = newest_run(tmp_path)
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["version"] == version
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data_version"] == version and summary["best"]["val_accuracy"] > 0.6  # 3 labels: chance is 0.33
    rows = json.loads(cli("runs", "--runs-dir", str(tmp_path / "runs"), "--json", "-"))
    assert rows[0]["data_version"] == version
    from PIL import Image  # a newer version packed later does not change what the run reads

    Image.new("L", (28, 28), 255).save(folder / "trouser" / "white.png")
    assert pack_json(folder, dest)["version"] != version
    shutil.rmtree(dest)  # the store is gone: eval and resume read the version from the cache
    out = cli("eval", str(run), "--json", "-")
    ev = json.loads(out[out.index("{"):])
    assert sum(c["support"] for c in ev["per_class"].values()) == 18 and ev["accuracy"] > 0.5
    cli("train", "--resume", str(run), "--set", "train.epochs=4")
    assert json.loads((run / "summary.json").read_text())["epochs"]["done"] == 4
    out = cli("train", "-c", str(shards_config(tmp_path, dest, epochs=1)))  # a new run: the newest cached version
    assert "is not there" in out and f"Using version {version}" in out


def test_training_settings_change_without_a_repack(folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "packed"
    pack_json(folder, dest)
    before = files_of(dest)
    cli("train", "-c", str(shards_config(tmp_path, dest, epochs=1, image_size=[16, 16], augment={"rotation": 15})))
    cli("train", "-c", str(shards_config(tmp_path, dest, epochs=1, image_size=[24, 24], channels=3)))
    assert files_of(dest) == before
    run = newest_run(tmp_path)
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["input_shape"] in (None, [3, 24, 24])


def test_the_cache_stays_under_its_limit_and_keeps_shards_in_use(folder: Path, tmp_path: Path) -> None:
    from fcclass.config.sections import DataConfig
    from fcclass.data.shards import cache as shard_cache
    from fcclass.data.shards.source import shards_source

    a, b = tmp_path / "a", tmp_path / "b"
    sub = tmp_path / "two"
    for name in ("tshirt", "trouser"):
        shutil.copytree(folder / name, sub / name)
    pack_json(folder, a)
    pack_json(sub, b)
    cfg_a = DataConfig(dataset="shards", path=str(a), cache_dir=str(tmp_path / "cache"), cache_max_gb=1.0)
    cfg_b = cfg_a.model_copy(update={"path": str(b)})
    try:
        shards_source(cfg_a)
        shard_cache.release_all()  # the version of a is no longer in use
        size_a = shard_cache.cache_bytes(tmp_path / "cache")
        limit = size_a * 1.2 / 1e9  # room for a, not for a and b
        got = shards_source(cfg_b.model_copy(update={"cache_max_gb": limit}))
        assert shard_cache.cache_bytes(tmp_path / "cache") <= limit * 1e9
        assert all(f.exists() for files in [got["pools"]["train"][1]] for f in files)
        # over the limit with everything in use: nothing is evicted, and it is said
        note = shard_cache.make_room(tmp_path / "cache", 1000)
        assert note is not None and "in use" in note and all(f.exists() for f in got["pools"]["train"][1])
    finally:
        shard_cache.release_all()


def test_bad_places_and_versions(folder: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "not an fcclass packed dataset" in cli("data", "pack", str(folder), "--out", str(other), code=1)
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1
    assert "holds no packed dataset" in cli("data", "ls", str(tmp_path / "nothing"), code=1)
    assert "--shard-mb must be more than 0" in cli("data", "pack", str(folder), "--out", str(tmp_path / "x"), "--shard-mb", "0", code=1)
    assert "neither a folder nor a built-in dataset" in cli("data", "pack", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), code=1)
    dest = tmp_path / "packed"
    version = pack_json(folder, dest)["version"]
    out = cli("train", "-c", str(shards_config(tmp_path, dest, version="abcdef12")), code=1)
    assert "is not one of its versions" in out
    assert version in out


def _damage(dest: Path, how: str) -> str:
    shard = sorted((dest / "shards").iterdir())[1]
    data = shard.read_bytes()
    if how == "missing":
        shard.unlink()
    elif how == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    else:
        shard.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])
    return shard.name


@pytest.mark.parametrize("how", ["missing", "truncated", "corrupt"])
def test_bad_shards_are_named(folder: Path, tmp_path: Path, how: str) -> None:
    dest = tmp_path / "packed"
    pack_json(folder, dest)
    name = _damage(dest, how)
    out = cli("data", "verify", str(dest), code=1)
    assert name in out and {"missing": "missing", "truncated": "truncated", "corrupt": "do not match"}[how] in out
    out = cli("train", "-c", str(shards_config(tmp_path, dest, epochs=1)), code=1)
    assert name in out
    assert not list((tmp_path / "runs").glob("*")) if (tmp_path / "runs").exists() else True
    if how == "missing":  # packing again writes the missing shard's images into a new shard of a new version
        again = pack_json(folder, dest)
        assert 0 < again["bytes_written"] < again["bytes_total"]
        assert "match their hashes" in cli("data", "verify", str(dest))


@pytest.mark.parametrize("content", [b"[" * 200_000 + b"]" * 200_000, b'{"format": "something else"}', b"\x00garbage",
                                     b"\x1f\x8b\x08\x00garbage", "damaged", "bomb"])
def test_bad_manifests_are_refused(folder: Path, tmp_path: Path, content: bytes | str, monkeypatch: pytest.MonkeyPatch) -> None:
    from fcclass.data.shards import manifest as manifest_mod

    monkeypatch.setattr(manifest_mod, "MAX_MANIFEST", 100_000)  # a gzip bomb: decompression stops past the limit
    dest = tmp_path / "packed"
    version = pack_json(folder, dest)["version"]
    manifest = dest / "versions" / f"{version}.json.gz"
    if content == "damaged":
        raw = json.loads(gzip.decompress(manifest.read_bytes()))
        raw["images"][0][1] = (raw["images"][0][1] + 1) % 3  # a label changed after writing
        manifest.write_bytes(gzip.compress(json.dumps(raw).encode()))
    elif content == "bomb":
        manifest.write_bytes(gzip.compress(b" " * 200_000))
    else:
        manifest.write_bytes(content)  # type: ignore[arg-type]
    out = cli("data", "ls", str(dest), code=1)
    assert "damaged or not from fcclass" in out


def test_a_huge_manifest_is_refused_before_reading(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "packed"
    pack_json(folder, dest)
    from fcclass.data.shards import versions

    monkeypatch.setattr(versions, "MAX_MANIFEST", 1000)
    out = cli("data", "ls", str(dest), code=1)
    assert "over the 1,000" in out


def test_an_interrupted_pack_leaves_no_version_and_resumes(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fcclass.data.shards import store as store_mod

    dest = tmp_path / "packed"
    real = store_mod.FolderStore.write
    calls = {"n": 0}

    def failing(self: object, key: str, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 4:  # the marker, two shards, then the disk is full
            raise store_mod.DataError("Cannot write: No space left on device.")
        real(self, key, data)  # type: ignore[arg-type]

    monkeypatch.setattr(store_mod.FolderStore, "write", failing)
    assert "No space left" in cli("data", "pack", str(folder), "--out", str(dest), "--shard-mb", "0.02", code=1)
    monkeypatch.setattr(store_mod.FolderStore, "write", real)
    assert "No version yet" in cli("data", "ls", str(dest))
    written_before = sum(files_of(dest).values())
    done = pack_json(folder, dest)
    assert done["bytes_written"] < done["bytes_total"] and written_before > 0  # the two shards written are kept
    assert "match their hashes" in cli("data", "verify", str(dest))


@pytest.mark.slow  # two or three CLI runs: kept out of the default run's 5 minutes
def test_two_runs_share_one_cache(folder: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    dest = tmp_path / "packed"
    pack_json(folder, dest)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    procs = [subprocess.Popen([sys.executable, "-m", "fcclass", "train", "-c", str(shards_config(tmp_path, dest, epochs=1))],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(list((tmp_path / "runs").iterdir())) == 2


@pytest.mark.slow
def test_two_processes_train_from_shards_like_one(folder: Path, tmp_path: Path) -> None:
    """`--nproc-per-node 2` from a packed dataset with a cold cache: rank 0 fetches, the other waits and reads the same
    files; every step of every epoch has a part for each rank (no hang at an epoch's end), and the run matches a
    one-process run of the same version (each image read once per epoch across the ranks)."""
    import subprocess
    import sys

    import torch

    dest = tmp_path / "packed"
    version = pack_json(folder, dest)["version"]
    config = shards_config(tmp_path, dest, epochs=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "fcclass", "train", "-c", str(config), "--nproc-per-node", "2", "--set",
                          "train.device=cpu"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    two = newest_run(tmp_path)
    assert json.loads((two / "summary.json").read_text())["distributed"]["processes"] == 2
    cli("train", "-c", str(config), "--set", f"train.runs_dir={tmp_path / 'single'}")
    one = sorted((tmp_path / "single").iterdir())[-1]
    for run in (one, two):
        assert yaml.safe_load((run / "config.yaml").read_text())["data"]["version"] == version
    rows = [[line.split(",") for line in (run / "metrics.csv").read_text().splitlines()] for run in (one, two)]
    head = rows[0][0]
    for col in ("train_loss", "val_loss"):
        k = head.index(col)
        a = torch.tensor([float(r[k]) for r in rows[0][1:]])
        b = torch.tensor([float(r[k]) for r in rows[1][1:]])
        assert torch.allclose(a, b, atol=2e-3), (col, a, b)


@pytest.mark.slow
@needs_fashion
def test_a_pack_killed_mid_way_leaves_earlier_versions_whole(folder: Path, tmp_path: Path) -> None:
    """kill -9 while Fashion-MNIST (70,000 images) is being packed beside an earlier version: no half version is
    visible, the earlier one verifies and trains, and packing again writes only the shards that were not written."""
    import signal
    import subprocess
    import sys
    import time

    dest = tmp_path / "packed"
    earlier = pack_json(folder, dest)["version"]
    proc = subprocess.Popen([sys.executable, "-m", "fcclass", "data", "pack", "fashion_mnist", "--out", str(dest), "--shard-mb", "4",
                             "--data-root", str(DATA_ROOT)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = dest / "shards"
    earlier_shards = set(shards.iterdir())
    before = len(earlier_shards)
    deadline = time.monotonic() + 240
    while len(list(shards.iterdir())) < before + 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    listed = json.loads(cli("data", "ls", str(dest), "--json", "-"))
    assert [v["id"] for v in listed["versions"]] == [earlier]
    assert "match their hashes" in cli("data", "verify", str(dest))
    kept = {p: (p.stat().st_ino, p.stat().st_size) for p in set(shards.iterdir()) - earlier_shards if not p.name.startswith(".")}
    assert kept  # the whole shards the killed pack wrote (its temp file, if any, is named with a dot)
    out = cli("data", "pack", "fashion_mnist", "--out", str(dest), "--shard-mb", "4", "--data-root", str(DATA_ROOT), "--json", "-")
    done = json.loads(out[out.index("{"):])
    manifest = (dest / "versions" / f"{done['version']}.json.gz").stat().st_size
    assert done["images"] == 70000
    assert done["bytes_written"] == done["bytes_total"] - sum(size for _, size in kept.values()) + manifest  # only the rest
    assert all(p.stat().st_ino == ino for p, (ino, _) in kept.items())  # not written again
    assert [v["id"] for v in json.loads(cli("data", "ls", str(dest), "--json", "-"))["versions"]] == [earlier, done["version"]]


def test_a_packed_dataset_that_moved(folder: Path, tmp_path: Path) -> None:
    """The folder moved (a new share, a new bucket): `--data-root` points one command at it, `runs relocate` records
    it after checking it holds the run's version; a place without that version is refused, nothing written."""
    dest = tmp_path / "packed"
    version = pack_json(folder, dest)["version"]
    cli("train", "-c", str(shards_config(tmp_path, dest, epochs=1)))
    run = newest_run(tmp_path)
    moved = tmp_path / "moved"
    dest.rename(moved)
    shutil.rmtree(tmp_path / "cache")  # nothing cached: the shards must come from the new place
    assert "holds no packed dataset" in cli("eval", str(run), "--no-save", code=1)  # the recorded place is gone
    out = cli("eval", str(run), "--no-save", "--data-root", str(moved))
    assert "Shards: fetched" in out
    before = (run / "config.yaml").read_text()
    assert "holds no packed dataset" in cli("runs", "relocate", str(run), "--data-root", str(folder), code=1)
    assert (run / "config.yaml").read_text() == before
    out = cli("runs", "relocate", str(run), "--data-root", str(moved), "--json", "-")
    assert json.loads(out[out.index("{"):])["new"] == str(moved)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["path"] == str(moved) and cfg["data"]["version"] == version
    assert json.loads((run / "summary.json").read_text())["data"] == str(moved)
    cli("eval", str(run), "--no-save")


@pytest.mark.slow  # two or three CLI runs: kept out of the default run's 5 minutes
def test_resume_of_a_shard_run_continues_exactly(folder: Path, tmp_path: Path) -> None:
    """Two epochs, then --resume to three, give the numbers of three epochs in one go (same version, same splits)."""
    dest = tmp_path / "packed"
    pack_json(folder, dest)
    cli("train", "-c", str(shards_config(tmp_path, dest, epochs=3)), "--set", f"train.runs_dir={tmp_path / 'straight'}")
    cli("train", "-c", str(shards_config(tmp_path, dest, epochs=2)), "--set", f"train.runs_dir={tmp_path / 'resumed'}")
    resumed = sorted((tmp_path / "resumed").iterdir())[-1]
    cli("train", "--resume", str(resumed), "--set", "train.epochs=3")
    straight = sorted((tmp_path / "straight").iterdir())[-1]

    def rows(run: Path) -> list[list[str]]:
        lines = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
        drop = {lines[0].index(c) for c in lines[0] if c in ("seconds", "wall_seconds")}
        return [[v for k, v in enumerate(r) if k not in drop] for r in lines]

    assert rows(resumed) == rows(straight)


def test_unreadable_files_are_named_before_packing(folder: Path, tmp_path: Path) -> None:
    (folder / "sneaker" / "notes.png").write_text("not an image")
    (folder / "tshirt" / "empty.jpg").write_bytes(b"")
    out = cli("data", "pack", str(folder), "--out", str(tmp_path / "packed"), code=1)
    assert "notes.png" in out and "empty.jpg" in out and "--skip-unreadable" in out
    assert not (tmp_path / "packed").exists()  # nothing written
    out = cli("data", "pack", str(folder), "--out", str(tmp_path / "packed"), "--skip-unreadable", "--shard-mb", "0.02")
    assert "Left out 2 file(s)" in out and "180 images" in out
    assert "inside the folder being packed" in cli("data", "pack", str(folder), "--out", str(folder / "packed"), code=1)
    assert "names no bucket" in cli("data", "ls", "s3:///prefix", code=1)


def test_predict_names_packed_images_as_the_source_did(folder: Path, tmp_path: Path) -> None:
    dest = tmp_path / "packed"
    pack_json(folder, dest)
    cli("train", "-c", str(shards_config(tmp_path, dest, epochs=1)))
    out = cli("predict", "--run", str(newest_run(tmp_path)), "--split", "test")
    assert "sneaker/" in out and "blobs/" not in out
