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
  by seeking past them, never read. img2dataset leaves most failed downloads out of its tars;
  a sample whose ``.json`` status is not ``"success"`` is one too (see the rules below).

Format detection (``resolve_format`` with ``format="auto"``):

- a file: by extension (``.parquet``; ``.jsonl/.ndjson/.json[.gz]``; ``.csv[.gz]``;
  ``.tsv[.gz]``; ``.tar``);
- a directory (not recursive; names starting with ``.`` are ignored): if it holds any ``*.tar``
  it is webdataset. img2dataset writes a ``00000.parquet`` beside each ``00000.tar``, but that
  file lists every *input* row, failed downloads included (their ``status`` says so), while
  the tars hold the samples that have an image; force ``format="parquet"`` to read those
  Parquet files instead.
  Otherwise the directory must hold files of exactly one kind among ``*.parquet``,
  ``*.jsonl``/``*.ndjson`` (``*.json`` is not counted in a directory, as img2dataset writes
  ``*_stats.json`` there), ``*.csv``, ``*.tsv``; a mix is refused, naming what was found.

Files of a directory are read in name order, so the row order, and with it each row's index
(``CaptionBatch.start + i``), is the same on every run: the embed pipeline names its shards by
row ranges and resumes from them. Batches hold exactly ``batch_rows`` rows, except the last.

One rule for values, in every format and for every reader of this module (captions, image
tables, benchmark tables):

- **Keys** are the identity of a row: a key is a non-empty string or an integer (not a
  boolean); an integer becomes ``str(int)`` in decimal (``7`` -> ``"7"``, so ``7`` and ``"7"``
  are the same key; ``"007"`` stays ``"007"``). Anything else -- null, ``""``, a float (NaN
  too, and ``1.0``), a boolean, a list, an object, bytes -- is refused (``InputError``) naming
  the file, the row or line, the column and the value's type; a Parquet key column whose type
  is neither text nor integer is refused up front.
- **Text values** (captions, image paths) are strings; null or missing is ``None``. A Parquet
  column whose type is not text (``string``, ``large_string``, ``string_view``, a dictionary of
  them, ``binary`` holding UTF-8, or ``null``) is refused up front, naming column and type. In
  schemaless formats (JSONL, a webdataset ``.json``) a value that is not a string arrives as a
  ``NotText`` naming its JSON type: never a text, never its repr. Readers treat it like a
  missing value with a reason (``embed`` skips and counts it, an image table counts it as a
  sample without an image, an eval table refuses it).
- **Empty inputs** are refused the same way in every format: a single 0-byte file ``is empty
  (0 bytes)``; an input with no rows at all (a CSV header only, a zero-row Parquet, JSONL of
  blank lines, a tar without samples, a folder whose files hold none) ``has no rows``. Inside a
  folder, a 0-byte file is skipped (it holds no rows).
- **Ambiguous names**: a requested column that a CSV header or Parquet schema names twice is
  refused (which one was meant?); so is a JSON object naming a field twice.
- **img2dataset failures**: a Parquet ``status`` column or a webdataset ``.json`` ``status``
  field is img2dataset's verdict; a row whose status is not ``"success"`` (null too, in
  Parquet) is a failed download and ``CaptionBatch.failed`` holds its status (a Parquet file
  without ``status`` but with an image bytes column (``jpg``, ``png``, ...): a null image is
  a failure, ``"no image"``). Rows stay in the stream (row indices do not change); consumers
  skip them.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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


@dataclass(frozen=True)
class NotText:
    """A value of a schemaless record that is not a string (a JSON number, boolean, array or
    object): never embedded, never stringified. ``type`` is its JSON type name."""

    type: str

    def __str__(self) -> str:
        return f"<{self.type}, not text>"


