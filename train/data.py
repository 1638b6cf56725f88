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

Inputs (``DataConfig.images``; ``image_format="auto"`` detects, as embed/inputs.py does)
    webdataset  img2dataset tars (a folder of ``*.tar``, or one): members ``{key}.jpg|png|webp``;
                failed samples are absent, and counted from the ``{shard}.parquet`` metadata
                img2dataset writes beside each tar (``status != "success"``).
    parquet     img2dataset Parquet shards: ``key`` and the image bytes in ``jpg`` (or ``png``,
                ``webp``, ``image``); a null image or ``status != "success"`` is a failed sample.
    files       a folder of image files, flat or one level of shard folders (img2dataset
                ``files``: ``00000/000000001.jpg``); the key is the name up to its first dot.
                Failures are counted from img2dataset's ``*.parquet`` metadata in the folder.
    csv         a table of ``key_column`` + ``image_column`` (paths relative to the table's
                folder, or absolute): a CSV/TSV/JSONL/Parquet file, or a folder holding exactly
                one such table with that column (eval/retrieval/: images/ + captions.parquet).
    Folder detection order: any ``*.tar`` → webdataset; a ``*.parquet`` with a binary image
    column → parquet; one table with ``image_column`` → csv; image files → files.

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

import hashlib
import io
import math
import os
import random
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from store.cache import Cache
from store.errors import CacheError, InputError
from store.format import SCALE_SUFFIX, decode_vectors

IMAGE_FORMATS = ("auto", "webdataset", "parquet", "files", "csv")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# img2dataset names the Parquet bytes column after its encode format.
BYTES_COLUMNS = ("jpg", "png", "webp", "jpeg", "image")
TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".jsonl", ".ndjson", ".parquet")
IMAGE_BYTES = "image_bytes"  # the column decode_batch decodes (and drops)
KEY_SAMPLE = 5  # keys shown per side when nothing joins
AMPLIFICATION_WARNING = 32.0


@dataclass
class DataConfig:
    """What to read and how to augment it.

    images:       img2dataset output (tars, Parquet with image bytes, files), or a table of
                  key + image path (a CSV file, or a folder holding one); see the module doc.
    cache:        the stage-one cache to join by key: a folder, or a URI (s3://bucket/path).
    cache_filesystem: a ``pyarrow.fs.FileSystem`` holding ``cache`` (default: from the URI).
    facets:       vector names, in the order of the ``text`` rows' K axis (default: all).
    image_size:   output side H = W.
    crop_scale / crop_ratio: RandomResizedCrop's area fraction and aspect-ratio ranges
                  (FLAME: scale 0.9-1.0); ``train=False`` resizes the shorter side and takes
                  the centre instead.
    mean / std:   per-channel normalisation of [0, 1] pixels (CLIP's by default).
    seed:         order and augmentation; with the epoch, fixes every pixel of every batch.
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
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
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
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise InputError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise InputError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise InputError("mean and std need 3 values each (R, G, B), std > 0")
        for name in ("image_size", "unit_rows", "decode_rows"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")


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


# --- decoding: pure, no Ray ---------------------------------------------------------------------


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """A sample's augmentation generator: a function of (seed, epoch, key) only."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, right, bottom): an area fraction in
    ``scale`` and a log-uniform aspect ratio in ``ratio``; 10 tries, then a centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            return x, y, x + w, y + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


