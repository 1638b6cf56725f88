"""Stage two's input pipeline: images joined by key to the cache's vectors, decoded and augmented
on CPU by Ray Data, in bounded memory, reproducibly.

    plan = plan_join(cfg)                  # before Ray: keys only; InputError when nothing joins
    metrics.update(plan.stats.as_metrics())        # skipped samples, known up front
    # in each Ray Train worker (rank = ray.train.get_context().get_world_rank(), ...):
    for epoch in range(epochs):
        ds = build_dataset(cfg, epoch=epoch, rank=rank, world_size=world_size, plan=plan)
        for batch in ds.iter_torch_batches(batch_size=B, collate_fn=torch_collate()):
            batch, n_bad = drop_invalid(batch)         # undecodable images: counted, dropped
            out = model(batch["image"], batch["text"])  # [B', 3, H, W], [B', K, D]

Inputs (``DataConfig.images``): any image dataset ``store.images`` reads (img2dataset
webdataset / Parquet / files output, or a key + image-path table); its module doc has the
formats and how ``image_format="auto"`` detects them. Decoding and augmentation are
``train.transforms`` (pure functions, shared with export and eval).

The join, and why it is done this way
    The vectors are the heavy side: a FLAME row of a 5120-wide LLM is 11 × 5120 fp16 = 112 KB,
    several times a JPEG, and 3M rows are 340 GB. Parquet cannot read one row without decoding
    its row group's column chunk (~64 MB, store/cache.py), so the cache must be read row group
    by row group, in its own order, and the images brought to it:

    1. Plan, on the driver, before Ray starts, from keys only: the image side's keys with a
       locator each (tar member data offset + size, read from the tar headers with the data
       seeked over; Parquet file / row group / row; a file path), the cache's key column with
       (shard, row group, row). An exact inner join on the key strings (Arrow's hash join),
       sorted in cache order. This is also what ``JoinStats`` counts, so skips are known, and
       a no-overlap mistake is reported, before any Ray worker starts.
    2. Units: each cache row group's rows, shuffled and cut into sub-units of at most
       ``unit_rows``; the sub-units are shuffled per epoch. One Ray task per sub-unit reads its
       row group once (only the asked-for facet columns), fetches its images by locator, and
       decodes them (``decode_batch``), yielding blocks of ``decode_rows`` rows. Every vector
       is read once per epoch; a row group wider than ``unit_rows`` is read once per sub-unit
       (≤ 64 MB / unit_rows per row, e.g. 64 KB: cheap beside a JPEG decode). The epoch's
       plan rows go to the object store once; the dataset itself is ``range(sub-units)``.
    3. Images by locator: tars cost one ``pread`` of exactly the image's bytes and files one
       open, whatever the order. Parquet image bytes can only be read a whole row group column
       at a time: when images and cache share an order (the cache was embedded from this
       img2dataset output or captions listed in the same order, the usual case) each image row
       group is read about (its rows / unit_rows) times per epoch; in unrelated orders far
       more, so the plan measures this (``JoinPlan.image_reads_per_row``) and warns above 32.
       Convert such input to webdataset.

    Memory: the driver holds the plan (~40 B + the key per joined row: 3M rows ≈ 200 MB, and
    one epoch's copy of it in the object store); a task holds one cache row group (≤ 64 MB),
    its images' bytes and one output block; Ray Data's streaming executor bounds the blocks in
    flight. Nothing else grows with the data.

    Not chosen: ``Dataset.join`` (Ray 2.60) hash-shuffles both sides through the object store
    every epoch (the whole cache, spilled to disk) and needs ``polars``, not a dependency here.
    A ``store.reader.KeyIndex`` lookup from the image side is exact and tiny (16 B/key), but
    every key in a batch may sit in another row group: 256 keys can decode 256 × 64 MB.

Skipped samples, and how their counts reach the run's metrics
    ``JoinStats`` (driver, before Ray): failed img2dataset samples, image keys without vectors,
    vectors without images, duplicate image keys (the first is kept). Images that cannot be
    read or decoded (corrupt bytes, a missing file) are never an exception: their rows arrive
    with ``valid=False`` and a zero image; ``drop_invalid`` removes them from a batch and
    returns how many it removed, which each worker sums and rank 0 all-reduces into its metrics.
    Rows stay in the stream, so every rank still takes the same number of steps.

Determinism
    An epoch's order is a function of (seed, epoch): row order within each row group and the
    sub-unit order are drawn from ``numpy.random.default_rng([seed, epoch])``; the dataset
    preserves that order (``preserve_order``). Augmentation draws from a generator seeded by
    blake2b(seed, epoch, key), so a sample's pixels do not depend on batching, task placement
    or the number of workers. ``rank``/``world_size`` give every rank an equal, disjoint slice
    of the epoch (the last ``joined % world_size`` rows of a training epoch are left out, a
    different few each epoch), so no ``streaming_split`` decides who gets what. Consecutive
    rows come from one sub-unit (one cache row group); to mix sub-units within a batch, add
    ``local_shuffle_buffer_size`` (a few batches) with ``local_shuffle_seed=f(seed, epoch)``
    to ``iter_torch_batches``: the input order is fixed, so that shuffle is reproducible too.

Throughput (2000 synthetic 256 px JPEGs, webdataset or Parquet, Ray with 4 logical CPUs on 2
cores shared with other work, load ~7): the pipeline delivers ~600 images/s at 224 px and
~1550/s at 64 px; ``decode_batch`` alone in one process, ~550-830/s and ~1700-2260/s. The join
(row group reads + image ``pread``s) runs at 20-28k rows/s per core, so decoding dominates,
then moving float32 images (600 KB each at 224 px) through the object store. Planning 2000
samples takes 0.3 s (tar headers) or 0.01 s (Parquet key/status columns).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from store.cache import Cache
from store.errors import CacheError, InputError
from store.images import IMAGE_FORMATS, first_of_each_key, read_image_bytes, scan_images
from store.reader import key_locations, read_rows
from train.transforms import CLIP_MEAN, CLIP_STD, IMAGE_BYTES, ImageTransform, decode_batch

KEY_SAMPLE = 5  # keys shown per side when nothing joins
AMPLIFICATION_WARNING = 32.0


@dataclass
class DataConfig:
    """What to read and how to augment it.

    images:       img2dataset output (tars, Parquet with image bytes, files), or a table of
                  key + image path (a CSV file, or a folder holding one); see store.images.
    cache:        the stage-one cache to join by key: a folder, or a URI (s3://bucket/path).
    cache_filesystem: a ``pyarrow.fs.FileSystem`` holding ``cache`` (default: from the URI).
    facets:       vector names, in the order of the ``text`` rows' K axis (default: all).
    image_size / crop_scale / crop_ratio / mean / std / train / seed: the ``ImageTransform``
                  (``transform``); with the epoch, the seed fixes every pixel of every batch.
    image_format: auto | webdataset | parquet | files | csv.
    key_column / image_column: the table's columns for ``csv`` (and the key of Parquet).
    unit_rows:    most rows one Ray task joins and decodes (one cache row group at most).
    decode_rows:  rows per output block.

    >>> DataConfig(images=Path("synth/images"), cache=Path("cache"), image_size=224)  # doctest: +SKIP
    """

    images: Path
    cache: Path | str
    facets: list[str] | None = None
    image_size: int = 64
    crop_scale: tuple[float, float] = (0.9, 1.0)  # FLAME: RandomResizedCrop(224, scale 0.9-1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    seed: int = 0
    image_format: str = "auto"
    key_column: str = "key"
    image_column: str = "image"
    train: bool = True
    unit_rows: int = 1024
    decode_rows: int = 64
    cache_filesystem: Any = None

    def __post_init__(self) -> None:
        self.images = Path(self.images)
        self.cache = self.cache if "://" in str(self.cache) else Path(self.cache)
        if self.image_format not in IMAGE_FORMATS:
            raise InputError(
                f"unknown image format {self.image_format!r}; choose one of: {', '.join(IMAGE_FORMATS)}"
            )
        self.transform  # noqa: B018 - validates the transform's fields now, not in a Ray task
        for name in ("unit_rows", "decode_rows"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def transform(self) -> ImageTransform:
        return ImageTransform(
            image_size=self.image_size, train=self.train, crop_scale=tuple(self.crop_scale),
            crop_ratio=tuple(self.crop_ratio), mean=tuple(self.mean), std=tuple(self.std),
            seed=self.seed,
        )  # fmt: skip


@dataclass
class JoinStats:
    """Counts of the join, known before Ray starts (keys only).

    image_keys: samples with an image (failed ones excluded); cache_keys: rows of the cache;
    joined: samples with both; images_without_vectors / vectors_without_images: the
    differences; failed_images: img2dataset failures (absent from tars, null bytes, or
    ``status != "success"``); duplicate_image_keys: further images of a key (first kept).
    """

    image_keys: int
    cache_keys: int
    joined: int
    images_without_vectors: int
    vectors_without_images: int
    failed_images: int
    duplicate_image_keys: int = 0

    def as_metrics(self, prefix: str = "data/") -> dict[str, int]:
        return {prefix + k: v for k, v in asdict(self).items()}


@dataclass
class JoinPlan:
    """The join as locators, in cache order: what ``build_dataset`` turns into Ray tasks.

    ``table`` has one row per joined sample: ``key``; the cache's ``shard`` (position in the
    manifest), ``rg`` (row group) and ``row`` (within it); the image's ``src`` (index into
    ``sources``) with ``a``/``b`` (tar: data offset/size; Parquet: row group/row), or ``path``.
    """

    stats: JoinStats
    table: pa.Table
    image_format: str
    sources: list[str]
    bytes_column: str | None
    cache_paths: list[str]
    facets: list[str]
    dim: int
    dtype: str
    image_reads_per_row: float = 1.0
    cache_filesystem: Any = None  # pyarrow.fs holding cache_paths; None: local


def collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Tensors for image/text/valid, keys as a list (torch has no tensor of strings)."""
    import torch

    out: dict[str, Any] = {"key": [str(k) for k in batch["key"]]}
    for name in ("image", "text", "valid"):
        out[name] = torch.from_numpy(np.ascontiguousarray(batch[name]))
    return out


