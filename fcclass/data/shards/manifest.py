"""A packed dataset's layout and its versions' manifests.

    DEST/fcclass-dataset.json       the marker: this place holds an fcclass packed dataset
    DEST/shards/<sha256>.tar        immutable shards named by their content (WebDataset tars: <image hash>.<ext>)
    DEST/versions/<id>.json.gz      immutable manifests (gzip'd JSON), written last (atomically)

A manifest lists the labels, the shards (file, bytes, sha256) and every image: [split, label, content hash (the first 128 bits
of the sha256 of its encoded bytes), shard index, extension, name in the source]. Its id is a digest of those three, so the same
images packed again give the same id (and nothing is written), and a manifest whose bytes were damaged no longer
matches its file name. ``created``, ``parent`` and ``source`` are told but not part of the id."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fcclass.errors import DataError

MARKER = "fcclass-dataset.json"
FORMAT = "fcclass-shards"
SCHEMA = 1
FIXED_MTIME = 946684800  # 2000-01-01: shards are reproducible, and so are the files extracted from them
MAX_MANIFEST = 512 << 20  # bytes of JSON (once decompressed): about 4 million images
SUFFIX = ".json.gz"
IMAGE_HASH_HEX = 32  # 128 bits of sha256: an image's name in its shard and in the manifest
SPLITS = ("train", "val", "test")
_HEX = re.compile(r"^[0-9a-f]{16,64}$")
_EXT = re.compile(r"^[a-z0-9]{1,8}$")


@dataclass
class Shard:
    file: str  # "shards/<sha256>.tar"
    bytes: int
    sha256: str

    @property
    def name(self) -> str:
        return self.file.rsplit("/", 1)[-1].removesuffix(".tar")


@dataclass
class Image:
    split: str
    label: int
    hash: str
    shard: int
    ext: str
    name: str

    @property
    def member(self) -> str:
        return f"{self.hash}.{self.ext}"


@dataclass
class Manifest:
    labels: list[str]
    shards: list[Shard]
    images: list[Image]
    created: str = ""
    parent: str | None = None
    source: str = ""
    first_shape: list[int] = field(default_factory=list)  # [C, H, W] of the first training image: the default shape
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = self.digest()

    def digest(self) -> str:
        body = json.dumps([self.labels, [[s.file, s.bytes, s.sha256] for s in self.shards],
                           [[i.split, i.label, i.hash, i.shard, i.ext, i.name] for i in self.images]], separators=(",", ":"))
        return hashlib.sha256(body.encode("utf-8", "surrogateescape")).hexdigest()[:16]

    @property
    def key(self) -> str:
        return f"versions/{self.id}{SUFFIX}"

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {label: images}} in label order."""
        c = Counter((i.split, i.label) for i in self.images)
        return {s: {name: c[(s, k)] for k, name in enumerate(self.labels)} for s in SPLITS if any(i.split == s for i in self.images)}

    def split_sizes(self) -> dict[str, int]:
        return {s: sum(v.values()) for s, v in self.counts().items()}

    @property
    def nbytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> bytes:
        """The manifest as stored: gzip'd JSON (a fixed mtime, so the same manifest gives the same bytes)."""
        return gzip.compress(json.dumps({"format": FORMAT, "schema": SCHEMA, "id": self.id, "created": self.created, "parent": self.parent,
                           "source": self.source, "first_shape": self.first_shape, "labels": self.labels,
                           "shards": [[s.file, s.bytes, s.sha256] for s in self.shards],
                           "images": [[i.split, i.label, i.hash, i.shard, i.ext, i.name] for i in self.images]},
                          separators=(",", ":")).encode("utf-8", "surrogateescape"), compresslevel=6, mtime=0)


def marker() -> bytes:
    return json.dumps({"format": FORMAT, "schema": SCHEMA}).encode()


