"""Packed datasets on a real S3-compatible server: moto's standalone server, run as a subprocess, driven through the
CLI (`fcclass data pack | ls | verify`, `fcclass train`, `fcclass eval`) the way a user would."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

ROOT = Path(__file__).resolve().parent.parent
LABELS = ("cat", "dog", "fox")


from s3_support import BUCKET, Moto, free_port, started  # noqa: E402


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[Moto]:
    server = started()
    yield server
    server.stop()


@pytest.fixture
def own_moto() -> Iterator[Moto]:
    """A server of this test alone (it is stopped mid-test)."""
    server = started()
    yield server
    server.stop()


def make_images(folder: Path, per_label: int = 20, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label in LABELS:
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_label):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / label / f"{seed}-{i}.png")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("images"))


def cli(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`fcclass ARGS` in a subprocess, as a user runs it; a hang fails the test (timeout) rather than blocking it."""
    full = {**os.environ, **env, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "fcclass", *args], cwd=tmp_path, env=full, capture_output=True, text=True,
                          timeout=120)


def failed(res: subprocess.CompletedProcess[str], *words: str) -> str:
    """Asserts a clean failure: non-zero exit, no traceback, a message with ``words``; returns the message."""
    text = " ".join((res.stdout + res.stderr).split())
    assert res.returncode != 0, text
    assert "Traceback" not in res.stderr, res.stderr
    for word in words:
        assert word in text, (word, text)
    return text


def pack(tmp_path: Path, env: dict[str, str], source: Path, dest: str) -> dict[str, Any]:
    res = cli(tmp_path, env, "data", "pack", str(source), "--out", dest, "--shard-mb", "0.01", "--json", "-")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # stdout is the JSON document alone


def shard_keys(server: Moto, prefix: str) -> list[str]:
    listed = server.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/")
    return sorted(o["Key"] for o in listed.get("Contents", []) if o["Key"].endswith(".tar"))


def train_config(tmp_path: Path, dest: str, cache: Path, epochs: int = 1) -> Path:
    cfg = tmp_path / "shards.yaml"
    cfg.write_text(
        f"name: s3\ndata: {{dataset: shards, path: '{dest}', cache_dir: '{cache}', image_size: [16, 16], channels: 1, "
        "batch_size: 16, num_workers: 0}\n"
        "model:\n  layers:\n    - {type: Flatten}\n    - {type: Dense, activation: softmax}\n"
        f"optimizer: {{lr: 0.01}}\ntrain: {{epochs: {epochs}, runs_dir: '{tmp_path / 'runs'}'}}\n")
    return cfg