@dataclass
class CaptionBatch:
    """Consecutive rows of the input: rows ``start .. start + len(keys) - 1``."""

    start: int  # 0-based index of the batch's first row in the whole input (stable across runs)
    keys: list[str]  # non-empty strings (integer keys as str(int)); see the module's key rule
    columns: dict[str, list[str | NotText | None]]  # requested columns; None: null or missing
    # img2dataset status of each row that is a failed download (not "success"), else None
    failed: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.failed:
            self.failed = [None] * len(self.keys)


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
    """The files to read, in their fixed order. A 0-byte file holds no rows: alone it is
    refused as empty; in a folder it is passed over (a folder of nothing but such files is
    refused as having no rows)."""
    if path.is_file():
        if path.stat().st_size == 0:
            raise InputError(f"{path} is empty (0 bytes)")
        return [path]
    files = [p for p in listing(path) if p.name.lower().endswith(_DIR_SUFFIXES[fmt])]
    if not files:
        wanted = ", ".join("*" + s for s in _DIR_SUFFIXES[fmt])
        raise InputError(f"no {fmt} files in directory {path} (looked for {wanted})")
    nonempty = [p for p in files if p.stat().st_size > 0]
    if not nonempty:
        raise InputError(f"{path} has no rows: its {len(files)} {fmt} file(s) are empty (0 bytes)")
    return nonempty


# --- values: the one rule for keys and text (module docstring) ----------------------------------

# An internal column every chunk carries beside the requested ones: each row's img2dataset
# status when it is a failed download, else None. The NUL keeps it from meeting a real name.
_STATUS = "\0status"
# img2dataset names its Parquet image-bytes column after the encode format.
IMAGE_BYTES_COLUMNS = ("jpg", "png", "webp", "jpeg", "image")


def json_type(value: Any) -> str:
    """A value's JSON type name, as a user sees it in the file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    for kind, name in ((int, "integer"), (float, "float"), (str, "string"), (list, "array"),
                       (dict, "object"), (bytes, "bytes")):  # fmt: skip
        if isinstance(value, kind):
            return name
    return type(value).__name__


def record_text(value: Any) -> str | NotText | None:
    """A schemaless record's value as a text: strings as they are, null as None, anything
    else a NotText (never its repr)."""
    if value is None or isinstance(value, str):
        return value
    return NotText(json_type(value))


_KEY_RULE = "every row needs a key: a non-empty string or an integer"


def _key_error(file: Path, position: str, column: str, value: Any) -> InputError:
    if value is None or value == "":
        what = "is missing or null" if value is None else "is an empty string"
        return InputError(f"{file}: {position} has no key ({column!r} {what}); {_KEY_RULE}")
    kind = json_type(value)
    shown = f" {json.dumps(value)}" if isinstance(value, bool | float) else ""
    article = "an" if kind[0] in "aeiou" else "a"
    return InputError(
        f"{file}: {position}: key {column!r} is {article} {kind}{shown}, not a string or an "
        f"integer; {_KEY_RULE}"
    )


def record_key(value: Any, file: Path, position: str, column: str) -> str:
    """A schemaless record's key by the key rule: the string itself, str(int) for an integer;
    InputError for anything else (null, "", float, boolean, array, object)."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise _key_error(file, position, column, value)


def _base_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_text_type(t: pa.DataType) -> bool:
    t = _base_type(t)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_binary_type(t: pa.DataType) -> bool:
    t = _base_type(t)
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _check_column_types(schema: pa.Schema, file: Path, key_column: str, read: list[str]) -> None:
    """A Parquet file's requested columns against the rules, before a row is read."""
    for name in read:
        t = schema.field(name).type
        if name == key_column:
            check_key_type(t, file, name)
        elif not (_is_text_type(t) or _is_binary_type(t) or pa.types.is_null(t)):
            raise InputError(
                f"{file}: column {name!r} is of type {t}, not text; a caption or path column "
                "must hold strings (cast it, or choose another column)"
            )


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _check_names(read: Sequence[str], found: Sequence[str], where: str) -> None:
    """Every requested column is present, and present once."""
    missing = [c for c in read if c not in found]
    if missing:
        raise _missing_columns_error(missing, where, found)
    twice = [c for c in read if found.count(c) > 1]
    if twice:
        raise InputError(
            f"{where} names column {twice[0]!r} {found.count(twice[0])} times; which one is "
            "meant is ambiguous: rename the others"
        )


def _missing_columns_error(missing: Sequence[str], where: str, found: Sequence[str]) -> InputError:
    names = ", ".join(repr(c) for c in missing)
    noun = "column" if len(missing) == 1 else "columns"
    return InputError(
        f"{noun} {names} not found in {where}; columns found: {', '.join(found) or '(none)'}"
    )


# --- Parquet -----------------------------------------------------------------------------------


def check_key_type(t: pa.DataType, file: Path, column: str) -> None:
    """A Parquet key column must be text or integer (the key rule)."""
    if not (_is_text_type(t) or pa.types.is_integer(_base_type(t))):
        raise InputError(
            f"{file}: key column {column!r} is of type {t}, not text or integer; "
            f"{_KEY_RULE} (cast the column, or choose another key column)"
        )