def center_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square of the shorter side: resize-shorter-side + centre-crop in one box."""
    side = min(width, height)
    x, y = (width - side) // 2, (height - side) // 2
    return x, y, x + side, y + side


def _decode_one(data: bytes, cfg: DataConfig, rng: random.Random) -> np.ndarray:
    """uint8 [S, S, 3]; raises on anything unreadable."""
    size = cfg.image_size
    img = Image.open(io.BytesIO(data))
    if cfg.train:
        # The smallest crop side is about sqrt(min scale * min aspect) of the image's side;
        # JPEG DCT scaling may shrink the image while that crop still covers `size` pixels.
        shortest = math.sqrt(cfg.crop_scale[0] * min(cfg.crop_ratio[0], 1 / cfg.crop_ratio[1]))
        need = math.ceil(size / shortest)
    else:
        need = size
    img.draft("RGB", (need, need))  # a no-op for PNG/WebP
    img = img.convert("RGB")  # forces the full decode: truncated data raises here
    w, h = img.size
    if cfg.train:
        box = random_resized_crop_box(w, h, cfg.crop_scale, cfg.crop_ratio, rng)
    else:
        box = center_box(w, h)
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=box))


def _normalizer(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) with (x / 255 - mean) / std == x * scale - shift, per channel."""
    scale = (1.0 / (255.0 * np.asarray(cfg.std, np.float32)))[:, None, None]
    shift = (np.asarray(cfg.mean, np.float32) / np.asarray(cfg.std, np.float32))[:, None, None]
    return scale, shift


def eval_transform(image: Image.Image, cfg: DataConfig) -> np.ndarray:
    """A PIL image -> normalised float32 [3, S, S], exactly as evaluation decodes image bytes
    (centre square, bicubic resize): inference on exported towers uses this."""
    size = cfg.image_size
    img = image.convert("RGB")
    pixels = np.asarray(
        img.resize((size, size), Image.Resampling.BICUBIC, box=center_box(*img.size))
    )
    scale, shift = _normalizer(cfg)
    out = pixels.transpose(2, 0, 1).astype(np.float32)
    out *= scale
    out -= shift
    return out


def decode_batch(batch: dict[str, Any], cfg: DataConfig, epoch: int = 0) -> dict[str, Any]:
    """Decode ``batch[IMAGE_BYTES]`` (JPEG/PNG/WebP bytes, or None) into normalised float32
    images [n, 3, S, S]: RandomResizedCrop when ``cfg.train``, else a centre resize.

    Pure (what ``map_batches`` calls; testable without Ray). Every other column passes through.
    Each sample's crop comes from ``sample_rng(cfg.seed, epoch, key)``. Bytes that cannot be
    decoded (corrupt, truncated, None) never raise: that row gets ``valid=False`` and zeros.

    >>> out = decode_batch({"key": ["a"], IMAGE_BYTES: [jpeg]}, DataConfig(...))  # doctest: +SKIP
    >>> out["image"].shape, out["valid"]
    ((1, 3, 64, 64), array([ True]))
    """
    keys = [str(k) for k in batch["key"]]
    blobs = batch[IMAGE_BYTES]
    # (x / 255 - mean) / std as one multiply and one subtract, in place, image by image:
    # a whole-batch expression would allocate several float temporaries of the batch's size.
    scale, shift = _normalizer(cfg)
    images = np.zeros((len(keys), 3, cfg.image_size, cfg.image_size), np.float32)
    valid = np.zeros(len(keys), bool)
    for i, (key, data) in enumerate(zip(keys, blobs, strict=True)):
        if data is None:
            continue
        try:
            pixels = _decode_one(bytes(data), cfg, sample_rng(cfg.seed, epoch, key))
        except Exception:  # noqa: BLE001
            # Decoders raise many types on bad bytes (OSError, ValueError, SyntaxError, EOFError,
            # struct.error, DecompressionBombError...); one bad image must never stop a run.
            continue  # the row stays valid=False and is counted downstream
        image = images[i]
        image[...] = pixels.transpose(2, 0, 1)  # channels first, as timm expects
        image *= scale
        image -= shift
        valid[i] = True
    out = {k: v for k, v in batch.items() if k != IMAGE_BYTES}
    out["image"] = images
    out["valid"] = valid
    return out


