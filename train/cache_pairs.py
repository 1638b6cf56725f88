"""Heads-only training data: a text cache (`facetclip embed`) joined by key to an image cache
(`facetclip embed-images`), read by a plain iterator inside each Ray Train worker.

    plan = plan_pairs("cache/flame", "icache/resnet", facets=None, image_vectors=["pooled"])
    plan.stats                     # keys on either side only: counted, left out, never an error
    for text, image, keys in iter_pair_batches(plan, batch_size=256, seed=0, epoch=0):
        ...                        # float32 [B, K, Dt] and [B, V, Di] (V = 1 pooled, or G² tokens)

Why not Ray Data here: the Ray Data pipeline of train.data exists to spread JPEG decoding and
augmentation over CPUs, and moving decoded images between processes is its main cost. Here
there is nothing to decode: a step is a few matrix products, so the input must keep up with
tens of thousands of rows a second per worker, which a reader inside the worker does with no
task scheduling, object store or serialisation in the way (``make bench`` measures it).

The join: both caches' key columns (store.reader.key_locations), an exact inner join on the
key strings (Arrow's hash join), sorted in text-cache order. Keys on one side only are counted
(``PairStats``, into the run's metrics) and left out; no shared key at all is an InputError
showing a sample of each side's keys.

Reading: each worker takes its slice of an epoch's order (``train.data.epoch_rows`` over the
text cache's row groups: rows shuffled within a row group, cut into sub-units of ``unit_rows``,
the sub-units shuffled per (seed, epoch), equal contiguous slices per rank) and reads it a
window of rows at a time: per window, each touched row group of either cache is read once
(only the asked-for vector columns, kept in a small LRU because consecutive windows share row
groups), rows are taken by index and decoded to float32. When both caches were made from the
same dataset in the same order (the usual case) a window touches one or two row groups per side.
Batch j of a rank is rows [j·B, (j+1)·B) of its slice, so a resumed run starts reading at the
batch it stopped at instead of replaying the epoch.

Memory: the plan (~50 B + the key per joined row), one rank's order (8 B a row), at most
``LRU_GROUPS`` row groups per cache (≤ 64 MB each, store/cache.py) and one decoded window.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from store.cache import Cache
from store.errors import CacheError, InputError
from store.format import SCALE_SUFFIX, decode_vectors
from store.images import first_of_each_key
from store.reader import key_locations
from train.data import epoch_rows

KEY_SAMPLE = 5  # keys shown per side when nothing joins
LRU_GROUPS = 2  # row groups kept per cache


@dataclass
class PairStats:
    """Counts of the join of a text cache and an image cache, known before Ray starts.

    text_keys / image_keys: distinct keys of each cache; joined: keys in both;
    texts_without_image / images_without_text: keys of one side only (left out);
    duplicate_keys: further rows of a key already seen in the same cache (first kept).
    """

    text_keys: int
    image_keys: int
    joined: int
    texts_without_image: int
    images_without_text: int
    duplicate_keys: int = 0

    def as_metrics(self, prefix: str = "data/") -> dict[str, int]:
        return {prefix + k: v for k, v in asdict(self).items()}


@dataclass
class PairPlan:
    """The join as row locators in text-cache order: ``table`` has ``key``, the text cache's
    ``shard`` / ``rg`` / ``row`` and the image cache's ``i_shard`` / ``i_rg`` / ``i_row``."""

    stats: PairStats
    table: pa.Table
    text_paths: list[str]
    image_paths: list[str]
    facets: list[str]
    image_vectors: list[str]
    text_dtype: str
    image_dtype: str
    text_dim: int
    image_dim: int
    text_filesystem: Any = None
    image_filesystem: Any = None


def _check_names(cache: Cache, names: Sequence[str], what: str) -> None:
    have = cache.manifest.layout["vector_names"]
    unknown = [n for n in names if n not in have]
    if unknown or not names:
        raise CacheError(
            f"{what} {cache.root} has no vector(s) {unknown or '(none asked)'}; it has {have}"
        )


def plan_pairs(
    text_cache: str,
    image_cache: str,
    facets: Sequence[str] | None = None,
    image_vectors: Sequence[str] = ("pooled",),
) -> PairPlan:
    """Join the two caches by key (keys only, no vectors read); see the module docstring."""
    from train.image_cache import open_image_cache

    text, image = Cache.open(text_cache), open_image_cache(image_cache)
    facets = list(facets) if facets else list(text.manifest.layout["vector_names"])
    _check_names(text, facets, "text cache")
    _check_names(image, list(image_vectors), "image cache")
    texts, text_dups = first_of_each_key(key_locations(text))
    images, image_dups = first_of_each_key(key_locations(image))
    images = images.rename_columns(["key", "i_shard", "i_rg", "i_row"])
    joined = texts.join(images, keys="key", join_type="inner", use_threads=False)
    # A hash join's output order is arbitrary; text-cache order makes the plan deterministic.
    joined = joined.sort_by([("shard", "ascending"), ("rg", "ascending"), ("row", "ascending")])
    n = joined.num_rows
    stats = PairStats(
        text_keys=texts.num_rows, image_keys=images.num_rows, joined=n,
        texts_without_image=texts.num_rows - n, images_without_text=images.num_rows - n,
        duplicate_keys=text_dups + image_dups,
    )  # fmt: skip
    if n == 0:
        raise InputError(
            f"text cache {text_cache} and image cache {image_cache} share no keys, so there is "
            f"nothing to train on.\n  text cache:  {texts.num_rows} keys, e.g. "
            f"{texts.column('key').slice(0, KEY_SAMPLE).to_pylist()}\n  image cache: "
            f"{images.num_rows} keys, e.g. {images.column('key').slice(0, KEY_SAMPLE).to_pylist()}\n"
            "Embed the captions and the images of the same dataset (the keys must match)."
        )
    return PairPlan(
        stats=stats, table=joined,
        text_paths=[str(p) for p in text.shard_paths], image_paths=[str(p) for p in image.shard_paths],
        facets=facets, image_vectors=list(image_vectors),
        text_dtype=text.manifest.layout["dtype"], image_dtype=image.manifest.layout["dtype"],
        text_dim=int(text.manifest.layout["dim"]), image_dim=int(image.manifest.layout["dim"]),
        text_filesystem=text.fs, image_filesystem=image.fs,
    )  # fmt: skip


