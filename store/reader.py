"""Reading vectors back: one shard, a whole cache in bounded batches, or rows by key.

Training streams the cache shard by shard and row group by row group (``iter_batches``), so
memory is bounded by one row group whatever the cache size. ``KeyIndex`` finds any key's
(shard, row) with 16 bytes per key (a sorted 64-bit key hash + shard + row), persisted next
to the manifest and rebuilt when the manifest changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from store.cache import Cache, atomic_write_bytes
from store.errors import CacheError
from store.format import META_LAYOUT, SCALE_SUFFIX, decode_vectors

INDEX_FILE = "key_index.npz"
MEANS_FILE = "vector_means.npz"


def shard_layout(path: str | Path, filesystem: pafs.FileSystem | None = None) -> dict:
    """The vector layout stored in a shard's own key-value metadata."""
    try:
        meta = pq.read_schema(path, filesystem=filesystem).metadata or {}
    except (OSError, pa.ArrowException) as e:
        raise CacheError(f"{path} is not a readable Parquet shard ({e})") from None
    if META_LAYOUT not in meta:
        raise CacheError(f"{path} is not a facetclip shard (no layout in its metadata)")
    return json.loads(meta[META_LAYOUT])


def _columns(layout: dict, names: Sequence[str], where: str) -> list[str]:
    unknown = [n for n in names if n not in layout["vector_names"]]
    if unknown:
        raise CacheError(f"{where} has no vector(s) {unknown}; it has {layout['vector_names']}")
    return _vector_columns(names, layout["dtype"])


def _vector_columns(names: Sequence[str], dtype: str) -> list[str]:
    """The Parquet columns holding vectors ``names`` and the key (int8 adds its scales)."""
    scales = [n + SCALE_SUFFIX for n in names] if dtype == "int8" else []
    return ["key", *names, *scales]


def read_shard(
    path: str | Path,
    facets: Sequence[str] | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> tuple[list[str], dict[str, np.ndarray]]:
    """A shard's keys and its vectors as float32 ``[rows, D]`` arrays, by vector name.
    ``path`` is local, a URI (``s3://…``), or a path in ``filesystem``.

    >>> keys, vecs = read_shard("cache/shards/part-00000.parquet", ["main_object"])
    """
    layout = shard_layout(path, filesystem)
    names = list(facets) if facets is not None else layout["vector_names"]
    try:
        table = pq.read_table(
            path, columns=_columns(layout, names, str(path)), filesystem=filesystem
        )
    except (OSError, pa.ArrowException) as e:
        raise CacheError(f"cannot read {path} ({e}); run `facetclip verify` on its cache") from None
    keys = table.column("key").to_pylist()
    return keys, {n: decode_vectors(table, n, layout["dtype"]) for n in names}


def _open(cache: Cache | str | Path) -> Cache:
    return cache if isinstance(cache, Cache) else Cache.open(cache)


def iter_cache(
    cache: Cache | str | Path, facets: Sequence[str] | None = None
) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
    """(keys, vectors by name) for each finished shard of a cache, in shard order."""
    cache = _open(cache)
    for path in cache.shard_paths:
        yield read_shard(path, facets, cache.fs)


def iter_batches(
    cache: Cache | str | Path, facets: Sequence[str] | None = None, batch_rows: int = 16384
) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
    """(keys, float32 vectors by name) in batches of at most ``batch_rows`` rows.

    Memory stays bounded by one batch (Parquet is read batch by batch, only the asked-for
    columns), whatever the size of a shard or the cache.
    """
    cache = _open(cache)
    layout = cache.manifest.layout
    names = list(facets) if facets is not None else layout["vector_names"]
    columns = _columns(layout, names, str(cache.root))
    # Parquet decoding (Arrow, in C++) and the float32 conversion (numpy) both release the
    # GIL: a reader thread decodes batch i + 1 while this thread converts batch i.
    for table in _prefetch(_read_tables(cache, columns, batch_rows), depth=2):
        keys = table.column("key").to_pylist()
        yield keys, {n: decode_vectors(table, n, layout["dtype"]) for n in names}


def _read_tables(cache: Cache, columns: list[str], batch_rows: int) -> Iterator[pa.Table]:
    for path in cache.shard_paths:
        try:
            pf = pq.ParquetFile(path, filesystem=cache.fs)
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                yield pa.Table.from_batches([batch])
        except (OSError, pa.ArrowException) as e:
            raise CacheError(
                f"cannot read {path} ({e}); run `facetclip verify {cache.root}`"
            ) from None


def _prefetch(items: Iterator, depth: int) -> Iterator:
    """Run ``items`` in a background thread, at most ``depth`` ahead; re-raise its errors here."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # a consumer that stops early lets the producer end
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)


def key_hash(keys: Sequence[str]) -> np.ndarray:
    """Stable 64-bit hashes of keys (blake2b; Python's hash() changes between processes)."""
    return np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(k.encode(), digest_size=8).digest(), "little", signed=True
            )
            for k in keys
        ),
        dtype=np.int64,
        count=len(keys),
    )