def drop_invalid(batch: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The batch without its ``valid=False`` rows, and how many were dropped (numpy arrays,
    torch tensors, or lists in the columns)."""
    valid = batch["valid"]
    mask = np.asarray(valid.cpu() if hasattr(valid, "cpu") else valid, dtype=bool)
    dropped = int((~mask).sum())
    if not dropped:
        return batch, 0
    index = np.flatnonzero(mask)
    out = {}
    for name, column in batch.items():
        if isinstance(column, list):
            out[name] = [column[i] for i in index]
        elif hasattr(column, "cpu"):  # a torch tensor, possibly on the GPU
            out[name] = column[valid.to(column.device).bool()]
        else:
            out[name] = column[mask]
    return out, dropped


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


# --- scanning keys: pure pyarrow, no Ray ---------------------------------------------------------


def _listing(folder: Path) -> list[Path]:
    """Files of a folder in name order, not recursive, without hidden files."""
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _with_suffix(files: list[Path], suffixes: Sequence[str]) -> list[Path]:
    return [p for p in files if p.name.lower().endswith(tuple(suffixes))]


def _bytes_column(path: Path) -> str | None:
    """The image-bytes column of a Parquet file, or None."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"cannot read {path} as Parquet: {e}") from None
    for name in BYTES_COLUMNS:
        if name in schema.names:
            t = schema.field(name).type
            if pa.types.is_binary(t) or pa.types.is_large_binary(t):
                return name
    return None


def _table_columns(path: Path) -> list[str]:
    from embed.inputs import CaptionSource, available_columns

    try:
        return available_columns(CaptionSource(path))
    except InputError:
        return []


def resolve_image_format(cfg: DataConfig) -> str:
    """The concrete format of ``cfg.images`` (rules in the module docstring)."""
    path = cfg.images
    if not path.exists():
        raise InputError(f"image input {path} does not exist")
    if cfg.image_format != "auto":
        return cfg.image_format
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".tar"):
            return "webdataset"
        if name.endswith(".parquet") and _bytes_column(path):
            return "parquet"
        if name.endswith(TABLE_SUFFIXES):
            return "csv"
        raise InputError(
            f"cannot tell the image format of {path}; give a .tar, an img2dataset .parquet, "
            "a .csv/.tsv/.jsonl/.parquet table, or a folder, or set image_format"
        )
    files = _listing(path)
    if _with_suffix(files, [".tar"]):
        return "webdataset"
    parquets = _with_suffix(files, [".parquet"])
    if any(_bytes_column(p) for p in parquets):
        return "parquet"
    tables = [
        p for p in _with_suffix(files, TABLE_SUFFIXES) if cfg.image_column in _table_columns(p)
    ]
    if len(tables) == 1:
        return "csv"
    if len(tables) > 1:
        raise InputError(
            f"{path} holds several tables with column {cfg.image_column!r} "
            f"({', '.join(p.name for p in tables)}); point at one of them"
        )
    if next(_image_files(path), None) is not None:
        return "files"
    raise InputError(
        f"no images found in {path}: looked for *.tar, Parquet with a {'/'.join(BYTES_COLUMNS)} "
        f"bytes column, a table with column {cfg.image_column!r}, and image files "
        f"({', '.join(IMAGE_SUFFIXES)})"
    )


def _member_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member, as webdataset splits it (embed/inputs.py does too)."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (directory + "/" + stem if directory else stem), "." + ext.lower()


def _failed_in_metadata(parquets: list[Path]) -> int:
    """img2dataset failures recorded in its per-shard metadata Parquet (status column)."""
    failed = 0
    for path in parquets:
        try:
            if "status" not in pq.read_schema(path).names:
                continue
            status = pq.read_table(path, columns=["status"]).column("status")
        except (OSError, pa.ArrowException):
            continue
        succeeded = pc.sum(pc.equal(status, "success")).as_py() or 0  # null status: a failure
        failed += len(status) - succeeded
    return failed


IMAGE_ROWS = pa.schema(
    [
        ("key", pa.string()),
        ("src", pa.int32()),  # index into the plan's sources (-1: a path)
        ("a", pa.int64()),  # tar: data offset; Parquet: row group
        ("b", pa.int64()),  # tar: data size; Parquet: row within the group
        ("path", pa.string()),  # files and csv
    ]
)