@pytest.fixture(scope="module")
def packed(moto_s3: Moto, images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """``images`` packed once into s3://BUCKET/grow: (place, pack's JSON)."""
    dest = f"s3://{BUCKET}/grow"
    return dest, pack(tmp_path_factory.mktemp("pack"), moto_s3.env, images, dest)


def test_pack_into_s3_writes_several_shards_and_an_unchanged_repack_writes_nothing(
        moto_s3: Moto, images: Path, packed: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    dest, first = packed
    assert first["images"] == 60 and first["shards"] >= 3 and first["parent"] is None
    assert first["bytes_written"] >= first["bytes_total"] > 0
    assert len(shard_keys(moto_s3, "grow")) >= first["shards"]
    again = pack(tmp_path, moto_s3.env, images, dest)
    assert again["version"] == first["version"] and again["bytes_written"] == 0 and again["existed"] is True


@pytest.mark.slow  # tests/test_shards.py checks the same on a folder in the default run
def test_adding_images_writes_a_new_version_listed_and_verified(
        moto_s3: Moto, images: Path, packed: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    dest, first = packed
    grown = tmp_path / "grown"
    shutil.copytree(images, grown)
    for seed, label in enumerate(LABELS[:2], 7):  # two new (different) images
        make_images(tmp_path / "new" / label, per_label=1, seed=seed)
        shutil.move(str(tmp_path / "new" / label / LABELS[0] / f"{seed}-0.png"), grown / label / "new.png")
    second = pack(tmp_path, moto_s3.env, grown, dest)
    assert second["images"] == 62 and second["new_images"] == 2
    assert second["version"] != first["version"] and second["parent"] == first["version"]
    assert 0 < second["bytes_written"] < second["bytes_total"] / 4  # only the new images' shard(s)

    ls = cli(tmp_path, moto_s3.env, "data", "ls", dest, "--json", "-")
    assert ls.returncode == 0, ls.stderr
    listed = json.loads(ls.stdout)["versions"]
    assert [v["id"] for v in listed][-2:] == [first["version"], second["version"]]
    assert listed[1]["parent"] == first["version"] and listed[1]["images"] == 62

    ok = cli(tmp_path, moto_s3.env, "data", "verify", dest)
    assert ok.returncode == 0, ok.stderr
    assert second["version"] in ok.stdout and "match their hashes" in ok.stdout


@pytest.mark.slow  # tests/test_shards.py checks the same on a folder in the default run
def test_a_damaged_or_missing_shard_is_named_by_verify_and_by_training(moto_s3: Moto, images: Path, tmp_path: Path) -> None:
    dest = f"s3://{BUCKET}/damaged"
    pack(tmp_path, moto_s3.env, images, dest)
    keys = shard_keys(moto_s3, "damaged")
    garbage, gone = keys[0], keys[-1]
    s3 = moto_s3.client()
    s3.put_object(Bucket=BUCKET, Key=garbage, Body=b"not a shard at all")
    s3.delete_object(Bucket=BUCKET, Key=gone)

    res = cli(tmp_path, moto_s3.env, "data", "verify", dest)
    assert res.returncode == 1
    text = failed(res, garbage.rsplit("/", 1)[-1], gone.rsplit("/", 1)[-1], "missing", "2 of the")

    assert "truncated or changed" in text
    cfg = train_config(tmp_path, dest, tmp_path / "fresh-cache")
    train = cli(tmp_path, moto_s3.env, "train", "-c", str(cfg))
    text = failed(train)
    assert any(k.rsplit("/", 1)[-1] in text for k in (garbage, gone)), text
    assert "pack the source images again" in text.lower()


def test_an_endpoint_that_refuses_connections(tmp_path: Path) -> None:
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    failed(cli(tmp_path, env, "data", "ls", f"s3://{BUCKET}/x"), "could not be reached", "Could not connect",
           env["AWS_ENDPOINT_URL"])


@pytest.mark.slow  # ~35 s: two tries of a 15 s read timeout
def test_an_endpoint_that_accepts_and_never_answers(tmp_path: Path) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.5)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # accepted, never read from nor answered
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.getsockname()[1]}"}
    try:
        failed(cli(tmp_path, env, "data", "ls", f"s3://{BUCKET}/x"), "did not answer", "timeout")
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


@pytest.mark.slow  # a CLI process each: kept out of the default run's 5 minutes (CI runs them)
def test_wrong_credentials_are_named(tmp_path: Path) -> None:
    # moto checks keys only with its IAM auth on (INITIAL_NO_AUTH_ACTION_COUNT=0): then "testing" is no known key
    server = started(INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        env = {**server.env, "AWS_SECRET_ACCESS_KEY": "wrong"}
        failed(cli(tmp_path, env, "data", "ls", f"s3://{BUCKET}/x"), "refused the credentials", "AWS_SECRET_ACCESS_KEY")
    finally:
        server.stop()


@pytest.mark.slow  # a CLI process each: kept out of the default run's 5 minutes (CI runs them)
def test_a_bucket_that_does_not_exist(moto_s3: Moto, tmp_path: Path) -> None:
    failed(cli(tmp_path, moto_s3.env, "data", "ls", "s3://no-such-bucket/x"), "bucket 'no-such-bucket' does not exist",
           moto_s3.endpoint)


@pytest.mark.slow  # a CLI process each: kept out of the default run's 5 minutes (CI runs them)
def test_an_empty_prefix_holds_no_dataset(moto_s3: Moto, tmp_path: Path) -> None:
    failed(cli(tmp_path, moto_s3.env, "data", "ls", f"s3://{BUCKET}/nothing-here"), "holds no packed dataset",
           "fcclass data pack")


@pytest.mark.slow  # a CLI process each: kept out of the default run's 5 minutes (CI runs them)
def test_an_unknown_version_lists_the_known_ones(moto_s3: Moto, packed: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    dest, first = packed
    failed(cli(tmp_path, moto_s3.env, "data", "verify", dest, "--version", "zzzz"), "'zzzz'", first["version"])


@pytest.mark.slow  # ~30 s: two trainings, an eval and a pack
def test_training_from_s3_then_from_the_cache_once_the_server_is_gone(own_moto: Moto, images: Path, tmp_path: Path) -> None:
    dest = f"s3://{BUCKET}/train"
    v = pack(tmp_path, own_moto.env, images, dest)["version"]
    cfg = train_config(tmp_path, dest, tmp_path / "cache")
    first = cli(tmp_path, own_moto.env, "train", "-c", str(cfg))
    assert first.returncode == 0, first.stderr
    (run,) = (tmp_path / "runs").iterdir()
    import yaml

    recorded = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert recorded["version"] == v and recorded["path"] == dest

    own_moto.stop()
    second = cli(tmp_path, own_moto.env, "train", "-c", str(cfg))
    assert second.returncode == 0, second.stderr
    assert "could not be reached" in second.stdout + second.stderr  # said, then trained on what the cache holds
    assert f"Using version {v}" in " ".join((second.stdout + second.stderr).split())
    assert len(list((tmp_path / "runs").iterdir())) == 2
    ev = cli(tmp_path, own_moto.env, "eval", str(run), "--json", "-")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["num_samples"] > 0
    resumed = cli(tmp_path, own_moto.env, "train", "--resume", str(run), "--set", "train.epochs=2")  # the server still gone
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "summary.json").read_text())["epochs"]["done"] == 2
    assert json.loads((run / "splits.json").read_text())["root"] == str(tmp_path / "cache" / "shards")  # not the bucket
