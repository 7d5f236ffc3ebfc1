"""Datasets packed once into versioned, content-named shards on a folder or an S3 bucket (`fcclass data pack`),
and read back through a local shard cache (data.dataset: shards)."""