def _image_rows(keys, src: int = -1, a=None, b=None, paths=None) -> pa.Table:
    """One chunk of the image side's scan: compact Arrow columns, not Python objects."""
    n = len(keys)
    zeros = np.zeros(n, np.int64)
    return pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "src": pa.array(np.full(n, src, np.int32)),
            "a": pa.array(zeros if a is None else np.asarray(a, np.int64)),
            "b": pa.array(zeros if b is None else np.asarray(b, np.int64)),
            "path": pa.array([None] * n if paths is None else paths, pa.string()),
        },
        schema=IMAGE_ROWS,
    )


def _concat(chunks: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(chunks) if chunks else IMAGE_ROWS.empty_table()


def _scan_webdataset(path: Path) -> tuple[pa.Table, list[str], int]:
    tars = [path] if path.is_file() else _with_suffix(_listing(path), [".tar"])
    chunks = []
    for src, tar_path in enumerate(tars):
        keys, offsets, sizes = [], [], []
        try:
            # "r:" is seekable: headers are read, image data is seeked over, never read.
            with tarfile.open(tar_path, mode="r:") as tar:
                while (member := tar.next()) is not None:
                    tar.members.clear()  # constant memory over a large shard
                    split = _member_key(member.name) if member.isfile() else None
                    if split and split[1] in IMAGE_SUFFIXES:
                        keys.append(split[0])
                        offsets.append(member.offset_data)
                        sizes.append(member.size)
        except (tarfile.TarError, OSError) as e:
            raise InputError(f"cannot read {tar_path} as a tar file: {e}") from None
        chunks.append(_image_rows(keys, src, offsets, sizes))
    metadata = [t.with_suffix(".parquet") for t in tars if t.with_suffix(".parquet").is_file()]
    return _concat(chunks), [str(t) for t in tars], _failed_in_metadata(metadata)


def _scan_parquet(path: Path, key_column: str) -> tuple[pa.Table, list[str], int, str, dict]:
    files = [path] if path.is_file() else _with_suffix(_listing(path), [".parquet"])
    files = [p for p in files if _bytes_column(p)]
    column = _bytes_column(files[0]) if files else None
    if column is None:
        raise InputError(f"no Parquet file in {path} has an image bytes column ({BYTES_COLUMNS})")
    chunks, failed, group_rows = [], 0, {}
    for src, file in enumerate(files):
        try:
            pf = pq.ParquetFile(file)
            names = pf.schema_arrow.names
            if key_column not in names or _bytes_column(file) != column:
                raise InputError(
                    f"{file} lacks column {key_column!r} or image bytes column {column!r} "
                    f"(has {', '.join(names)})"
                )
            for g in range(pf.metadata.num_row_groups):
                group_rows[(src, g)] = pf.metadata.row_group(g).num_rows
                if "status" in names:  # img2dataset's own verdict: no need to read any bytes
                    t = pf.read_row_group(g, columns=[key_column, "status"])
                    ok = pc.fill_null(pc.equal(t.column("status"), "success"), False)
                else:
                    t = pf.read_row_group(g, columns=[key_column, column])
                    ok = pc.is_valid(t.column(column))
                ok = pc.and_(ok, pc.is_valid(t.column(key_column))).to_numpy(zero_copy_only=False)
                rows = np.flatnonzero(ok)
                keys = t.column(key_column).cast(pa.string()).take(pa.array(rows))
                chunks.append(_image_rows(keys, src, np.full(len(rows), g), rows))
                failed += len(ok) - len(rows)
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"cannot read {file} as Parquet: {e}") from None
    return _concat(chunks), [str(f) for f in files], failed, column, group_rows


def _image_files(folder: Path) -> Iterator[Path]:
    """Image files of a folder and of its sub-folders, in name order (img2dataset `files`)."""
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                yield Path(root) / name


def _scan_files(path: Path) -> tuple[pa.Table, int]:
    paths = [str(f) for f in _image_files(path)]
    keys = [Path(p).name.partition(".")[0] for p in paths]
    failed = _failed_in_metadata(_with_suffix(_listing(path), [".parquet"]))
    return _image_rows(keys, paths=paths), failed


