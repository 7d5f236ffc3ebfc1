"""Packed datasets, measured as a user runs them: `fcclass data pack` and `fcclass train` started as subprocesses
(python -m fcclass ...), so every time includes the CLI's start-up. Prints one table (and writes it as JSON with
--json FILE):

  1. packing Fashion-MNIST (70,000 images, encoded as PNG) into a folder; packing it again unchanged (0 bytes written)
  2. packing a folder of --images 64x64 JPEGs (10 labels; Fashion-MNIST upscaled and colourised; generating them is
     not timed) into a folder
  3. one training epoch of a small CNN (Conv2D 16 -> MaxPool -> Flatten -> Dense 10, image_size 32x32) from that
     JPEG pack on a local S3 server (moto, `python -m moto.server`): cold shard cache (a fresh data.cache_dir) and
     warm (the same cache_dir again); and from the same JPEGs as an image folder (data.dataset: imagefolder) with
     its decode cache, cold and warm. Times: the wall time of `fcclass train` (start-up, data preparation, the epoch,
     the end-of-run test) and the epoch's `seconds` from the run's metrics.csv
  4. re-packing after adding 2 % new images to the JPEG folder: bytes written / the version's bytes (bytes written
     include the new version's manifest, a JSON file listing every image; shard_share leaves it out)

    PYTHONPATH=. python benchmarks/shards.py            (70,000 + 20,000 images)
    PYTHONPATH=. python benchmarks/shards.py --quick    (the same 70,000 Fashion-MNIST images, 2,000 JPEGs, 4 MB shards)

Fashion-MNIST comes from --fmnist-root (default: a temporary data.root; fcclass unpacks the Debian copy in
/usr/share/datasets/fashion-mnist into it when present). Needs moto[server] and boto3 for part 3.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CNN = ("[{type: Conv2D, filters: 16, kernel_size: 3, padding: same, activation: relu}, {type: MaxPooling2D}, "
       "{type: Flatten}, {type: Dense, units: 10, activation: softmax}]")


def fcclass(args: list[str], env: dict[str, str] | None = None) -> tuple[float, dict[str, Any]]:
    """Run `python -m fcclass ARGS --json -`; (wall seconds, its JSON)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fcclass", *args, "--json", "-"], capture_output=True, text=True,
                          env=full_env, cwd=REPO)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"fcclass {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout)