def torch_collate():
    """``iter_torch_batches(collate_fn=torch_collate())``: ``collate`` as the callable class
    Ray asks for (the default collate fails on the ``key`` strings)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return collate(batch)

    return Collate()


def _reads_per_row(joined: pa.Table, group_rows: dict) -> float:
    """Image rows decoded per joined row when every cache row group reads each image row group
    it touches once (Parquet image bytes only; 1.0 is ideal)."""
    if joined.num_rows == 0:
        return 1.0
    pairs = joined.group_by(["shard", "rg", "src", "a"], use_threads=False).aggregate([])
    src, a = pairs.column("src").to_pylist(), pairs.column("a").to_pylist()
    return sum(group_rows[(s, g)] for s, g in zip(src, a, strict=True)) / joined.num_rows


def plan_join(cfg: DataConfig) -> JoinPlan:
    """Scan both sides' keys and join them exactly (no Ray; see the module docstring).

    Raises InputError when images and cache share no key, with a sample of each side's keys,
    and CacheError for an unreadable cache or unknown facet names.
    """
    cache = Cache.open(cfg.cache, cfg.cache_filesystem)
    layout = cache.manifest.layout
    facets = list(cfg.facets) if cfg.facets is not None else list(layout["vector_names"])
    unknown = [f for f in facets if f not in layout["vector_names"]]
    if unknown or not facets:
        raise CacheError(
            f"{cfg.cache} has no vector(s) {unknown or '(none asked)'}; it has {layout['vector_names']}"
        )

    scan = scan_images(cfg.images, cfg.image_format, cfg.key_column, cfg.image_column)
    fmt = scan.image_format
    images, duplicates = first_of_each_key(scan.rows)
    scan.rows = None  # the deduplicated copy is all the plan keeps
    cached, _ = first_of_each_key(key_locations(cache))  # embed writes each key once anyway

    joined = images.join(cached, keys="key", join_type="inner", use_threads=False)
    # A hash join's output order is arbitrary; cache order makes the plan deterministic.
    joined = joined.sort_by([("shard", "ascending"), ("rg", "ascending"), ("row", "ascending")])
    n = joined.num_rows
    stats = JoinStats(
        image_keys=images.num_rows,
        cache_keys=cached.num_rows,
        joined=n,
        images_without_vectors=images.num_rows - n,
        vectors_without_images=cached.num_rows - n,
        failed_images=scan.failed,
        duplicate_image_keys=duplicates,
    )
    image_sample = images.column("key").slice(0, KEY_SAMPLE).to_pylist()
    if n == 0:
        cache_sample = cached.column("key").slice(0, KEY_SAMPLE).to_pylist()
        raise InputError(
            f"images {cfg.images} ({fmt}) and cache {cfg.cache} share no keys, so there is "
            f"nothing to train on.\n  images: {images.num_rows} keys, e.g. {image_sample}\n"
            f"  cache:  {cached.num_rows} keys, e.g. {cache_sample}\n"
            "Check that both come from the same dataset (the cache must be embedded from these "
            "images' captions) and the key column."
        )
    reads = _reads_per_row(joined, scan.group_rows) if fmt == "parquet" else 1.0
    if reads > AMPLIFICATION_WARNING:
        warnings.warn(
            f"images in {cfg.images} are in another order than the cache: each epoch decodes "
            f"{reads:.0f} Parquet image rows per sample. Convert the images to webdataset "
            "(img2dataset --output_format webdataset) or embed captions in image order.",
            stacklevel=2,
        )
    return JoinPlan(
        stats=stats,
        table=joined,
        image_format=fmt,
        sources=scan.sources,
        bytes_column=scan.bytes_column,
        cache_paths=[str(p) for p in cache.shard_paths],
        cache_filesystem=cache.fs,
        facets=facets,
        dim=int(layout["dim"]),
        dtype=str(layout["dtype"]),
        image_reads_per_row=reads,
    )


def scan_keys(cfg: DataConfig) -> JoinStats:
    """The join's counts, from keys only, before Ray starts; InputError when nothing joins."""
    return plan_join(cfg).stats