def parquet_keys(array: pa.Array, file: Path, column: str, row0: int) -> list[str]:
    """A Parquet key column's values by the key rule (``row0``: the 0-based row of
    ``array[0]`` in ``file``, for the message): str, integers in decimal; InputError naming
    the row of a null or empty key."""
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    bad = pc.is_null(array)
    if _is_text_type(array.type):
        bad = pc.or_(bad, pc.equal(pc.fill_null(array, "x"), ""))
    if pc.any(bad).as_py():
        i = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
        raise _key_error(file, f"row {row0 + i + 1}", column, array[i].as_py())
    return array.cast(pa.string()).to_pylist()  # integers: decimal str(int)


def _parquet_text(array: pa.Array, file: Path, name: str) -> list[str | None]:
    if pa.types.is_null(array.type):
        return [None] * len(array)
    values = array.to_pylist()
    if _is_binary_type(array.type):
        try:
            return [None if v is None else v.decode("utf-8") for v in values]
        except UnicodeDecodeError:
            raise InputError(
                f"{file}: binary column {name!r} holds bytes that are not UTF-8 text; "
                "choose a text column"
            ) from None
    return values


def _failure_columns(pf: pq.ParquetFile) -> tuple[str | None, str | None]:
    """(status column, image-bytes column) to read for img2dataset failures; the image column
    only when there is no status and the footer's statistics do not rule nulls out (reading
    image bytes to find nulls is the expensive fallback)."""
    schema = pf.schema_arrow
    if "status" in schema.names and _is_text_type(schema.field("status").type):
        return "status", None
    for name in IMAGE_BYTES_COLUMNS:
        if name in schema.names and _is_binary_type(schema.field(name).type):
            i = pf.schema_arrow.get_field_index(name)
            meta = pf.metadata
            for g in range(meta.num_row_groups):
                stats = meta.row_group(g).column(i).statistics
                if stats is None or not stats.has_null_count or stats.null_count > 0:
                    return None, name
            return None, None
    return None, None


def _parquet_failures(batch: pa.RecordBatch, status: str | None, image: str | None) -> list:
    if status is not None:
        return [
            None if v == "success" else ("status null" if v is None else v)
            for v in batch.column(status).to_pylist()
        ]
    if image is not None:
        missing = pc.is_null(batch.column(image)).to_numpy(zero_copy_only=False)
        return ["no image" if m else None for m in missing]
    return [None] * batch.num_rows


def _parquet_chunks(files: list[Path], key_column: str, read: list[str], batch_rows: int):
    for file in files:
        try:
            with pq.ParquetFile(file) as pf:
                schema = pf.schema_arrow
                _check_names(read, schema.names, str(file))
                _check_column_types(schema, file, key_column, read)
                status, image = _failure_columns(pf)
                extra = [c for c in (status, image) if c is not None and c not in read]
                row = 0
                for batch in pf.iter_batches(batch_size=batch_rows, columns=read + extra):
                    values = {
                        name: _parquet_text(batch.column(name), file, name)
                        for name in read
                        if name != key_column
                    }
                    values[key_column] = parquet_keys(
                        batch.column(key_column), file, key_column, row
                    )
                    values[_STATUS] = _parquet_failures(batch, status, image)
                    yield values
                    row += batch.num_rows
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"cannot read {file} as Parquet: {e}") from e


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


def _unclosed_quote(file: Path, delimiter: str) -> int | None:
    """The line on which a quoted value opens that never closes, or None.

    With quoted values allowed to span lines, such a quote silently swallows the rest of the
    file into one value. Well-formed CSV has an even number of ``"`` (inside quotes they are
    doubled), so one cheap pass counts them; only an odd count is followed by a scan that
    tells an unclosed quote from a stray ``"`` inside an unquoted value (``5" screen``),
    which is read literally."""
    odd = False
    with pa.input_stream(str(file), compression="detect") as stream:
        while chunk := stream.read(1 << 20):
            odd ^= chunk.count(b'"') % 2 == 1
    if not odd:
        return None
    line, quoted, field_start, just_closed, opened = 1, False, True, False, 0
    with pa.input_stream(str(file), compression="detect") as stream:
        while chunk := stream.read(1 << 20):
            for byte in chunk:
                if quoted:
                    if byte == 0x22:  # '"': closes, or is the first of an escaped '""'
                        quoted, just_closed = False, True
                    elif byte == 0x0A:
                        line += 1
                    continue
                if byte == 0x22:
                    if field_start or just_closed:
                        quoted, opened = True, opened if just_closed else line
                    field_start = just_closed = False
                    continue
                just_closed = False
                if byte == 0x0A:
                    line, field_start = line + 1, True
                elif byte == ord(delimiter):
                    field_start = True
                elif byte != 0x0D:
                    field_start = False
    return opened if quoted else None