def _scan_table(path: Path, cfg: DataConfig) -> tuple[pa.Table, int]:
    from embed.inputs import CaptionSource, iter_caption_batches

    if path.is_dir():
        tables = [
            p
            for p in _with_suffix(_listing(path), TABLE_SUFFIXES)
            if cfg.image_column in _table_columns(p)
        ]
        if len(tables) != 1:
            raise InputError(
                f"{path} needs exactly one table (csv/tsv/jsonl/parquet) with column "
                f"{cfg.image_column!r}; found {len(tables)}"
            )
        path = tables[0]
    chunks, failed = [], 0
    source = CaptionSource(path, key_column=cfg.key_column)
    for batch in iter_caption_batches(source, [cfg.image_column], batch_rows=65536):
        named = [
            (key, rel)
            for key, rel in zip(batch.keys, batch.columns[cfg.image_column], strict=True)
            if rel
        ]
        failed += len(batch.keys) - len(named)  # no image named: like a failed download
        keys = [key for key, _ in named]
        # Paths are relative to the table's folder; an absolute path stays as it is.
        chunks.append(_image_rows(keys, paths=[str(path.parent / rel) for _, rel in named]))
    return _concat(chunks), failed


def _dedupe(table: pa.Table) -> tuple[pa.Table, int]:
    """Keep the first row of each key; the number of rows dropped."""
    if pc.count_distinct(table.column("key")).as_py() == table.num_rows:
        return table, 0
    indexed = table.append_column("_i", pa.array(np.arange(table.num_rows)))
    first = indexed.group_by("key", use_threads=False).aggregate([("_i", "min")])
    keep = pc.sort_indices(first.column("_i_min"))
    kept = table.take(pc.take(first.column("_i_min"), keep))
    return kept, table.num_rows - kept.num_rows


def _scan_cache(cache: Cache) -> pa.Table:
    """key, shard, rg, row of every cache row (the key column only)."""
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

    fmt = resolve_image_format(cfg)
    sources: list[str] = []
    bytes_column, group_rows = None, {}
    if fmt == "webdataset":
        rows, sources, failed = _scan_webdataset(cfg.images)
    elif fmt == "parquet":
        rows, sources, failed, bytes_column, group_rows = _scan_parquet(cfg.images, cfg.key_column)
    elif fmt == "files":
        rows, failed = _scan_files(cfg.images)
    else:
        rows, failed = _scan_table(cfg.images, cfg)
    images, duplicates = _dedupe(rows)
    del rows
    cached, _ = _dedupe(_scan_cache(cache))  # the embed pipeline writes each key once

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
        failed_images=failed,
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
    reads = _reads_per_row(joined, group_rows) if fmt == "parquet" else 1.0
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
        sources=sources,
        bytes_column=bytes_column,
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
class _ReadSpec:
    """What a task needs besides its rows: small and picklable."""

    cache_paths: list[str]
    facets: list[str]
    dtype: str
    image_format: str
    sources: list[str]
    bytes_column: str | None
    cache_filesystem: Any = None


def _read_vectors(
    spec: _ReadSpec, shard: int, rg: int, rows: np.ndarray, keys: list[str]
) -> np.ndarray:
    """float32 [n, K, D] of ``rows`` of one cache row group, checked against ``keys``."""
    columns = ["key", *spec.facets]
    if spec.dtype == "int8":
        columns += [f + SCALE_SUFFIX for f in spec.facets]
    path = spec.cache_paths[shard]
    try:
        pf = pq.ParquetFile(path, filesystem=spec.cache_filesystem)
        table = pf.read_row_group(rg, columns=columns).take(pa.array(rows))
    except (OSError, pa.ArrowException) as e:
        raise CacheError(f"cannot read {path} ({e}); run `facetclip verify` on its cache") from None
    if table.column("key").to_pylist() != keys:
        raise CacheError(f"{path} changed since the join was planned; plan again (restart the run)")
    return np.stack([decode_vectors(table, f, spec.dtype) for f in spec.facets], axis=1)


