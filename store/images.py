"""Image inputs: what a dataset's images are, which keys they have, and their bytes — the one
reader both stage two (training) and evaluation use. No decoding here (that is
train.transforms): this module only finds, lists and reads encoded bytes.

Formats (``image_format``; ``"auto"`` detects, in this order for a folder):
    webdataset  img2dataset tars (a folder of ``*.tar``, or one): members ``{key}.jpg|png|webp``;
                failed samples are absent, and counted from the ``{shard}.parquet`` metadata
                img2dataset writes beside each tar (``status != "success"``).
    parquet     img2dataset Parquet shards: ``key`` and the image bytes in ``jpg`` (or ``png``,
                ``webp``, ``image``); a null image or ``status != "success"`` is a failed sample.
    csv         a table of ``key_column`` + ``image_column`` (paths relative to the table's
                folder, or absolute): a CSV/TSV/JSONL/Parquet file, or a folder holding exactly
                one such table with that column (eval/retrieval/: images/ + captions.parquet).
    files       a folder of image files, flat or one level of shard folders (img2dataset
                ``files``: ``00000/000000001.jpg``); the key is the name up to its first dot.
                Failures are counted from img2dataset's ``*.parquet`` metadata in the folder.

A scan (``scan_images``) returns one compact Arrow row per image — its key and a locator
(tar member data offset + size, read from the tar headers with the data seeked over; Parquet
file / row group / row; a file path) — so any image can later be read on its own
(``read_image_bytes``) without listing the dataset again.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from store.errors import InputError
from store.tables import (
    CaptionSource,
    available_columns,
    iter_caption_batches,
    listing,
    member_key,
    table_format,
)

IMAGE_FORMATS = ("auto", "webdataset", "parquet", "files", "csv")
# torchvision's IMG_EXTENSIONS: what ImageFolder (and so every benchmark layout) counts as an
# image; img2dataset writes .jpg/.png/.webp.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# img2dataset names the Parquet bytes column after its encode format.
BYTES_COLUMNS = ("jpg", "png", "webp", "jpeg", "image")

IMAGE_ROWS = pa.schema(
    [
        ("key", pa.string()),
        ("src", pa.int32()),  # index into the scan's sources (-1: a path)
        ("a", pa.int64()),  # tar: data offset; Parquet: row group
        ("b", pa.int64()),  # tar: data size; Parquet: row within the group
        ("path", pa.string()),  # files and csv
    ]
)


@dataclass
class ImageScan:
    """Every image of a dataset as a locator row (``IMAGE_ROWS``), in the dataset's order.

    failed: img2dataset failures (absent from tars, null bytes, ``status != "success"``, no
    path in a table); sources: the tar or Parquet files ``src`` indexes; group_rows: rows of
    each (Parquet source, row group), for read-amplification estimates.
    """

    rows: pa.Table
    image_format: str
    sources: list[str] = field(default_factory=list)
    failed: int = 0
    bytes_column: str | None = None
    group_rows: dict = field(default_factory=dict)


def is_image(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


def image_files(folder: Path) -> Iterator[Path]:
    """Image files of a folder and of its sub-folders, in name order (img2dataset `files`)."""
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                yield Path(root) / name


def _with_suffix(files: list[Path], suffixes: Sequence[str]) -> list[Path]:
    return [p for p in files if p.name.lower().endswith(tuple(suffixes))]


def bytes_column(path: Path) -> str | None:
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


def _tables_with(files: list[Path], column: str) -> list[Path]:
    """The tables among ``files`` that have ``column``."""
    found = []
    for p in files:
        if table_format(p) is None:
            continue
        try:
            if column in available_columns(CaptionSource(p)):
                found.append(p)
        except InputError:
            continue  # not a readable table: not ours to complain about here
    return found


def resolve_image_format(
    path: Path, image_format: str = "auto", image_column: str = "image"
) -> str:
    """The concrete format of ``path`` (rules in the module docstring)."""
    path = Path(path)
    if image_format not in IMAGE_FORMATS:
        raise InputError(
            f"unknown image format {image_format!r}; choose one of: {', '.join(IMAGE_FORMATS)}"
        )
    if not path.exists():
        raise InputError(f"image input {path} does not exist")
    if image_format != "auto":
        return image_format
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".tar"):
            return "webdataset"
        if name.endswith(".parquet") and bytes_column(path):
            return "parquet"
        if table_format(path) is not None:
            return "csv"
        raise InputError(
            f"cannot tell the image format of {path}; give a .tar, an img2dataset .parquet, "
            "a .csv/.tsv/.jsonl/.parquet table, or a folder, or set image_format"
        )
    files = listing(path)
    if _with_suffix(files, [".tar"]):
        return "webdataset"
    if any(bytes_column(p) for p in _with_suffix(files, [".parquet"])):
        return "parquet"
    tables = _tables_with(files, image_column)
    if len(tables) == 1:
        return "csv"
    if len(tables) > 1:
        raise InputError(
            f"{path} holds several tables with column {image_column!r} "
            f"({', '.join(p.name for p in tables)}); point at one of them"
        )
    if next(image_files(path), None) is not None:
        return "files"
    raise InputError(
        f"no images found in {path}: looked for *.tar, Parquet with a {'/'.join(BYTES_COLUMNS)} "
        f"bytes column, a table with column {image_column!r}, and image files "
        f"({', '.join(IMAGE_SUFFIXES)})"
    )


def failed_in_metadata(parquets: list[Path]) -> int:
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


def _image_rows(keys, src: int = -1, a=None, b=None, paths=None) -> pa.Table:
    """One chunk of a scan: compact Arrow columns, not Python objects."""
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


def _scan_webdataset(path: Path) -> ImageScan:
    tars = [path] if path.is_file() else _with_suffix(listing(path), [".tar"])
    chunks = []
    for src, tar_path in enumerate(tars):
        keys, offsets, sizes = [], [], []
        try:
            # "r:" is seekable: headers are read, image data is seeked over, never read.
            with tarfile.open(tar_path, mode="r:") as tar:
                while (member := tar.next()) is not None:
                    tar.members.clear()  # constant memory over a large shard
                    split = member_key(member.name) if member.isfile() else None
                    if split and "." + split[1] in IMAGE_SUFFIXES:
                        keys.append(split[0])
                        offsets.append(member.offset_data)
                        sizes.append(member.size)
        except (tarfile.TarError, OSError) as e:
            raise InputError(f"cannot read {tar_path} as a tar file: {e}") from None
        chunks.append(_image_rows(keys, src, offsets, sizes))
    metadata = [t.with_suffix(".parquet") for t in tars if t.with_suffix(".parquet").is_file()]
    return ImageScan(_concat(chunks), "webdataset", [str(t) for t in tars],
                     failed_in_metadata(metadata))  # fmt: skip


def _scan_parquet(path: Path, key_column: str) -> ImageScan:
    files = [path] if path.is_file() else _with_suffix(listing(path), [".parquet"])
    files = [p for p in files if bytes_column(p)]
    column = bytes_column(files[0]) if files else None
    if column is None:
        raise InputError(f"no Parquet file in {path} has an image bytes column ({BYTES_COLUMNS})")
    chunks, failed, group_rows = [], 0, {}
    for src, file in enumerate(files):
        try:
            pf = pq.ParquetFile(file)
            names = pf.schema_arrow.names
            if key_column not in names or bytes_column(file) != column:
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
    return ImageScan(_concat(chunks), "parquet", [str(f) for f in files], failed, column,
                     group_rows)  # fmt: skip


def _scan_files(path: Path) -> ImageScan:
    paths = [str(f) for f in image_files(path)]
    keys = [Path(p).name.partition(".")[0] for p in paths]
    failed = failed_in_metadata(_with_suffix(listing(path), [".parquet"]))
    return ImageScan(_image_rows(keys, paths=paths), "files", failed=failed)


def _scan_table(path: Path, key_column: str, image_column: str) -> ImageScan:
    if path.is_dir():
        tables = _tables_with(listing(path), image_column)
        if len(tables) != 1:
            raise InputError(
                f"{path} needs exactly one table (csv/tsv/jsonl/parquet) with column "
                f"{image_column!r}; found {len(tables)}"
            )
        path = tables[0]
    chunks, failed = [], 0
    source = CaptionSource(path, key_column=key_column)
    for batch in iter_caption_batches(source, [image_column], batch_rows=65536):
        named = [
            (key, rel)
            for key, rel in zip(batch.keys, batch.columns[image_column], strict=True)
            if rel
        ]
        failed += len(batch.keys) - len(named)  # no image named: like a failed download
        keys = [key for key, _ in named]
        # Paths are relative to the table's folder; an absolute path stays as it is.
        chunks.append(_image_rows(keys, paths=[str(path.parent / rel) for _, rel in named]))
    return ImageScan(_concat(chunks), "csv", failed=failed)


def scan_images(
    path: Path, image_format: str = "auto", key_column: str = "key", image_column: str = "image"
) -> ImageScan:
    """Every image's key and locator, in the dataset's order (duplicates kept; see
    ``first_of_each_key``). Keys only: no image is read, tar data is seeked over."""
    path = Path(path)
    fmt = resolve_image_format(path, image_format, image_column)
    if fmt == "webdataset":
        return _scan_webdataset(path)
    if fmt == "parquet":
        return _scan_parquet(path, key_column)
    if fmt == "files":
        return _scan_files(path)
    return _scan_table(path, key_column, image_column)


def first_of_each_key(table: pa.Table) -> tuple[pa.Table, int]:
    """``table`` with only the first row of each ``key``, in order; and the rows dropped."""
    if pc.count_distinct(table.column("key")).as_py() == table.num_rows:
        return table, 0
    indexed = table.append_column("_i", pa.array(np.arange(table.num_rows)))
    first = indexed.group_by("key", use_threads=False).aggregate([("_i", "min")])
    keep = pc.sort_indices(first.column("_i_min"))
    kept = table.take(pc.take(first.column("_i_min"), keep))
    return kept, table.num_rows - kept.num_rows


def read_image_bytes(
    rows: pa.Table, image_format: str, sources: Sequence[str], bytes_column: str | None
) -> list[bytes | None]:
    """The encoded bytes of each locator row's image (None where it cannot be read: a missing
    or unreadable file is a bad sample, counted downstream, never an exception)."""
    out: list[bytes | None] = [None] * rows.num_rows
    if image_format in ("files", "csv"):
        for i, path in enumerate(rows.column("path").to_pylist()):
            try:
                with open(path, "rb") as f:
                    out[i] = f.read()
            except OSError:
                pass
        return out
    src = rows.column("src").to_numpy()
    a, b = rows.column("a").to_numpy(), rows.column("b").to_numpy()
    if image_format == "webdataset":
        for s in np.unique(src):
            idx = np.flatnonzero(src == s)
            with open(sources[s], "rb") as f:
                for i in idx[np.argsort(a[idx])]:  # in file order: sequential reads
                    out[i] = os.pread(f.fileno(), int(b[i]), int(a[i]))
        return out
    # Parquet: one read of the bytes column per (file, row group) these rows touch.
    for s, g in {(int(x), int(y)) for x, y in zip(src, a, strict=True)}:
        idx = np.flatnonzero((src == s) & (a == g))
        column = pq.ParquetFile(sources[s]).read_row_group(g, columns=[bytes_column])
        values = column.column(0).take(pa.array(b[idx])).to_pylist()
        for i, v in zip(idx, values, strict=True):
            out[i] = v
    return out
