"""A packed dataset's versions: listing them (`fcclass data ls`), picking one (data.version, else the newest), and
checking every shard of one against its hash (`fcclass data verify`)."""

from __future__ import annotations

import hashlib
from typing import Any

from fcclass.data.shards.manifest import MARKER, MAX_MANIFEST, SUFFIX, Manifest, check_marker, parse
from fcclass.data.shards.store import FolderStore, S3Store
from fcclass.errors import DataError


def check_dataset(store: FolderStore | S3Store) -> None:
    """A DataError unless ``store`` holds an fcclass packed dataset."""
    if store.size(MARKER) is None:
        raise DataError(f"'{store.url}' holds no packed dataset (no {MARKER}). Pack one there first: "
                        f"fcclass data pack IMAGE_FOLDER --out {store.url}")
    check_marker(store.read(MARKER, limit=1 << 16), store.where(MARKER))


def version_ids(store: FolderStore | S3Store) -> list[str]:
    return sorted(k[len("versions/"):-len(SUFFIX)] for k in store.list("versions") if k.endswith(SUFFIX) and k.count("/") == 1)


def read_version(store: FolderStore | S3Store, vid: str) -> Manifest:
    try:
        data = store.read(f"versions/{vid}{SUFFIX}", limit=MAX_MANIFEST)
    except FileNotFoundError:
        known = version_ids(store)
        raise DataError(f"'{store.url}' has no version '{vid}'. Its versions: {', '.join(known) if known else 'none yet'}. "
                        f"Set data.version to one of them (or leave it out for the newest); `fcclass data ls {store.url}` lists them.") from None
    return parse(data, store.where(f"versions/{vid}{SUFFIX}"), expected_id=vid)


def read_versions(store: FolderStore | S3Store) -> list[Manifest]:
    """Every version at ``store`` (which must hold a packed dataset, or be empty), oldest first."""
    if store.size(MARKER) is None:
        return []
    return sorted((read_version(store, vid) for vid in version_ids(store)), key=lambda m: (m.created, m.id))


def newest(versions: list[Manifest]) -> Manifest | None:
    return versions[-1] if versions else None


def resolve(store: FolderStore | S3Store, version: str | None) -> Manifest:
    """The version asked for (a full id or an unambiguous prefix), else the newest."""
    check_dataset(store)
    ids = version_ids(store)
    if not ids:
        raise DataError(f"'{store.url}' holds no version yet (a pack was interrupted before its manifest). Pack again: "
                        f"fcclass data pack SOURCE --out {store.url}")
    if version is None:
        m = newest(read_versions(store))
        assert m is not None
        return m
    hits = [v for v in ids if v.startswith(version)]
    if len(hits) != 1:
        why = "matches several of its versions" if hits else "is not one of its versions"
        raise DataError(f"Version '{version}' {why} at '{store.url}': {', '.join(ids)}. Give one of those ids (or an unambiguous "
                        f"prefix) as data.version or --version; `fcclass data ls {store.url}` lists them.")
    return read_version(store, hits[0])


def describe(m: Manifest) -> dict[str, Any]:
    """One version, as `fcclass data ls` shows it."""
    counts = m.counts()
    return {"id": m.id, "created": m.created, "parent": m.parent, "source": m.source, "images": len(m.images),
            "splits": m.split_sizes(), "labels": counts, "shards": len(m.shards), "bytes": m.nbytes}


def verify(store: FolderStore | S3Store, m: Manifest, progress: Any = None) -> list[tuple[str, str]]:
    """Re-hash every shard of version ``m``: [(shard file, what is wrong)] (empty: every shard is whole)."""
    bad = []
    if progress is not None:
        progress.start(len(m.shards), f"Verifying the {len(m.shards)} shards of version {m.id}")
    try:
        for k, shard in enumerate(m.shards, 1):
            problem = shard_problem(store, shard.file, shard.bytes, shard.sha256)
            if problem:
                bad.append((store.where(shard.file), problem))
            if progress is not None:
                progress.advance(k)
    finally:
        if progress is not None:
            progress.end()
    return bad


def shard_problem(store: FolderStore | S3Store, key: str, size: int, sha: str, data: bytes | None = None) -> str | None:
    if data is None:
        try:
            data = store.read(key)
        except FileNotFoundError:
            return "missing"
    if len(data) != size:
        return f"truncated or changed: {len(data):,} bytes, the manifest says {size:,}"
    if hashlib.sha256(data).hexdigest() != sha:
        return "its bytes do not match its hash (damaged)"
    return None