def _read_images(spec: _ReadSpec, rows: pa.Table) -> list[bytes | None]:
    """The encoded bytes of each row's image (None where it cannot be read)."""
    out: list[bytes | None] = [None] * rows.num_rows
    if spec.image_format in ("files", "csv"):
        for i, path in enumerate(rows.column("path").to_pylist()):
            try:
                with open(path, "rb") as f:
                    out[i] = f.read()
            except OSError:
                pass  # a missing or unreadable file is an invalid row, counted downstream
        return out
    src = rows.column("src").to_numpy()
    a, b = rows.column("a").to_numpy(), rows.column("b").to_numpy()
    if spec.image_format == "webdataset":
        for s in np.unique(src):
            idx = np.flatnonzero(src == s)
            with open(spec.sources[s], "rb") as f:
                for i in idx[np.argsort(a[idx])]:  # in file order: sequential reads
                    out[i] = os.pread(f.fileno(), int(b[i]), int(a[i]))
        return out
    # Parquet: one read of the bytes column per (file, row group) this unit touches.
    for s, g in {(int(x), int(y)) for x, y in zip(src, a, strict=True)}:
        idx = np.flatnonzero((src == s) & (a == g))
        column = pq.ParquetFile(spec.sources[s]).read_row_group(g, columns=[spec.bytes_column])
        values = column.column(0).take(pa.array(b[idx])).to_pylist()
        for i, v in zip(idx, values, strict=True):
            out[i] = v
    return out


def _load_unit(
    rows: pa.Table, spec: _ReadSpec, cfg: DataConfig, epoch: int
) -> Iterator[dict[str, np.ndarray]]:
    """Join a sub-unit's rows (one cache row group) to their vectors and images, decode, and
    yield blocks of ``decode_rows`` rows in the planned order."""
    shard, rg = rows.column("shard").to_numpy(), rows.column("rg").to_numpy()
    starts = np.r_[0, np.flatnonzero((np.diff(shard) != 0) | (np.diff(rg) != 0)) + 1, len(shard)]
    for lo, hi in zip(starts[:-1], starts[1:], strict=True):  # one run unless planned otherwise
        run = rows.slice(lo, hi - lo)
        keys = run.column("key").to_pylist()
        text = _read_vectors(spec, int(shard[lo]), int(rg[lo]), run.column("row").to_numpy(), keys)
        blobs = _read_images(spec, run)
        for i in range(0, len(keys), cfg.decode_rows):
            j = i + cfg.decode_rows
            yield decode_batch(
                {
                    "key": np.array(keys[i:j], dtype=object),
                    IMAGE_BYTES: blobs[i:j],
                    "text": text[i:j],
                },
                cfg,
                epoch,
            )


def _load_units(
    batch: dict[str, np.ndarray], epoch_rows: list, spec: _ReadSpec, cfg: DataConfig, epoch: int
) -> Iterator[dict[str, np.ndarray]]:
    """Ray's map_batches UDF over sub-unit ids; ``epoch_rows`` holds the ref of this rank's
    (plan rows in epoch order, sub-unit boundaries), read zero-copy from the object store."""
    import ray

    rows, cuts = ray.get(epoch_rows[0])
    for u in batch["id"]:
        yield from _load_unit(rows.slice(cuts[u], cuts[u + 1] - cuts[u]), spec, cfg, epoch)


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
    spec = _ReadSpec(
        cache_paths=plan.cache_paths,
        facets=plan.facets,
        dtype=plan.dtype,
        image_format=plan.image_format,
        sources=plan.sources,
        bytes_column=plan.bytes_column,
        cache_filesystem=plan.cache_filesystem,
    )
    # The epoch's rows go to the object store once; the dataset itself is the sub-unit ids,
    # one block (one task) each, so a task reads one cache row group. (``from_arrow`` of one
    # table per sub-unit costs ~7 ms per table on the driver: 30 s an epoch for 3M rows.)
    units = len(cuts) - 1
    epoch_rows = [ray.put((rows, cuts))]
    ds = ray.data.range(units, override_num_blocks=max(1, units)).map_batches(
        _load_units,
        batch_size=None,
        fn_kwargs={"epoch_rows": epoch_rows, "spec": spec, "cfg": cfg, "epoch": epoch},
        num_cpus=1,
    )
    ds.context.execution_options.preserve_order = True  # the order is the seeded shuffle
    return ds