def make_jpegs(folder: Path, n: int, first: int = 0) -> None:
    """``n`` 64x64 RGB JPEGs in class0..class9, numbered from ``first`` (Fashion-MNIST images, upscaled, colourised
    by label with a per-image tint)."""
    import numpy as np
    from PIL import Image

    from fcclass.config.sections import DataConfig
    from fcclass.data.sources import open_source

    src = open_source(DataConfig(dataset="fashion_mnist", root=str(folder.parent / "fmnist-root")))
    pool = src.pools["train"]
    assert pool.images is not None
    rng = np.random.default_rng(first)
    for k in range(10):
        (folder / f"class{k}").mkdir(parents=True, exist_ok=True)
    labels = pool.labels.tolist()
    for i in range(first, first + n):
        j = i % len(labels)
        gray = pool.images[j, 0].numpy().astype(np.float32) / 255
        tint = np.array([(labels[j] * 37 % 255), (labels[j] * 91 % 255), (labels[j] * 53 % 255)], np.float32) / 255
        tint = np.clip(tint + rng.normal(0, 0.15, 3), 0.1, 1)
        rgb = (gray[..., None] * tint * 255 + rng.normal(0, 8, (28, 28, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(rgb).resize((64, 64), Image.BILINEAR).save(folder / f"class{labels[j]}" / f"{i:06d}.jpg", quality=90)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_s3() -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="bench")
    return server, env


def train(data: list[str], runs: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """One epoch of the small CNN; (wall seconds of the command, the epoch's seconds from metrics.csv)."""
    sets = ["data.image_size=[32,32]", "data.channels=3", "data.batch_size=128", "data.augment={}", f"model.layers={CNN}",
            "optimizer={name: adam, lr: 0.001}", "train.epochs=1", "train.early_stopping.patience=null",
            f"train.runs_dir={runs}", "train.threads=2", *data]
    wall, out = fcclass(["train", "-c", "imagefolder", *[a for s in sets for a in ("--set", s)]], env)
    run_dir = Path(out.get("run_dir") or out.get("run") or max(runs.iterdir(), key=lambda p: p.stat().st_mtime))
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return wall, float(rows[-1]["seconds"])


def row(rows: list[dict[str, Any]], what: str, **values: Any) -> None:
    rows.append({"what": what, **values})
    shown = "  ".join(f"{k}={v:,.2f}" if isinstance(v, float) else f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}"
                      for k, v in values.items())
    print(f"{what:<48} {shown}", flush=True)


def pack_rows(rows: list[dict[str, Any]], tmp: Path, jpegs: Path, fmnist_root: Path, shard_mb: float) -> None:
    wall, out = fcclass(["data", "pack", "fashion_mnist", "--out", str(tmp / "fmnist-pack"), "--data-root", str(fmnist_root),
                         "--shard-mb", str(shard_mb)])
    row(rows, "pack Fashion-MNIST (70,000 PNG) -> folder", seconds=wall, images=out["images"], shards=out["shards"],
        bytes_total=out["bytes_total"], bytes_written=out["bytes_written"])
    wall, out = fcclass(["data", "pack", "fashion_mnist", "--out", str(tmp / "fmnist-pack"), "--data-root", str(fmnist_root)])
    row(rows, "re-pack Fashion-MNIST unchanged", seconds=wall, images=out["images"], shards=out["shards"],
        bytes_total=out["bytes_total"], bytes_written=out["bytes_written"])
    if out["bytes_written"] != 0:
        print("!! the unchanged re-pack wrote bytes", flush=True)
    wall, out = fcclass(["data", "pack", str(jpegs), "--out", str(tmp / "jpeg-pack"), "--shard-mb", str(shard_mb)])
    row(rows, f"pack {out['images']:,} JPEGs -> folder", seconds=wall, images=out["images"], shards=out["shards"],
        bytes_total=out["bytes_total"], bytes_written=out["bytes_written"])


def epoch_rows(rows: list[dict[str, Any]], tmp: Path, jpegs: Path, shard_mb: float) -> str:
    server, env = start_s3()
    try:
        wall, out = fcclass(["data", "pack", str(jpegs), "--out", "s3://bench/jpegs", "--shard-mb", str(shard_mb)], env)
        row(rows, "pack the JPEGs -> S3 (moto on localhost)", seconds=wall, images=out["images"], shards=out["shards"],
            bytes_total=out["bytes_total"], bytes_written=out["bytes_written"])
        version = out["version"]
        shard_data = ["data.dataset=shards", "data.path=s3://bench/jpegs", f"data.cache_dir={tmp / 'shard-cache'}"]
        for label in ("cold", "warm"):
            wall, epoch = train(shard_data, tmp / "runs", env)
            row(rows, f"train 1 epoch, shards from S3, {label} cache", wall_s=wall, epoch_s=epoch)
    finally:
        server.terminate()
        server.wait(10)
    folder_data = ["data.dataset=imagefolder", f"data.path={jpegs}", f"data.cache_dir={tmp / 'folder-cache'}"]
    for label in ("cold", "warm"):
        wall, epoch = train(folder_data, tmp / "runs", env)
        row(rows, f"train 1 epoch, image folder, {label} decode cache", wall_s=wall, epoch_s=epoch)
    return version


def repack_rows(rows: list[dict[str, Any]], tmp: Path, jpegs: Path, n: int, shard_mb: float) -> None:
    extra = max(1, n // 50)
    make_jpegs(jpegs, extra, first=n)
    wall, out = fcclass(["data", "pack", str(jpegs), "--out", str(tmp / "jpeg-pack"), "--shard-mb", str(shard_mb)])
    manifest = (tmp / "jpeg-pack" / "versions" / f"{out['version']}.json.gz").stat().st_size
    row(rows, f"re-pack after +{extra:,} JPEGs (+2 %)", seconds=wall, images=out["images"], shards=out["shards"],
        bytes_total=out["bytes_total"], bytes_written=out["bytes_written"], manifest_bytes=manifest,
        written_share=f"{out['bytes_written'] / out['bytes_total']:.1%}",
        shard_share=f"{(out['bytes_written'] - manifest) / out['bytes_total']:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 JPEGs instead of 20,000 (Fashion-MNIST stays 70,000)")
    parser.add_argument("--images", type=int, help="number of JPEGs (default 20,000; 2,000 with --quick)")
    parser.add_argument("--shard-mb", type=float, default=None, help="--shard-mb of every pack (default 64; 4 with --quick)")
    parser.add_argument("--fmnist-root", type=Path, help="data.root holding Fashion-MNIST (default: a temporary one)")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: pack,epoch,repack")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    args = parser.parse_args()
    n = args.images or (2_000 if args.quick else 20_000)
    shard_mb = args.shard_mb or (4.0 if args.quick else 64.0)
    skip = set(filter(None, args.skip.split(",")))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fmnist_root = args.fmnist_root or tmp / "fmnist-root"
        jpegs = tmp / "jpegs"
        start = time.perf_counter()
        (tmp / "fmnist-root").mkdir()
        if args.fmnist_root:
            shutil.rmtree(tmp / "fmnist-root")
            (tmp / "fmnist-root").symlink_to(args.fmnist_root.absolute())
        make_jpegs(jpegs, n)
        print(f"{n:,} JPEGs generated in {time.perf_counter() - start:.1f} s (not counted); --shard-mb {shard_mb:g}", flush=True)
        if "pack" not in skip:
            pack_rows(rows, tmp, jpegs, fmnist_root, shard_mb)
        elif "repack" not in skip:
            fcclass(["data", "pack", str(jpegs), "--out", str(tmp / "jpeg-pack"), "--shard-mb", str(shard_mb)])
        if "epoch" not in skip:
            epoch_rows(rows, tmp, jpegs, shard_mb)
        if "repack" not in skip:
            repack_rows(rows, tmp, jpegs, n, shard_mb)
    if args.json:
        args.json.write_text(json.dumps({"images": n, "shard_mb": shard_mb, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
