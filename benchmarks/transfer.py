"""What does starting from a trained run buy on a few images? Fashion-MNIST split by label (issue 22):

  1. pretrain the shipped default model (`fcclass train`, its 9-epoch recipe) on an image folder of the first five
     labels: T-shirt/top, Trouser, Pullover, Dress, Coat (30,000 training images; their 5,000 test images in test/);
  2. for 20, 50 and 200 training images per label of the other five (Sandal, Shirt, Sneaker, Bag, Ankle boot), an
     image folder with those in train/ and all 5,000 of their test images in test/;
  3. train each twice with the same config, epochs and seeds: from scratch, and `--init-from` the pretrained run
     (its classifier is new, as the labels differ; the loaded layers frozen, then unfrozen: init_from.freeze and
     train.unfreeze), and report the test accuracy of each (the end-of-training test pass on test/).

Every run is a real `fcclass train ... --json -` from the command line, as a user would run it.

    .venv/bin/python benchmarks/transfer.py                        (everything: about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/transfer.py --sizes 20 --seeds 0   (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PRETRAIN_LABELS = (0, 1, 2, 3, 4)
FINETUNE_LABELS = (5, 6, 7, 8, 9)
NAMES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")


def fashion(split: str) -> tuple[Any, Any]:
    sys.path.insert(0, str(REPO))
    from fcclass.config.sections import DataConfig
    from fcclass.data import load_dataset

    ds = load_dataset(DataConfig(root=str(REPO / "data"), download=False), 0, splits=("train", "test"))
    part = ds.test if split == "test" else ds.train
    return part.images, part.labels


def write_folder(root: Path, split: str, labels: tuple[int, ...], per_label: int | None, source: str) -> None:
    """PNG files of ``labels`` (the first ``per_label`` of each, or all) under root/split/<label name>/."""
    from PIL import Image

    images, targets = fashion(source)
    for label in labels:
        folder = root / split / NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        for i in (targets == label).nonzero().flatten()[:per_label].tolist():
            Image.fromarray(images[i, 0].numpy(), "L").save(folder / f"{i}.png")


def make_data(work: Path, sizes: list[int]) -> dict[str, Path]:
    """The pretraining folder and one fine-tuning folder per size (reused when complete)."""
    folders = {"pretrain": work / "pretrain"} | {f"ft{n}": work / f"ft{n}" for n in sizes}
    for key, root in folders.items():
        if (root / ".complete").exists():
            continue
        if key == "pretrain":
            write_folder(root, "train", PRETRAIN_LABELS, None, "train")
            write_folder(root, "test", PRETRAIN_LABELS, None, "test")
        else:
            write_folder(root, "train", FINETUNE_LABELS, int(key[2:]), "train")
            write_folder(root, "test", FINETUNE_LABELS, None, "test")
        (root / ".complete").write_text("")
    return folders


def train(config: Path, *sets: str, init_from: Path | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fcclass", "train", "-c", str(config), "--json", "-",
           *(x for s in sets for x in ("--set", s)), *(["--init-from", str(init_from)] if init_from else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def config_file(work: Path, epochs: int) -> Path:
    """The shipped default (model, optimizer, one-cycle schedule, short-run plan) on an image folder of 28x28 grayscale."""
    import yaml

    raw = yaml.safe_load((REPO / "configs" / "fashion_mnist.yaml").read_text())
    raw["data"] = {**raw["data"], "dataset": "imagefolder", "channels": 1, "image_size": [28, 28], "num_workers": 0}
    raw["data"].pop("root")
    raw["train"] = {**raw["train"], "epochs": epochs, "runs_dir": str(work / "runs")}
    path = work / f"finetune-{epochs}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "data" / "transfer")
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 50, 200])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--unfreeze", type=int, default=2, help="train.unfreeze.epoch of the fine-tuned runs (fastai's fine_tune: "
                    "one frozen epoch)")
    ap.add_argument("--lr-scale", type=float, default=0.5, help="train.unfreeze.lr_scale (fastai's fine_tune halves the rate)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    folders = make_data(args.work, args.sizes)
    pretrained = args.work / "pretrained.json"
    if not pretrained.exists():
        report = train(config_file(args.work, 9), f"data.path={folders['pretrain']}", "name=pretrain")
        pretrained.write_text(json.dumps(report))
    source = json.loads(pretrained.read_text())
    print(f"pretrained on 5 labels: test accuracy {source['test']['accuracy']:.2%} ({source['run_dir']})")
    config = config_file(args.work, args.epochs)
    variants = {  # the recipe first: head replaced, body frozen, then unfrozen
        "frozen, then unfrozen": ["model.init_from.freeze=true", f"train.unfreeze={{epoch: {args.unfreeze}, lr_scale: {args.lr_scale}}}"],
        "nothing frozen": [],
        "frozen throughout": ["model.init_from.freeze=true"],
    }
    results: dict[str, Any] = {}
    done_file = args.work / f"rows-{args.epochs}-{args.unfreeze}-{args.lr_scale}.json"  # finished rows: a rerun goes on
    done = json.loads(done_file.read_text()) if done_file.exists() else {}
    for n in args.sizes:
        for seed in args.seeds:
            common = [f"data.path={folders[f'ft{n}']}", f"seed={seed}", f"name=ft{n}"]
            row = done.get(f"{n}-{seed}")
            if row is None:
                row = {"seed": seed, "from scratch": train(config, *common)["test"]["accuracy"]}
                for name, sets in variants.items():
                    row[name] = train(config, *common, *sets, init_from=Path(source["run_dir"]))["test"]["accuracy"]
                done[f"{n}-{seed}"] = row
                done_file.write_text(json.dumps(done))
            results.setdefault(str(n), []).append(row)
            print(f"{n:>4} per label, seed {seed}: " + ", ".join(f"{k} {v:.2%}" for k, v in row.items() if k != "seed"), flush=True)
    print(f"\nTest accuracy on the 5,000 test images of the 5 new labels, mean of seeds {args.seeds} (each seed's in brackets); "
          f"--init-from rows: the pretrained run's weights, frozen then unfrozen at epoch {args.unfreeze} with lr x {args.lr_scale:g}\n")
    print("| images per label | from scratch | " + " | ".join(f"--init-from, {k}" for k in variants) + " |")
    print("| --- | --- |" + " --- |" * len(variants))
    for n, rows in results.items():
        cells = []
        for key in ["from scratch", *variants]:
            values = [r[key] for r in rows]
            gain = "" if key == "from scratch" else f" **{100 * (statistics.mean(values) - statistics.mean(r['from scratch'] for r in rows)):+.1f}**"
            cells.append(f"{statistics.mean(values):.2%}{gain} ({', '.join(f'{x:.1%}' for x in values)})")
        print(f"| {n} | " + " | ".join(cells) + " |")
    (args.work / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


if __name__ == "__main__":
    main()