def _csv_chunks(files: list[Path], delimiter: str, key_column: str, read: list[str]):
    kind = "TSV" if delimiter == "\t" else "CSV"
    for file in files:
        try:
            found = _csv_header(file, delimiter)
            if found is None:
                continue
            _check_names(read, found, str(file))
            line = _unclosed_quote(file, delimiter)
            if line is not None:
                raise InputError(
                    f"{file}: the quoted value opened on line {line} is never closed (it would "
                    'run to the end of the file); close it, or write a literal quote as ""'
                )
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
                    keys = values[key_column]
                    if None in keys:  # an empty cell: text is never an integer or "" here
                        n = row + keys.index(None) + 1
                        raise _key_error(file, f"row {n}", key_column, None)
                    values[_STATUS] = [None] * batch.num_rows
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


class _DuplicateField(ValueError):
    pass


def _object_once(pairs: list[tuple[str, Any]]) -> dict:
    """json.loads' object hook: an object naming a field twice is refused (Python's json
    would keep the last silently)."""
    record = dict(pairs)
    if len(record) != len(pairs):
        seen = set()
        name = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateField(name)
    return record


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
                        record = json.loads(text, object_pairs_hook=_object_once)
                    except _DuplicateField as e:
                        raise InputError(
                            f"{file}: line {lineno} names field {str(e)!r} twice; which value "
                            "is meant is ambiguous: keep one"
                        ) from None
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
                            f"{file}: line {lineno} is a JSON {json_type(record)}, "
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


def tar_members(tar: tarfile.TarFile, file: Path) -> Iterator[tarfile.TarInfo]:
    """The members of an open tar, streamed, each checked to lie inside the file: members
    whose data is seeked over (images) would otherwise hide a truncated tar, which reads as
    a shorter one."""
    size = os.fstat(tar.fileobj.fileno()).st_size
    again = "copy or download it again"
    while (member := tar.next()) is not None:
        if member.offset_data + member.size > size:
            raise InputError(
                f"{file} is truncated: member {member.name} runs past the end of the file "
                f"({size} bytes); {again}"
            )
        yield member
        # TarFile keeps every header it reads (for random access we never use); forget them so
        # a large shard streams in constant memory.
        tar.members.clear()
    # tarfile also ends quietly at a header cut short; a whole tar ends with two zero blocks.
    if size - tar.offset < 2 * tarfile.BLOCKSIZE:
        raise InputError(
            f"{file} is truncated: it ends without the tar end-of-archive blocks; {again}"
        )


def _wds_records(files: list[Path], read_txt: bool) -> Iterator[tuple[Path, str, dict]]:
    """(tar, "sample KEY", fields) for every sample, in tar order."""
    for file in files:
        try:
            # "r:" (uncompressed, seekable): image members are skipped with a seek, not read.
            with tarfile.open(file, mode="r:") as tar:
                key, sample = None, None
                for member in tar_members(tar, file):
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
        fields = json.loads(text, object_pairs_hook=_object_once)
    except _DuplicateField as e:
        raise InputError(f"{file}: member {member.name} names field {str(e)!r} twice") from None
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
    status_field: bool,
):
    """Group schemaless records into column chunks, after checking the requested columns
    against the fields of the first records. ``status_field``: a record's ``status`` is
    img2dataset's (webdataset ``.json``)."""
    head = list(itertools.islice(records, _SCHEMA_RECORDS))
    if not head:
        return
    found = _unique(name for _, _, record in head for name in record)
    missing = [c for c in read if c not in found]
    if missing:
        raise _missing_columns_error(missing, _records_scope(where, len(head)), found)
    rows = itertools.chain(head, records)
    while chunk := list(itertools.islice(rows, batch_rows)):
        values: dict[str, list] = {name: [] for name in [*read, _STATUS]}
        for file, position, record in chunk:
            for name in read:
                value = record.get(name)
                if name == key_column:
                    values[name].append(record_key(value, file, position, name))
                else:
                    values[name].append(record_text(value))
            status = record.get("status", "success") if status_field else "success"
            values[_STATUS].append(None if status == "success" else str(status))
        yield values


