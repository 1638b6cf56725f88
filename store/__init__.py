"""The cache: format, atomic writing, reading, verification (DuckDB views live in store.sql)."""

from store.cache import Cache, Manifest, ShardEntry
from store.errors import CacheError, FacetclipError, InputError
from store.reader import KeyIndex, iter_batches, iter_cache, read_shard

__all__ = ["Cache", "Manifest", "ShardEntry", "CacheError", "FacetclipError", "InputError",
           "KeyIndex", "iter_batches", "iter_cache", "read_shard"]  # fmt: skip