# --- an epoch's order ----------------------------------------------------------------------------


def epoch_order(
    plan: JoinPlan, cfg: DataConfig, epoch: int, rank: int = 0, world_size: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(row indices into ``plan.table``, sub-unit id of each), this rank's slice of the epoch.

    Training: rows shuffled within their cache row group, cut into sub-units of at most
    ``unit_rows``, sub-units shuffled; ranks take equal contiguous slices (the remainder is
    left out). Evaluation: cache order, every row, slices differing by at most one row.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    t = plan.table
    unit = _unit_ids(t.column("shard").to_numpy(), t.column("rg").to_numpy())
    n = len(unit)
    if cfg.train:
        rng = np.random.default_rng([cfg.seed, epoch])
        order = np.lexsort((rng.random(n), unit))  # grouped by unit, random inside
        sub = _sub_units(unit[order], cfg.unit_rows)
        rank_of_sub = rng.permutation(sub[-1] + 1 if n else 0)
        final = np.argsort(rank_of_sub[sub], kind="stable")
        order, sub = order[final], sub[final]
        per_rank = n // world_size
        lo, hi = rank * per_rank, (rank + 1) * per_rank
    else:
        order, sub = np.arange(n), _sub_units(unit, cfg.unit_rows)
        bounds = np.linspace(0, n, world_size + 1).round().astype(int)
        lo, hi = bounds[rank], bounds[rank + 1]
    return order[lo:hi], sub[lo:hi]


def _sub_units(unit: np.ndarray, unit_rows: int) -> np.ndarray:
    """Dense sub-unit ids of rows grouped by unit: each unit's run cut every ``unit_rows``."""
    n = len(unit)
    starts = np.r_[0, np.flatnonzero(np.diff(unit)) + 1] if n else np.zeros(0, int)
    pos = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    new = np.r_[True, (np.diff(unit) != 0) | (pos[1:] % unit_rows == 0)][:n]
    return np.cumsum(new) - 1


def _unit_ids(shard: np.ndarray, rg: np.ndarray) -> np.ndarray:
    """A dense id per (shard, row group) pair, increasing in cache order."""
    _, ids = np.unique(shard.astype(np.int64) << 32 | rg.astype(np.int64), return_inverse=True)
    return ids


# --- reading a unit (runs inside Ray tasks; pure pyarrow + PIL) ----------------------------------


@dataclass(frozen=True)
class UnitReader:
    """What a task needs besides its rows to read them: small and picklable."""

    cache_paths: list[str]
    facets: list[str]
    dtype: str
    image_format: str
    sources: list[str]
    bytes_column: str | None
    cache_filesystem: Any = None

    @classmethod
    def of(cls, plan: JoinPlan) -> UnitReader:
        return cls(plan.cache_paths, plan.facets, plan.dtype, plan.image_format, plan.sources,
                   plan.bytes_column, plan.cache_filesystem)  # fmt: skip

    def vectors(self, shard: int, rg: int, rows: np.ndarray, keys: list[str]) -> np.ndarray:
        """float32 [n, K, D] of ``rows`` of one cache row group, checked against ``keys``."""
        return read_rows(self.cache_paths[shard], rg, rows, self.facets, self.dtype,
                         self.cache_filesystem, expect_keys=keys)  # fmt: skip

    def images(self, rows: pa.Table) -> list[bytes | None]:
        return read_image_bytes(rows, self.image_format, self.sources, self.bytes_column)


def _load_unit(
    rows: pa.Table, reader: UnitReader, t: ImageTransform, decode_rows: int, epoch: int
) -> Iterator[dict[str, np.ndarray]]:
    """Join a sub-unit's rows (one cache row group) to their vectors and images, decode, and
    yield blocks of ``decode_rows`` rows in the planned order."""
    shard, rg = rows.column("shard").to_numpy(), rows.column("rg").to_numpy()
    starts = np.r_[0, np.flatnonzero((np.diff(shard) != 0) | (np.diff(rg) != 0)) + 1, len(shard)]
    for lo, hi in zip(starts[:-1], starts[1:], strict=True):  # one run unless planned otherwise
        run = rows.slice(lo, hi - lo)
        keys = run.column("key").to_pylist()
        text = reader.vectors(int(shard[lo]), int(rg[lo]), run.column("row").to_numpy(), keys)
        blobs = reader.images(run)
        for i in range(0, len(keys), decode_rows):
            j = i + decode_rows
            yield decode_batch(
                {
                    "key": np.array(keys[i:j], dtype=object),
                    IMAGE_BYTES: blobs[i:j],
                    "text": text[i:j],
                },
                t,
                epoch,
            )


def _load_units(
    batch: dict[str, np.ndarray],
    epoch_rows: list,
    reader: UnitReader,
    t: ImageTransform,
    decode_rows: int,
    epoch: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray's map_batches UDF over sub-unit ids; ``epoch_rows`` holds the ref of this rank's
    (plan rows in epoch order, sub-unit boundaries), read zero-copy from the object store."""
    import ray

    rows, cuts = ray.get(epoch_rows[0])
    for u in batch["id"]:
        yield from _load_unit(
            rows.slice(cuts[u], cuts[u + 1] - cuts[u]), reader, t, decode_rows, epoch
        )


def build_dataset(
    cfg: DataConfig,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    plan: JoinPlan | None = None,
):
    """One epoch of this rank's rows as a Ray Dataset, in a fixed order.

    Rows: ``image`` float32 [3, S, S] (normalised), ``text`` float32 [K, D] (``plan.facets``
    order), ``key`` str, ``valid`` bool. Pass the ``plan`` of ``plan_join(cfg)`` to skip the
    scan on every epoch. Ray starts (locally) if it is not running.
    """
    import ray

    plan = plan if plan is not None else plan_join(cfg)
    order, sub = epoch_order(plan, cfg, epoch, rank, world_size)
    rows = plan.table.take(pa.array(order))
    cuts = np.r_[0, np.flatnonzero(np.diff(sub)) + 1, len(sub)] if len(sub) else np.zeros(1, int)
    # The epoch's rows go to the object store once; the dataset itself is the sub-unit ids,
    # one block (one task) each, so a task reads one cache row group. (``from_arrow`` of one
    # table per sub-unit costs ~7 ms per table on the driver: 30 s an epoch for 3M rows.)
    units = len(cuts) - 1
    epoch_rows = [ray.put((rows, cuts))]
    ds = ray.data.range(units, override_num_blocks=max(1, units)).map_batches(
        _load_units,
        batch_size=None,
        fn_kwargs={
            "epoch_rows": epoch_rows,
            "reader": UnitReader.of(plan),
            "t": cfg.transform,
            "decode_rows": cfg.decode_rows,
            "epoch": epoch,
        },  # fmt: skip
        num_cpus=1,
    )
    ds.context.execution_options.preserve_order = True  # the order is the seeded shuffle
    return ds