def _records_scope(where: str, n: int) -> str:
    """Where a schemaless input's columns were looked for (its first records only)."""
    if n < _SCHEMA_RECORDS:
        return where
    return (
        f"the first {n} records of {where} (a field that first appears later is not seen: "
        "put a record that has every field first)"
    )


def iter_jsonl(file: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of one JSON-lines file (``.gz`` too),
    streamed; errors name the file and line (invalid UTF-8 or JSON, a line that is not an
    object)."""
    for _, position, record in _jsonl_records([Path(file)]):
        yield int(position.removeprefix("line ")), record


# --- public API --------------------------------------------------------------------------------


def _chunks(source: CaptionSource, read: list[str], batch_rows: int):
    """Column chunks (dicts name -> values, of any length, with ``_STATUS``) of the whole
    input, in order."""
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
    return _record_chunks(
        records, str(source.path), key, read, batch_rows, status_field=fmt == "webdataset"
    )


_NO_ROWS = {
    "parquet": "0 rows",
    "csv": "a header and no data rows",
    "tsv": "a header and no data rows",
    "jsonl": "only blank lines",
    "webdataset": "no samples",
}


def _no_rows_error(source: CaptionSource) -> InputError:
    fmt = resolve_format(source.path, source.format)
    return InputError(f"{source.path} has no rows ({_NO_ROWS[fmt]})")


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
    rows. Raises InputError naming the missing columns (and those found), the file and
    row/line of an invalid key or undecodable data, a column of the wrong type, or an input
    that is empty or has no rows (the rules are in the module docstring).

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
    rows = 0
    for start, values in _rebatch(_chunks(source, read, batch_rows), [*read, _STATUS], batch_rows):
        keys = values[key]
        rows += len(keys)
        yield CaptionBatch(start, keys, {name: values[name] for name in columns}, values[_STATUS])
    if rows == 0:
        raise _no_rows_error(source)


def iter_keys(source: CaptionSource, batch_rows: int = 65536) -> Iterator[list[str]]:
    """Only the keys, in the same order as ``iter_caption_batches`` (for a duplicate-key
    pre-pass): Parquet and CSV read only the key column, tars skip the ``.txt`` members. Keys
    are checked by the key rule on the way, so a pre-pass refuses a bad key early."""
    for batch in iter_caption_batches(source, [], batch_rows):
        yield batch.keys


def available_columns(source: CaptionSource) -> list[str]:
    """The columns ``source`` offers: the Parquet schema or CSV header of its first file, or
    the fields of the first records of JSONL and webdataset input. An input without a header
    or a record is refused (empty, or no rows)."""
    return _available(source)[0]


def _available(source: CaptionSource) -> tuple[list[str], str]:
    """(columns, where they were looked for)."""
    fmt = resolve_format(source.path, source.format)
    files = _input_files(source.path, fmt)
    if fmt == "parquet":
        try:
            with pq.ParquetFile(files[0]) as pf:
                return list(pf.schema_arrow.names), str(files[0])
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"cannot read {files[0]} as Parquet: {e}") from e
    if fmt in _DELIMITERS:
        for file in files:
            try:
                names = _csv_header(file, _DELIMITERS[fmt])
            except (pa.ArrowException, OSError, EOFError, zlib.error) as e:
                raise InputError(f"cannot read {file} as {fmt.upper()}: {e}") from e
            if names is not None:
                return names, str(file)
        raise _no_rows_error(source)
    records = _jsonl_records(files) if fmt == "jsonl" else _wds_records(files, read_txt=True)
    head = list(itertools.islice(records, _SCHEMA_RECORDS))
    if not head:
        raise _no_rows_error(source)
    found = _unique(name for _, _, record in head for name in record)
    return found, _records_scope(str(source.path), len(head))


def require_columns(source: CaptionSource, names: Sequence[str], hint: str = "") -> None:
    """InputError unless ``source`` offers every column of ``names`` (for JSONL and
    webdataset: among the fields of its first records, and the message says so)."""
    found, where = _available(source)
    missing = [c for c in _unique(names) if c not in found]
    if missing:
        raise InputError(str(_missing_columns_error(missing, where, found)) + hint)


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