class KeyIndex:
    """Key -> (shard position in the manifest, row) for a whole cache, 16 bytes per key."""

    def __init__(self, cache: Cache, hashes: np.ndarray, shard: np.ndarray, row: np.ndarray):
        self.cache = cache
        self.hashes, self.shard, self.row = hashes, shard, row

    @classmethod
    def load(cls, cache: Cache | str | Path) -> KeyIndex:
        """The cache's index, rebuilt (and saved, when the cache is writable) if stale."""
        cache = _open(cache)
        path = cache.path(INDEX_FILE)
        stamp = manifest_stamp(cache)
        if cache.fs is None and path.is_file():  # persisted for local caches only
            with np.load(path) as z:
                if str(z["stamp"]) == stamp:
                    return cls(cache, z["hashes"], z["shard"], z["row"])
        hashes, shard, row = [], [], []
        for i, p in enumerate(cache.shard_paths):
            keys = pq.read_table(p, columns=["key"], filesystem=cache.fs).column("key").to_pylist()
            hashes.append(key_hash(keys))
            shard.append(np.full(len(keys), i, np.int32))
            row.append(np.arange(len(keys), dtype=np.int32))
        h = np.concatenate(hashes) if hashes else np.zeros(0, np.int64)
        order = np.argsort(h, kind="stable")
        index = cls(cache, h[order], np.concatenate(shard)[order] if shard else h[:0].astype(np.int32),
                    np.concatenate(row)[order] if row else h[:0].astype(np.int32))  # fmt: skip
        if cache.fs is not None:
            return index
        try:
            import io

            buf = io.BytesIO()
            np.savez(
                buf, hashes=index.hashes, shard=index.shard, row=index.row, stamp=np.array(stamp)
            )
            atomic_write_bytes(path, buf.getvalue())
        except OSError:  # a read-only cache still gets an in-memory index
            pass
        return index

    def __len__(self) -> int:
        return len(self.hashes)

    def locate(self, keys: Sequence[str]) -> list[tuple[int, int] | None]:
        """(shard position, row) of each key, or None where the cache has no such key."""
        h = key_hash(keys)
        lo = np.searchsorted(self.hashes, h, side="left")
        hi = np.searchsorted(self.hashes, h, side="right")
        out: list[tuple[int, int] | None] = []
        shard_keys: dict[int, list[str]] = {}
        for key, a, b in zip(keys, lo, hi, strict=True):
            found = None
            for j in range(a, b):  # several candidates only on a 64-bit hash collision
                s, r = int(self.shard[j]), int(self.row[j])
                if s not in shard_keys:
                    shard_keys[s] = (
                        pq.read_table(
                            self.cache.shard_paths[s], columns=["key"], filesystem=self.cache.fs
                        )
                        .column("key")
                        .to_pylist()
                    )
                if shard_keys[s][r] == key:
                    found = (s, r)
                    break
            out.append(found)
        return out

    def vectors(
        self, keys: Sequence[str], facets: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """float32 vectors of ``keys`` (in that order) by name; CacheError names missing keys."""
        where = self.locate(keys)
        missing = [k for k, w in zip(keys, where, strict=True) if w is None]
        if missing:
            raise CacheError(f"{len(missing)} key(s) not in the cache, e.g. {missing[:5]}")
        layout = self.cache.manifest.layout
        names = list(facets) if facets is not None else layout["vector_names"]
        out = {n: np.zeros((len(keys), layout["dim"]), np.float32) for n in names}
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for i, (s, r) in enumerate(where):
            by_shard.setdefault(s, []).append((i, r))
        for s, pairs in by_shard.items():
            table = pq.read_table(
                self.cache.shard_paths[s],
                columns=_columns(layout, names, "cache"),
                filesystem=self.cache.fs,
            )
            table = table.take(pa.array([r for _, r in pairs]))
            pos = np.array([i for i, _ in pairs])
            for n in names:
                out[n][pos] = decode_vectors(table, n, layout["dtype"])
        return out


def manifest_stamp(cache: Cache) -> str:
    """A digest of the finished shards: files derived from the cache (the key index, the
    vector means) are valid while it is unchanged."""
    return hashlib.sha256("".join(s.sha256 for s in cache.manifest.shards).encode()).hexdigest()


def vector_means(cache: Cache | str | Path, names: Sequence[str] | None = None) -> np.ndarray:
    """[K, D] float32: the mean over all rows of each named vector (default: all), in ``names``
    order. Computed once per cache state in one streaming pass and saved beside the manifest
    (local caches), so every training run of a cache reuses it.

    Why it exists: LLM hidden states are anisotropic and each facet prompt has its own cone;
    subtracting the mean leaves what distinguishes the captions (``center_text``).
    """
    cache = _open(cache)
    layout = cache.manifest.layout
    names = list(names) if names is not None else list(layout["vector_names"])
    _columns(layout, names, str(cache.root))  # CacheError for unknown names
    stamp = manifest_stamp(cache)
    path = cache.path(MEANS_FILE)
    stored: dict[str, np.ndarray] = {}
    if cache.fs is None and path.is_file():
        try:
            with np.load(path) as z:
                if str(z["stamp"]) == stamp:
                    stored = {k: z[k] for k in z.files if k != "stamp"}
        except (OSError, ValueError, KeyError):  # a damaged file is recomputed, never trusted
            stored = {}
    todo = [n for n in names if n not in stored]
    if todo:
        total = {n: np.zeros(layout["dim"], np.float64) for n in todo}
        rows = 0
        for keys, vecs in iter_batches(cache, todo):
            for n in todo:
                total[n] += vecs[n].sum(axis=0, dtype=np.float64)
            rows += len(keys)
        if not rows:
            raise CacheError(f"cache {cache.root} has no rows")
        stored.update({n: (total[n] / rows).astype(np.float32) for n in todo})
        if cache.fs is None:
            try:
                import io

                buf = io.BytesIO()
                np.savez(buf, stamp=np.array(stamp), **stored)
                atomic_write_bytes(path, buf.getvalue())
            except OSError:  # a read-only cache still gets its means, just not saved
                pass
    return np.stack([stored[n] for n in names])


def key_locations(cache: Cache | str | Path) -> pa.Table:
    """key, shard (position in the manifest), rg (row group), row (within it) of every row,
    reading the key column only: what a join by key needs to fetch vectors later."""
    cache = _open(cache)
    parts = []
    for shard, path in enumerate(cache.shard_paths):
        try:
            pf = pq.ParquetFile(path, filesystem=cache.fs)
            for g in range(pf.metadata.num_row_groups):
                keys = pf.read_row_group(g, columns=["key"]).column("key")
                n = len(keys)
                parts.append(
                    pa.table(
                        {
                            "key": keys.cast(pa.string()),
                            "shard": pa.array(np.full(n, shard, np.int32)),
                            "rg": pa.array(np.full(n, g, np.int32)),
                            "row": pa.array(np.arange(n, dtype=np.int32)),
                        }
                    )
                )
        except (OSError, pa.ArrowException) as e:
            raise CacheError(
                f"cannot read {path} ({e}); run `facetclip verify {cache.root}`"
            ) from None
    if not parts:
        return pa.schema(
            [("key", pa.string()), ("shard", pa.int32()), ("rg", pa.int32()), ("row", pa.int32())]
        ).empty_table()
    return pa.concat_tables(parts)


def read_rows(
    path: str,
    row_group: int,
    rows: np.ndarray,
    names: Sequence[str],
    dtype: str,
    filesystem: pafs.FileSystem | None = None,
    expect_keys: Sequence[str] | None = None,
) -> np.ndarray:
    """float32 [n, K, D]: vectors ``names`` of ``rows`` of one row group of one shard (one
    row group read, only the asked-for columns). ``expect_keys``: the keys a plan saw there;
    a mismatch means the shard changed since (CacheError)."""
    try:
        pf = pq.ParquetFile(path, filesystem=filesystem)
        columns = _vector_columns(names, dtype)
        table = pf.read_row_group(row_group, columns=columns).take(pa.array(rows))
    except (OSError, pa.ArrowException) as e:
        raise CacheError(f"cannot read {path} ({e}); run `facetclip verify` on its cache") from None
    if expect_keys is not None and table.column("key").to_pylist() != list(expect_keys):
        raise CacheError(f"{path} changed since the join was planned; plan again (restart the run)")
    return np.stack([decode_vectors(table, n, dtype) for n in names], axis=1)