def check_marker(data: bytes, where: str) -> None:
    try:
        meta = json.loads(data)
        ok = isinstance(meta, dict) and meta.get("format") == FORMAT
    except (ValueError, RecursionError):
        ok = False
    if not ok:
        raise DataError(f"'{where}' is not an fcclass packed dataset's marker. Point at the folder `fcclass data pack` wrote.")
    if meta.get("schema") != SCHEMA:
        raise DataError(f"'{where}' was written by another fcclass (dataset schema {meta.get('schema')!r}, this one reads "
                        f"{SCHEMA}). Use that fcclass, or pack the images again into a new place.")


def parse(data: bytes, where: str, expected_id: str | None = None) -> Manifest:
    """The manifest in ``data`` (read from ``where``), checked: a damaged, foreign or hostile file is a DataError."""
    bad = f"The manifest '{where}' is damaged or not from fcclass"
    fix = "Run `fcclass data verify`, pack again (a new version is written beside it), or use another --version."
    data = _gunzip(data, bad, fix)
    if len(data) > MAX_MANIFEST:
        raise DataError(f"{bad}: it is {len(data):,} bytes (at most {MAX_MANIFEST:,}). {fix}")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{bad}: not valid JSON ({str(e)[:80]}). {fix}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DataError(f"{bad}: it is not an fcclass manifest. {fix}")
    try:
        m = _build(raw)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise DataError(f"{bad}: {str(e)[:200] or type(e).__name__}. {fix}") from None
    if m.id != raw.get("id") or (expected_id is not None and m.id != expected_id):
        raise DataError(f"{bad}: its contents do not match its id (changed after it was written). {fix}")
    return m


def _gunzip(data: bytes, bad: str, fix: str) -> bytes:
    """``data`` decompressed, at most MAX_MANIFEST + 1 bytes of it (a gzip bomb stops there); plain JSON as it is."""
    if not data.startswith(b"\x1f\x8b"):
        return data
    try:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = d.decompress(data, MAX_MANIFEST + 1)
    except zlib.error as e:
        raise DataError(f"{bad}: its compressed data is damaged ({e}). {fix}") from None
    if len(out) <= MAX_MANIFEST and not d.eof:
        raise DataError(f"{bad}: it is cut short (truncated). {fix}")
    return out


def _build(raw: dict[str, Any]) -> Manifest:
    if raw.get("schema") != SCHEMA:
        raise ValueError(f"schema {raw.get('schema')!r}, this fcclass reads {SCHEMA}")
    labels = raw["labels"]
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
        raise ValueError("labels must be a list of at least 2 names")
    shards = []
    for file, size, sha in raw["shards"]:
        if not (isinstance(file, str) and re.fullmatch(r"shards/[0-9a-f]{64}\.tar", file) and type(size) is int and size >= 0
                and isinstance(sha, str) and _HEX.match(sha)):
            raise ValueError(f"bad shard entry {str([file, size, sha])[:100]}")
        shards.append(Shard(file, size, sha))
    images = []
    for split, label, h, shard, ext, name in raw["images"]:
        if not (split in SPLITS and type(label) is int and 0 <= label < len(labels) and isinstance(h, str) and _HEX.match(h)
                and type(shard) is int and 0 <= shard < len(shards) and isinstance(ext, str) and _EXT.match(ext)
                and isinstance(name, str)):
            raise ValueError(f"bad image entry {str([split, label, h, shard, ext, name])[:100]}")
        images.append(Image(split, label, h, shard, ext, name))
    if not any(i.split == "train" for i in images):
        raise ValueError("no training images")
    size = raw.get("first_shape") or []
    if not (isinstance(size, list) and len(size) in (0, 3) and all(type(v) is int and v > 0 for v in size)):
        raise ValueError("bad first_shape")
    parent = raw.get("parent")
    return Manifest(labels, shards, images, str(raw.get("created", "")), parent if isinstance(parent, str) else None,
                    str(raw.get("source", "")), size)
