"""data.dataset: shards as a source: the version's images, from the local shard cache, as an image folder's pools
(the rest of fcclass reads them as files: splits, the decode cache, streaming, the recorded splits.json).

The version is resolved once when a run starts (data.version, else the newest) and recorded in the run's config;
later commands read that version. A version whose manifest and shards are in the cache needs no network; with the
store unreachable, a run that asked for the newest version takes the newest one in the cache, and says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fcclass.data.shards.cache import cached_manifest, ensure, keep_manifest
from fcclass.data.shards.manifest import Manifest
from fcclass.data.shards.store import EndpointDown, open_store
from fcclass.data.shards.versions import resolve
from fcclass.errors import DataError


def shard_root(cache_dir: str | None) -> Path:
    from fcclass.data.cache import cache_folder

    return cache_folder(cache_dir) / "shards"


def pin_version(cfg: Any) -> tuple[Manifest, list[str]]:
    """The version ``cfg`` (a DataConfig with dataset shards) reads, and notes: from the cache when it holds that
    version, else from the store (and kept in the cache)."""
    root = shard_root(cfg.cache_dir)
    url = open_store(cfg.path).url
    if cfg.version is not None:
        m = cached_manifest(root, url, cfg.version)
        if m is not None:
            return m, []
    store = open_store(cfg.path)
    try:
        m = resolve(store, cfg.version)
    except DataError as e:
        cached = cached_manifest(root, url, None) if cfg.version is None else None
        if cached is None or not (isinstance(e, EndpointDown) or store.unreachable):
            raise
        why = str(e) if url.startswith("s3://") else f"The folder '{url}' is not there (a share not mounted?)."
        return cached, [f"Shards: {why} Using version {cached.id} ({cached.created[:19].replace('T', ' ')}), the newest of it in the local cache."]
    keep_manifest(root, url, m)
    return m, []


def shards_source(cfg: Any, progress: Any = None) -> dict[str, Any]:
    """The version ``cfg`` names (data.version, else the newest), its shards fetched: the pieces of a Source ({labels,
    root, pools: {split: (labels, files)}, pool_dirs, version, notes})."""
    m, notes = pin_version(cfg)
    root = shard_root(cfg.cache_dir)
    notes += ensure(m, root, lambda: open_store(cfg.path), cfg.cache_max_gb * 1e9, progress)
    pools, pool_dirs, names = {}, {}, {}
    for split in ("train", "val", "test"):
        chosen = sorted((i for i in m.images if i.split == split), key=lambda i: (i.label, i.name))
        if not chosen:
            continue
        files = [root / "blobs" / m.shards[i.shard].sha256 / i.member for i in chosen]
        names.update((f, i.name) for f, i in zip(files, chosen) if f not in names)
        pools[split] = (torch.tensor([i.label for i in chosen], dtype=torch.long), files)
        pool_dirs[split] = root / "pools" / m.id / split
        pool_dirs[split].mkdir(parents=True, exist_ok=True)
    return {"labels": list(m.labels), "root": root, "pools": pools, "pool_dirs": pool_dirs, "version": m.id, "notes": notes, "names": names,
            "shape": tuple(m.first_shape) if m.first_shape else None}
