"""The project's one table reader: streaming rows of captions (or any text columns, such as
image paths) in a fixed order, in bounded memory. Stage one embeds from it, stage two lists
image tables through it (store.images), eval reads benchmark tables and JSON lines with it.

Every format is read as a sequence of rows, each a key plus the requested caption columns:

- **parquet**: one file, or a directory of ``*.parquet``. Only the requested columns are read
  (``ParquetFile.iter_batches(columns=...)``), so an img2dataset Parquet shard's ``jpg`` bytes
  are never touched unless ``jpg`` itself is asked for.
- **jsonl**: one JSON object per line (``.jsonl``, ``.ndjson``, ``.json``, each optionally
  ``.gz``); blank lines are skipped. Columns are the objects' top-level fields.
- **csv** / **tsv**: a header row, then data; ``,`` or tab, with CSV quoting (what
  ``pandas.to_csv`` writes), quoted values may span lines. Everything is read as text; an
  empty cell is a missing value (``None``).
- **webdataset**: img2dataset's webdataset output, a directory of ``*.tar`` (or one ``.tar``).
  Members sharing a key (``000000001.jpg/.txt/.json``) form one sample, in tar order, exactly as
  the ``webdataset`` library groups them. A sample's columns are ``key`` (the member name up to
  the first dot of its base name, or the ``.json``'s own ``key`` when it has one), ``txt`` (the
  ``.txt`` member) and every top-level field of the ``.json`` member. Image members are skipped
  by seeking past them, never read. Failed downloads are simply absent from img2dataset tars.

Format detection (``resolve_format`` with ``format="auto"``):

- a file: by extension (``.parquet``; ``.jsonl/.ndjson/.json[.gz]``; ``.csv[.gz]``;
  ``.tsv[.gz]``; ``.tar``);
- a directory (not recursive; names starting with ``.`` are ignored): if it holds any ``*.tar``
  it is webdataset. img2dataset writes a ``00000.parquet`` beside each ``00000.tar``, but that
  file lists every *input* row, failed downloads included, while the tars hold exactly the
  samples that have an image; force ``format="parquet"`` to read those Parquet files instead.
  Otherwise the directory must hold files of exactly one kind among ``*.parquet``,
  ``*.jsonl``/``*.ndjson`` (``*.json`` is not counted in a directory, as img2dataset writes
  ``*_stats.json`` there), ``*.csv``, ``*.tsv``; a mix is refused, naming what was found.

Files of a directory are read in name order, so the row order, and with it each row's index
(``CaptionBatch.start + i``), is the same on every run: the embed pipeline names its shards by
row ranges and resumes from them. Batches hold exactly ``batch_rows`` rows, except the last.
"""

from __future__ import annotations

import gzip
import itertools
import json
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from store.errors import InputError

FORMATS = ("auto", "parquet", "jsonl", "csv", "tsv", "webdataset")

# Extensions a *file* of each format may have (lower-cased name suffixes).
_FILE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "parquet": (".parquet",),
    "jsonl": (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz"),
    "csv": (".csv", ".csv.gz"),
    "tsv": (".tsv", ".tsv.gz"),
    "webdataset": (".tar",),
}
# Extensions counted when listing a *directory*; ".json" is left out because img2dataset
# writes "00000_stats.json" beside every shard.
_DIR_SUFFIXES: dict[str, tuple[str, ...]] = {
    **_FILE_SUFFIXES,
    "jsonl": (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz"),
}
_DELIMITERS = {"csv": ",", "tsv": "\t"}

# JSONL and webdataset have no schema: the columns a source offers are the fields seen in its
# first records. A requested column absent from all of them is reported as missing; past them,
# a record without the field just has a missing value.
_SCHEMA_RECORDS = 1000


@dataclass(frozen=True)
class CaptionSource:
    """Where captions come from: a file or directory, its format, and the key column.

    >>> CaptionSource(Path("data/captions.parquet"), key_column="key")  # doctest: +SKIP
    """

    path: Path
    format: str = "auto"
    key_column: str = "key"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))


@dataclass
class CaptionBatch:
    """Consecutive rows of the input: rows ``start .. start + len(keys) - 1``."""

    start: int  # 0-based index of the batch's first row in the whole input (stable across runs)
    keys: list[str]  # keys as str (ints converted with str())
    columns: dict[str, list[str | None]]  # requested caption columns; None for null or missing