class _RowGroups:
    """One cache's recently read row groups ((shard, rg) -> Arrow table of ``key`` and the
    asked-for vector columns), least recently used dropped first."""

    def __init__(self, paths: list[str], names: list[str], dtype: str, filesystem=None):
        self.paths, self.names, self.dtype, self.fs = paths, names, dtype, filesystem
        scales = [n + SCALE_SUFFIX for n in names] if dtype == "int8" else []
        self.columns = ["key", *names, *scales]
        self.files: dict[int, pq.ParquetFile] = {}
        self.groups: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()

    def get(self, shard: int, rg: int) -> pa.Table:
        if (shard, rg) in self.groups:
            self.groups.move_to_end((shard, rg))
            return self.groups[(shard, rg)]
        try:
            if shard not in self.files:
                self.files[shard] = pq.ParquetFile(self.paths[shard], filesystem=self.fs)
            table = self.files[shard].read_row_group(rg, columns=self.columns)
        except (OSError, pa.ArrowException) as e:
            raise CacheError(
                f"cannot read {self.paths[shard]} ({e}); run `facetclip verify` on its cache"
            ) from None
        self.groups[(shard, rg)] = table
        if len(self.groups) > LRU_GROUPS:
            self.groups.popitem(last=False)
        return table

    def gather(
        self, keys: pa.Array, shard: np.ndarray, rg: np.ndarray, row: np.ndarray
    ) -> np.ndarray:
        """float32 [n, V, D]: the vectors of rows (``shard``, ``rg``, ``row``), checked
        against the ``keys`` the plan saw there."""
        group = shard.astype(np.int64) << 32 | rg.astype(np.int64)
        out = None
        for g in np.unique(group):
            idx = np.flatnonzero(group == g)
            table = self.get(int(g >> 32), int(g & 0xFFFFFFFF)).take(pa.array(row[idx]))
            if not table.column("key").equals(pa.chunked_array([keys.take(pa.array(idx))])):
                raise CacheError(
                    f"{self.paths[int(g >> 32)]} changed since the join was planned; "
                    "restart the run (it plans again)"
                )
            vectors = [decode_vectors(table, n, self.dtype) for n in self.names]
            if out is None:
                out = np.empty((len(row), len(self.names), vectors[0].shape[1]), np.float32)
            out[idx] = np.stack(vectors, axis=1)
        return out if out is not None else np.zeros((0, len(self.names), 0), np.float32)


def iter_pair_batches(
    plan: PairPlan,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    unit_rows: int = 8192,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """This rank's batches of one epoch, from batch ``start_batch`` on: (text float32
    [B, K, Dt] in ``plan.facets`` order, image float32 [B, V, Di] in ``plan.image_vectors``
    order, the B keys). Every rank gets the same number of full batches (the rest is left out)."""
    t = plan.table
    shard, rg = t.column("shard").to_numpy(), t.column("rg").to_numpy()
    order, _ = epoch_rows(shard, rg, True, seed, unit_rows, epoch, rank, world_size)
    end = len(order) // batch_size * batch_size
    if end == 0:
        return
    keys = t.column("key").combine_chunks()
    row = t.column("row").to_numpy()
    i_shard, i_rg, i_row = (t.column(c).to_numpy() for c in ("i_shard", "i_rg", "i_row"))
    texts = _RowGroups(plan.text_paths, plan.facets, plan.text_dtype, plan.text_filesystem)
    images = _RowGroups(plan.image_paths, plan.image_vectors, plan.image_dtype,
                        plan.image_filesystem)  # fmt: skip
    window = batch_size * max(1, unit_rows // batch_size)  # whole batches: none straddles two
    for lo in range(start_batch * batch_size, end, window):
        idx = order[lo : min(lo + window, end)]
        k = keys.take(pa.array(idx))
        text = texts.gather(k, shard[idx], rg[idx], row[idx])
        image = images.gather(k, i_shard[idx], i_rg[idx], i_row[idx])
        names = k.to_pylist()
        for b in range(0, len(idx), batch_size):
            yield text[b : b + batch_size], image[b : b + batch_size], names[b : b + batch_size]
