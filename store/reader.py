"""Reading vectors back: one shard, or a whole cache shard by shard (bounded memory)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from store.cache import Cache
from store.errors import CacheError
from store.format import META_LAYOUT, SCALE_SUFFIX, decode_vectors


def shard_layout(path: str | Path) -> dict:
    """The vector layout stored in a shard's own key-value metadata."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pq.lib.ArrowException) as e:
        raise CacheError(f"{path} is not a readable Parquet shard ({e})") from None
    if META_LAYOUT not in meta:
        raise CacheError(f"{path} is not a facetclip shard (no layout in its metadata)")
    return json.loads(meta[META_LAYOUT])


def read_shard(
    path: str | Path, facets: Sequence[str] | None = None
) -> tuple[list[str], dict[str, np.ndarray]]:
    """A shard's keys and its vectors as float32 ``[rows, D]`` arrays, by vector name.

    >>> keys, vecs = read_shard("cache/shards/part-00000.parquet", ["main_object"])
    """
    layout = shard_layout(path)
    names = list(facets) if facets is not None else layout["vector_names"]
    unknown = [n for n in names if n not in layout["vector_names"]]
    if unknown:
        raise CacheError(f"{path} has no vector(s) {unknown}; it has {layout['vector_names']}")
    columns = ["key", *names]
    if layout["dtype"] == "int8":
        columns += [n + SCALE_SUFFIX for n in names]
    try:
        table = pq.read_table(path, columns=columns)
    except (OSError, pq.lib.ArrowException) as e:
        raise CacheError(f"cannot read {path} ({e}); run `facetclip verify` on its cache") from None
    keys = table.column("key").to_pylist()
    return keys, {n: decode_vectors(table, n, layout["dtype"]) for n in names}


def iter_cache(
    cache: Cache | str | Path, facets: Sequence[str] | None = None
) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
    """(keys, vectors by name) for each finished shard of a cache, in shard order."""
    if not isinstance(cache, Cache):
        cache = Cache.open(cache)
    for path in cache.shard_paths:
        yield read_shard(path, facets)