# --- format detection ------------------------------------------------------------------------


def _suffix_format(name: str, suffixes: dict[str, tuple[str, ...]]) -> str | None:
    lower = name.lower()
    for fmt, endings in suffixes.items():
        if lower.endswith(endings):
            return fmt
    return None


def listing(directory: Path) -> list[Path]:
    """Files of a folder in name order, not recursive, without hidden files."""
    return sorted(
        (p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def resolve_format(path: Path, format: str = "auto") -> str:
    """The concrete format of ``path``: ``format`` itself unless it is ``"auto"``, which
    detects it (rules in the module docstring). Raises InputError for a missing path, an
    unknown format name, or a path whose format cannot be told.

    >>> resolve_format(Path("captions.parquet"))  # doctest: +SKIP
    'parquet'
    """
    path = Path(path)
    if format not in FORMATS:
        raise InputError(f"unknown caption format {format!r}; choose one of: {', '.join(FORMATS)}")
    if not path.exists():
        raise InputError(f"caption input {path} does not exist")
    if format != "auto":
        return format
    known = ", ".join(FORMATS[1:])
    if path.is_file():
        fmt = _suffix_format(path.name, _FILE_SUFFIXES)
        if fmt is None:
            raise InputError(
                f"cannot tell the format of {path} from its extension; name it .parquet, "
                f".jsonl, .csv, .tsv or .tar, or set the format explicitly (one of: {known})"
            )
        return fmt
    kinds = {_suffix_format(p.name, _DIR_SUFFIXES) for p in listing(path)} - {None}
    if "webdataset" in kinds:
        return "webdataset"  # tars win over img2dataset's per-shard Parquet metadata
    if len(kinds) == 1:
        return kinds.pop()
    if not kinds:
        raise InputError(
            f"no caption files in directory {path} (looked for *.tar, *.parquet, *.jsonl, "
            "*.ndjson, *.csv, *.tsv)"
        )
    raise InputError(
        f"directory {path} mixes caption formats ({', '.join(sorted(kinds))}); "
        f"set the format explicitly (one of: {known}) or point at one file"
    )


def table_format(path: Path) -> str | None:
    """The table format a file's name says (parquet, jsonl, csv, tsv), or None. ``.json`` is
    not a table here: img2dataset writes ``*_stats.json`` beside its shards."""
    fmt = _suffix_format(Path(path).name, _DIR_SUFFIXES)
    return fmt if fmt != "webdataset" else None


def _input_files(path: Path, fmt: str) -> list[Path]:
    """The files to read, in their fixed order."""
    if path.is_file():
        return [path]
    files = [p for p in listing(path) if p.name.lower().endswith(_DIR_SUFFIXES[fmt])]
    if not files:
        wanted = ", ".join("*" + s for s in _DIR_SUFFIXES[fmt])
        raise InputError(f"no {fmt} files in directory {path} (looked for {wanted})")
    return files


# --- values ----------------------------------------------------------------------------------


def _to_text(value: Any) -> str | None:
    """Strings as they are, other scalars through str(), null as None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8")  # only reached when a binary column is asked for
    return str(value)


def _is_text_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _missing_columns_error(missing: Sequence[str], where: str, found: Sequence[str]) -> InputError:
    names = ", ".join(repr(c) for c in missing)
    noun = "column" if len(missing) == 1 else "columns"
    return InputError(
        f"{noun} {names} not found in {where}; columns found: {', '.join(found) or '(none)'}"
    )


# --- Parquet -----------------------------------------------------------------------------------


def _parquet_chunks(files: list[Path], key_column: str, read: list[str], batch_rows: int):
    for file in files:
        try:
            with pq.ParquetFile(file) as pf:
                found = pf.schema_arrow.names
                missing = [c for c in read if c not in found]
                if missing:
                    raise _missing_columns_error(missing, str(file), found)
                row = 0
                for batch in pf.iter_batches(batch_size=batch_rows, columns=read):
                    values = {}
                    for name in read:
                        array = batch.column(name)
                        values[name] = array.to_pylist()
                        if not _is_text_type(array.type):
                            try:
                                values[name] = [_to_text(v) for v in values[name]]
                            except UnicodeDecodeError:
                                raise InputError(
                                    f"{file}: binary column {name!r} holds bytes that are not "
                                    "UTF-8 text; choose a text column"
                                ) from None
                    _check_keys(values[key_column], key_column, file, row, "row")
                    yield values
                    row += batch.num_rows
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"cannot read {file} as Parquet: {e}") from e


def _check_keys(keys: list, key_column: str, file: Path, row0: int, unit: str) -> None:
    """Every row needs a key: the cache and the image join are keyed by it."""
    if None in keys:
        n = row0 + keys.index(None) + 1
        raise InputError(f"{file}: {unit} {n} has no key (column {key_column!r} is empty or null)")


# --- CSV / TSV -------------------------------------------------------------------------------


@contextmanager
def _open_csv(file: Path, delimiter: str, convert: pacsv.ConvertOptions | None = None):
    """A streaming reader over ``file`` (decompressed by extension: .gz), closed on exit."""
    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    with pa.input_stream(str(file), compression="detect") as stream:
        reader = pacsv.open_csv(stream, parse_options=parse, convert_options=convert)
        with reader:
            yield reader


def _csv_header(file: Path, delimiter: str) -> list[str] | None:
    """The header's column names, or None for an empty file."""
    try:
        with _open_csv(file, delimiter) as reader:
            return reader.schema.names
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            return None
        raise


def _csv_chunks(files: list[Path], delimiter: str, key_column: str, read: list[str]):
    kind = "TSV" if delimiter == "\t" else "CSV"
    for file in files:
        try:
            found = _csv_header(file, delimiter)
            if found is None:
                continue
            missing = [c for c in read if c not in found]
            if missing:
                raise _missing_columns_error(missing, str(file), found)
            # Read as raw bytes and decode here, so invalid UTF-8 is reported with its row;
            # only the needed columns are converted. An empty cell is a missing value, and no
            # other text ("NA", "null") is taken for one: it may be a real caption.
            convert = pacsv.ConvertOptions(
                include_columns=read,
                column_types={c: pa.binary() for c in read},
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
                null_values=[""],
            )
            with _open_csv(file, delimiter, convert) as reader:
                row = 0
                for batch in reader:
                    values = {
                        name: _decode_column(batch.column(name), file, name, row) for name in read
                    }
                    _check_keys(values[key_column], key_column, file, row, "row")
                    yield values
                    row += batch.num_rows
        except (pa.ArrowException, OSError, EOFError, zlib.error) as e:
            raise InputError(f"cannot read {file} as {kind}: {e}") from e


def _decode_column(array: pa.Array, file: Path, name: str, row0: int) -> list[str | None]:
    try:
        return array.cast(pa.string()).to_pylist()
    except pa.ArrowInvalid:
        pass
    for i, value in enumerate(array.to_pylist()):
        if value is None:
            continue
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(
                f"{file}: row {row0 + i + 1} (counting data rows from 1, after the header), "
                f"column {name!r}, is not valid UTF-8 ({e.reason} at byte {e.start}); "
                "re-encode the file as UTF-8"
            ) from None
    raise InputError(f"{file}: column {name!r} is not valid UTF-8; re-encode the file as UTF-8")


# --- records: JSONL and webdataset -----------------------------------------------------------


def _jsonl_records(files: list[Path]) -> Iterator[tuple[Path, str, dict]]:
    """(file, "line N", object) for every non-blank line, streamed."""
    for file in files:
        opener = gzip.open if file.name.lower().endswith(".gz") else open
        try:
            with opener(file, "rb") as f:
                for lineno, raw in enumerate(f, start=1):
                    try:
                        # utf-8-sig on the first line drops a byte-order mark some tools write.
                        text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                    except UnicodeDecodeError as e:
                        raise InputError(
                            f"{file}: line {lineno} is not valid UTF-8 ({e.reason} at byte "
                            f"{e.start} of the line); re-encode the file as UTF-8"
                        ) from None
                    if not text.strip():
                        continue
                    try:
                        record = json.loads(text)
                    except json.JSONDecodeError as e:
                        hint = ""
                        if lineno == 1 and text.lstrip().startswith("["):
                            hint = (
                                "; JSONL needs one object per line, not one JSON array "
                                "(convert with: jq -c '.[]' FILE)"
                            )
                        raise InputError(
                            f"{file}: line {lineno} is not valid JSON ({e.msg}, column {e.colno})"
                            + hint
                        ) from None
                    if not isinstance(record, dict):
                        raise InputError(
                            f"{file}: line {lineno} is a JSON {type(record).__name__}, "
                            "not an object; JSONL needs one object per line"
                        )
                    yield file, f"line {lineno}", record
        except (OSError, EOFError, zlib.error) as e:
            raise InputError(f"cannot read {file} as JSONL: {e}") from e


def member_key(name: str) -> tuple[str, str] | None:
    """Split a tar member name into (sample key, extension) as webdataset does: the key is the
    path up to the first dot of the base name, the extension everything after it."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (directory + "/" + stem if directory else stem), ext.lower()


def _tar_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (member := tar.next()) is not None:
        yield member
        # TarFile keeps every header it reads (for random access we never use); forget them so
        # a large shard streams in constant memory.
        tar.members.clear()


def _wds_records(files: list[Path], read_txt: bool) -> Iterator[tuple[Path, str, dict]]:
    """(tar, "sample KEY", fields) for every sample, in tar order."""
    for file in files:
        try:
            # "r:" (uncompressed, seekable): image members are skipped with a seek, not read.
            with tarfile.open(file, mode="r:") as tar:
                key, sample = None, None
                for member in _tar_members(tar):
                    split = member_key(member.name) if member.isfile() else None
                    if split is None:
                        continue
                    sample_key, ext = split
                    if sample_key != key:
                        if sample is not None:
                            yield file, f"sample {key!r}", _wds_fields(key, *sample)
                        key, sample = sample_key, [None, None]  # [txt, json fields]
                    if ext == "txt" and read_txt:
                        sample[0] = _read_text_member(tar, member, file)
                    elif ext == "json":
                        sample[1] = _read_json_member(tar, member, file)
                if sample is not None:
                    yield file, f"sample {key!r}", _wds_fields(key, *sample)
        except (tarfile.TarError, OSError) as e:
            raise InputError(f"cannot read {file} as a tar file: {e}") from e


def _read_text_member(tar: tarfile.TarFile, member: tarfile.TarInfo, file: Path) -> str:
    data = tar.extractfile(member).read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{file}: member {member.name} is not valid UTF-8 ({e.reason} at byte {e.start})"
        ) from None


def _read_json_member(tar: tarfile.TarFile, member: tarfile.TarInfo, file: Path) -> dict:
    text = _read_text_member(tar, member, file)
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{file}: member {member.name} is not valid JSON ({e.msg})") from None
    if not isinstance(fields, dict):
        raise InputError(f"{file}: member {member.name} is not a JSON object")
    return fields


def _wds_fields(key: str, txt: str | None, meta: dict | None) -> dict:
    fields: dict = {"key": key}
    if txt is not None:
        fields["txt"] = txt
    for name, value in (meta or {}).items():
        if name == "key" and value is None:
            continue  # keep the key from the member name
        if name == "txt" and txt is not None:
            continue  # the .txt member is the caption img2dataset wrote
        fields[name] = value
    return fields


def _record_chunks(
    records: Iterator[tuple[Path, str, dict]],
    where: str,
    key_column: str,
    read: list[str],
    batch_rows: int,
):
    """Group schemaless records into column chunks, after checking the requested columns
    against the fields of the first records."""
    head = list(itertools.islice(records, _SCHEMA_RECORDS))
    if not head:
        return
    found = _unique(name for _, _, record in head for name in record)
    missing = [c for c in read if c not in found]
    if missing:
        scope = f"the first {len(head)} records of {where}" if len(head) > 1 else where
        raise _missing_columns_error(missing, scope, found)
    rows = itertools.chain(head, records)
    while chunk := list(itertools.islice(rows, batch_rows)):
        values: dict[str, list] = {name: [] for name in read}
        for file, position, record in chunk:
            if record.get(key_column) is None:
                raise InputError(f"{file}: {position} has no key (field {key_column!r})")
            for name in read:
                values[name].append(_to_text(record.get(name)))
        yield values


def iter_jsonl(file: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of one JSON-lines file (``.gz`` too),
    streamed; errors name the file and line (invalid UTF-8 or JSON, a line that is not an
    object)."""
    for _, position, record in _jsonl_records([Path(file)]):
        yield int(position.removeprefix("line ")), record


# --- public API --------------------------------------------------------------------------------


def _chunks(source: CaptionSource, read: list[str], batch_rows: int):
    """Column chunks (dicts name -> values, of any length) of the whole input, in order."""
    fmt = resolve_format(source.path, source.format)
    files = _input_files(source.path, fmt)
    key = source.key_column
    if fmt == "parquet":
        return _parquet_chunks(files, key, read, batch_rows)
    if fmt in _DELIMITERS:
        return _csv_chunks(files, _DELIMITERS[fmt], key, read)
    if fmt == "jsonl":
        records = _jsonl_records(files)
    else:
        records = _wds_records(files, read_txt="txt" in read)
    return _record_chunks(records, str(source.path), key, read, batch_rows)


def _rebatch(chunks, names: list[str], batch_rows: int) -> Iterator[tuple[int, dict]]:
    """Cut chunks of any length into batches of exactly ``batch_rows`` (the last may be
    shorter), so batch boundaries do not depend on files, row groups or CSV blocks."""
    start = 0
    buffer: dict[str, list] = {name: [] for name in names}
    for chunk in chunks:
        for name in names:
            buffer[name].extend(chunk[name])
        while len(buffer[names[0]]) >= batch_rows:
            yield start, {name: values[:batch_rows] for name, values in buffer.items()}
            buffer = {name: values[batch_rows:] for name, values in buffer.items()}
            start += batch_rows
    if buffer[names[0]]:
        yield start, buffer


def iter_caption_batches(
    source: CaptionSource, columns: Sequence[str], batch_rows: int = 4096
) -> Iterator[CaptionBatch]:
    """Stream ``source`` as batches of keys and the requested caption columns.

    Rows come in the same order on every run; every batch but the last has ``batch_rows``
    rows. Raises InputError naming the missing columns (and those found), or the file and
    row/line of undecodable data. An empty input yields nothing.

    >>> for batch in iter_caption_batches(CaptionSource(Path("caps.jsonl")), ["caption"], 2):
    ...     print(batch.start, batch.keys, batch.columns)  # doctest: +SKIP
    0 ['a', 'b'] {'caption': ['A red star.', None]}
    2 ['c'] {'caption': ['A blue cube.']}
    """
    if isinstance(columns, str):
        columns = [columns]
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    columns = _unique(columns)
    key = source.key_column
    read = _unique([key, *columns])
    for start, values in _rebatch(_chunks(source, read, batch_rows), read, batch_rows):
        keys = [k if isinstance(k, str) else str(k) for k in values[key]]
        yield CaptionBatch(start, keys, {name: values[name] for name in columns})


def iter_keys(source: CaptionSource, batch_rows: int = 65536) -> Iterator[list[str]]:
    """Only the keys, in the same order as ``iter_caption_batches`` (for a duplicate-key
    pre-pass): Parquet and CSV read only the key column, tars skip the ``.txt`` members."""
    for batch in iter_caption_batches(source, [], batch_rows):
        yield batch.keys


def available_columns(source: CaptionSource) -> list[str]:
    """The columns ``source`` offers: the Parquet schema or CSV header of its first file, or
    the fields of the first records of JSONL and webdataset input ([] when empty)."""
    fmt = resolve_format(source.path, source.format)
    files = _input_files(source.path, fmt)
    if fmt == "parquet":
        try:
            with pq.ParquetFile(files[0]) as pf:
                return list(pf.schema_arrow.names)
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"cannot read {files[0]} as Parquet: {e}") from e
    if fmt in _DELIMITERS:
        for file in files:
            try:
                names = _csv_header(file, _DELIMITERS[fmt])
            except (pa.ArrowException, OSError, EOFError, zlib.error) as e:
                raise InputError(f"cannot read {file} as {fmt.upper()}: {e}") from e
            if names is not None:
                return names
        return []
    records = _jsonl_records(files) if fmt == "jsonl" else _wds_records(files, read_txt=True)
    head = itertools.islice(records, _SCHEMA_RECORDS)
    return _unique(name for _, _, record in head for name in record)


def count_rows(source: CaptionSource) -> int | None:
    """The number of rows when it is cheap to know (Parquet footers), else None."""
    fmt = resolve_format(source.path, source.format)
    if fmt != "parquet":
        return None
    total = 0
    for file in _input_files(source.path, fmt):
        try:
            with pq.ParquetFile(file) as pf:
                total += pf.metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"cannot read {file} as Parquet: {e}") from e
    return total
