"""SQL over a cache with DuckDB: read-only views, confined to the cache directory.

``connect(CACHE)`` gives an in-memory DuckDB database with two views:

- ``embeddings``: one row per caption — ``key``, the caption text columns, one ``FLOAT[D]``
  column per vector name (float16 upcast; int8 dequantised with its ``<name>__scale``), the
  ``tokens__<column>`` counts, ``truncated``, and ``shard`` (the file the row lives in).
- ``skipped``: input rows that were not embedded — ``key``, ``input_row``, ``reason``, ``shard``.

Both read exactly the files the manifest lists (never a glob, which could pick up a shard a
running ``embed`` has not finished). Vectors are ``FLOAT[D]`` arrays, so DuckDB's array
functions apply directly::

    facetclip sql CACHE "SELECT a.key, b.key,
                                array_cosine_similarity(a.main_object, b.main_object) AS cos
                         FROM embeddings a JOIN embeddings b ON a.key < b.key
                         ORDER BY cos DESC LIMIT 10"

Confinement. A query may read the cache and nothing else, and may write nothing:

1. Only read statements run: ``SELECT`` (with ``WITH``, ``FROM``-first, ``VALUES``, ``DESCRIBE``,
   ``SHOW``, ``SUMMARIZE``) and ``EXPLAIN [ANALYZE]`` of one. ``COPY``, ``EXPORT``, ``ATTACH``,
   ``CREATE``, ``INSERT``, ``SET``, ``INSTALL``/``LOAD``, ``PRAGMA``, ``CALL`` … are refused
   before DuckDB sees them. This check is what stops writes *inside* the cache:
   ``allowed_directories`` grants read and write alike, so without it ``COPY … TO 'CACHE/x'``
   would succeed (and ``EXPLAIN ANALYZE COPY …`` executes its COPY).
2. DuckDB's own sandbox, set after the views are made: ``allowed_directories`` = the cache,
   ``enable_external_access = false`` (no other file, URL, extension install/load or Python
   replacement scan), ``autoinstall/autoload_known_extensions = false``,
   ``allow_community_extensions = false``, then ``lock_configuration = true`` so no later
   statement can undo any of it.
3. Spilling: a query bigger than memory spills to ``temp_directory``, which DuckDB otherwise
   puts at ``./.tmp`` (the user's working directory), outside any sandbox. Each connection
   gets a private folder instead (``mkdtemp``: mode 0700, under ``$TMPDIR``), removed with the
   connection; the setting is locked with the rest.

Results come back as a pyarrow Table; ``write_result`` writes them as csv / JSON Lines /
Parquet with our own code (not DuckDB's COPY), so ``--output`` can go anywhere while queries
stay confined.

Example queries (``EXAMPLE_QUERIES``; written for the ``flame``/``flame-long`` facet names,
``example_queries(CACHE)`` adapts them to a cache's own names)::

    -- similar_pairs: the 10 most similar pairs of captions on one facet
    SELECT a.key AS key_a, b.key AS key_b,
           array_cosine_similarity(a.main_object, b.main_object) AS cosine,
           a.long_caption AS caption_a, b.long_caption AS caption_b
    FROM embeddings a JOIN embeddings b ON a.key < b.key
    ORDER BY cosine DESC LIMIT 10

    -- facet_cosine: how alike two facets of the same caption are
    SELECT avg(c) AS mean_cosine, min(c) AS min_cosine, max(c) AS max_cosine
    FROM (SELECT array_cosine_similarity(main_object, description) AS c FROM embeddings)

    -- nn_agreement: how often a caption's nearest neighbour is the same on two facets
    WITH pairs AS (
        SELECT a.key, b.key AS other,
               array_cosine_similarity(a.main_object, b.main_object) AS cos_a,
               array_cosine_similarity(a.description, b.description) AS cos_b
        FROM embeddings a JOIN embeddings b ON a.key <> b.key),
    nn AS (SELECT key, arg_max(other, cos_a) AS nn_a, arg_max(other, cos_b) AS nn_b
           FROM pairs GROUP BY key)
    SELECT avg((nn_a = nn_b)::INTEGER) AS agreement, count(*) AS captions FROM nn

    -- near_duplicates: pairs that are nearly the same vector, or the same text
    SELECT a.key AS key_a, b.key AS key_b,
           array_cosine_similarity(a.description, b.description) AS cosine,
           a.long_caption = b.long_caption AS same_text, a.long_caption AS caption
    FROM embeddings a JOIN embeddings b ON a.key < b.key
    WHERE array_cosine_similarity(a.description, b.description) > 0.98
       OR a.long_caption = b.long_caption
    ORDER BY cosine DESC

    -- shards: rows, truncated captions and caption length per shard
    SELECT shard, count(*) AS rows, sum(truncated::INTEGER) AS truncated,
           avg(tokens__long_caption) AS mean_tokens
    FROM embeddings GROUP BY shard ORDER BY shard

    -- skipped_reasons: why input rows were not embedded
    SELECT reason, count(*) AS rows FROM skipped GROUP BY reason ORDER BY rows DESC

The self-joins are quadratic in the number of captions: fine for thousands, slow for millions
(add ``USING SAMPLE 5000`` to a subquery, or use ``facetclip neighbors`` for one caption).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import weakref
from pathlib import Path
from typing import IO

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from store.cache import Cache
from store.errors import FacetclipError
from store.format import SCALE_SUFFIX, TOKENS_PREFIX

OUTPUT_FORMATS = ("table", "csv", "json", "parquet")

EXAMPLE_QUERIES: dict[str, str] = {
    "similar_pairs": """\
SELECT a.key AS key_a, b.key AS key_b,
       array_cosine_similarity(a.main_object, b.main_object) AS cosine,
       a.long_caption AS caption_a, b.long_caption AS caption_b
FROM embeddings a JOIN embeddings b ON a.key < b.key
ORDER BY cosine DESC LIMIT 10""",
    "facet_cosine": """\
SELECT avg(c) AS mean_cosine, min(c) AS min_cosine, max(c) AS max_cosine
FROM (SELECT array_cosine_similarity(main_object, description) AS c FROM embeddings)""",
    "nn_agreement": """\
WITH pairs AS (
    SELECT a.key, b.key AS other,
           array_cosine_similarity(a.main_object, b.main_object) AS cos_a,
           array_cosine_similarity(a.description, b.description) AS cos_b
    FROM embeddings a JOIN embeddings b ON a.key <> b.key),
nn AS (SELECT key, arg_max(other, cos_a) AS nn_a, arg_max(other, cos_b) AS nn_b
       FROM pairs GROUP BY key)
SELECT avg((nn_a = nn_b)::INTEGER) AS agreement, count(*) AS captions FROM nn""",
    "near_duplicates": """\
SELECT a.key AS key_a, b.key AS key_b,
       array_cosine_similarity(a.description, b.description) AS cosine,
       a.long_caption = b.long_caption AS same_text, a.long_caption AS caption
FROM embeddings a JOIN embeddings b ON a.key < b.key
WHERE array_cosine_similarity(a.description, b.description) > 0.98
   OR a.long_caption = b.long_caption
ORDER BY cosine DESC""",
    "shards": """\
SELECT shard, count(*) AS rows, sum(truncated::INTEGER) AS truncated,
       avg(tokens__long_caption) AS mean_tokens
FROM embeddings GROUP BY shard ORDER BY shard""",
    "skipped_reasons": """\
SELECT reason, count(*) AS rows FROM skipped GROUP BY reason ORDER BY rows DESC""",
}

# Statement types that only read. DESCRIBE, SHOW, SUMMARIZE, VALUES and FROM-first queries all
# parse as SELECT. PRAGMA and CALL are refused: IMPORT DATABASE parses as a PRAGMA, and every
# read-only pragma has a table-function form (`SELECT * FROM pragma_table_info('embeddings')`).
_READ_TYPES = {duckdb.StatementType.SELECT}
_EXPLAIN = re.compile(r"^\s*EXPLAIN\b\s*(?:ANALY[SZ]E\b)?", re.IGNORECASE)
_OPTIONS = re.compile(r"^\s*\([^()]*\)")


class SQLError(FacetclipError):
    """A query that cannot run: not a read, reaching outside the cache, or invalid SQL."""


def _literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _parquet_source(paths: list[Path], **options: str) -> str:
    extra = "".join(f", {k} = {v}" for k, v in options.items())
    return f"read_parquet([{', '.join(_literal(str(p)) for p in paths)}]{extra})"


def _token_columns(cache: Cache) -> list[str]:
    """``tokens__<column>`` names, from the first shard (or the recipe when there is none)."""
    if cache.shard_paths:
        names = pq.read_schema(cache.shard_paths[0]).names
        return [n for n in names if n.startswith(TOKENS_PREFIX)]
    columns = dict.fromkeys(g["column"] for g in cache.recipe.get("groups", []))
    return [TOKENS_PREFIX + c for c in columns]


def _vector_expr(name: str, dim: int, dtype: str) -> str:
    col = _ident(name)
    if dtype == "int8":
        # q * scale, element-wise; the TINYINT * FLOAT product is FLOAT.
        scale = _ident(name + SCALE_SUFFIX)
        return f"list_transform({col}, lambda x: x * {scale})::FLOAT[{dim}] AS {col}"
    # Parquet fixed-size lists come back as FLOAT[] (float16 upcast); the cast makes them
    # FLOAT[D] so array_cosine_similarity & co. accept them.
    return f"{col}::FLOAT[{dim}] AS {col}"


def _embeddings_view(cache: Cache) -> str:
    layout = cache.manifest.layout
    dim, dtype = int(layout["dim"]), layout["dtype"]
    texts = list(layout.get("text_columns", []))
    tokens = _token_columns(cache)
    if not cache.shard_paths:
        # No finished shard yet: an empty view with the right columns and types.
        cols = [f"NULL::VARCHAR AS {_ident(c)}" for c in ["key", *texts]]
        cols += [f"NULL::FLOAT[{dim}] AS {_ident(n)}" for n in layout["vector_names"]]
        cols += [f"NULL::INTEGER AS {_ident(c)}" for c in tokens]
        cols += ["NULL::BOOLEAN AS truncated", "NULL::VARCHAR AS shard"]
        return f"SELECT {', '.join(cols)} WHERE false"
    cols = [_ident(c) for c in ["key", *texts]]
    cols += [_vector_expr(n, dim, dtype) for n in layout["vector_names"]]
    cols += [_ident(c) for c in tokens]
    cols += ["truncated", "parse_filename(filename) AS shard"]
    return f"SELECT {', '.join(cols)} FROM {_parquet_source(cache.shard_paths, filename='true')}"


def _skipped_view(cache: Cache) -> str:
    paths = [p for p in cache.skipped_paths if p.is_file()]
    if not paths:
        return (
            "SELECT NULL::VARCHAR AS key, NULL::BIGINT AS input_row, NULL::VARCHAR AS reason, "
            "NULL::VARCHAR AS shard WHERE false"
        )
    return (
        "SELECT key, input_row, reason, parse_filename(filename) AS shard "
        f"FROM {_parquet_source(paths, filename='true')}"
    )


def connect(cache_path: str | Path, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with views ``embeddings`` and ``skipped`` over a cache,
    confined to reading that cache (see the module docstring). ``memory_limit`` (e.g.
    ``"2GB"``; default DuckDB's 80% of RAM) bounds memory; past it, queries spill to the
    connection's private temp folder.

    The confinement of files and settings is DuckDB's own; the read-only statement check is
    not — pass queries through ``check_read_only`` (``run_query`` does).

    >>> con = connect("cache")
    >>> con.sql("SELECT count(*) FROM embeddings").fetchall()
    """
    cache = Cache.open(cache_path)
    # DuckDB matches allowed directories by path prefix: give it the real path, and read the
    # shards by real paths too, so a symlinked cache works and `..` cannot step outside.
    root = cache.root.resolve()
    cache = Cache(root, cache.recipe, cache.manifest)
    con = duckdb.connect(":memory:")
    spill = tempfile.mkdtemp(prefix="facetclip-sql-")
    weakref.finalize(con, shutil.rmtree, spill, ignore_errors=True)  # gone with the connection
    limit = [f"SET memory_limit = {_literal(memory_limit)}"] if memory_limit else []
    try:
        con.execute(f"CREATE VIEW embeddings AS {_embeddings_view(cache)}")
        con.execute(f"CREATE VIEW skipped AS {_skipped_view(cache)}")
        for setting in (
            # Before external access is disabled, which forbids changing it.
            f"SET temp_directory = {_literal(spill)}",
            *limit,
            f"SET allowed_directories = [{_literal(str(root) + os.sep)}]",
            "SET enable_external_access = false",
            "SET autoinstall_known_extensions = false",
            "SET autoload_known_extensions = false",
            "SET allow_community_extensions = false",
            # Last: nothing after this, from us or a query, can change the settings above.
            "SET lock_configuration = true",
        ):
            con.execute(setting)
    except duckdb.Error as e:
        con.close()
        raise SQLError(
            f"cannot open {cache_path} for SQL ({e}); run `facetclip verify {cache_path}`"
        ) from None
    return con


def _refuse(what: str) -> SQLError:
    return SQLError(
        f"queries are read-only and confined to the cache: {what} is not allowed "
        "(run a SELECT; write results with --format csv|json|parquet --output FILE)"
    )


def _is_select(sql: str) -> bool:
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error:
        return False
    return len(statements) == 1 and statements[0].type in _READ_TYPES


def check_read_only(query: str) -> None:
    """Raise ``SQLError`` unless ``query`` is one statement that only reads."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise SQLError(str(e)) from None
    if not statements:
        raise SQLError("the query is empty; try: SELECT * FROM embeddings LIMIT 5")
    if len(statements) > 1:
        raise SQLError(f"run one statement at a time (got {len(statements)})")
    st = statements[0]
    if st.type in _READ_TYPES:
        return
    if st.type == duckdb.StatementType.EXPLAIN:
        # EXPLAIN ANALYZE executes its statement, so what is explained must be a read too.
        # The text after EXPLAIN [ANALYZE] is either the statement or `(options) statement`;
        # accept it only when one of those readings is a single SELECT.
        rest = _EXPLAIN.sub("", st.query, count=1)
        if _is_select(rest) or _is_select(_OPTIONS.sub("", rest, count=1)):
            return
        raise _refuse("EXPLAIN of a statement that is not a SELECT")
    raise _refuse(f"a {st.type.name} statement")


def _unique_names(names: list[str]) -> list[str]:
    """Repeated column names (``SELECT a.*, b.*``) made unique: the first keeps its name, later
    ones get the first free ``name_2``, ``name_3`` … (JSON objects cannot repeat a key)."""
    taken = set(names)
    seen: set[str] = set()
    out = []
    for n in names:
        if n in seen:
            i = 2
            while f"{n}_{i}" in taken:
                i += 1
            n = f"{n}_{i}"
            taken.add(n)
        seen.add(n)
        out.append(n)
    return out


def run_query(
    cache_path: str | Path, query: str, con: duckdb.DuckDBPyConnection | None = None
) -> pa.Table:
    """Run one read-only query over a cache and return its result.

    ``con`` reuses a connection from ``connect`` (several queries, one set of views).

    >>> run_query("cache", "SELECT key, tokens__long_caption FROM embeddings LIMIT 3")
    """
    check_read_only(query)
    own = con is None
    if own:
        con = connect(cache_path)
    try:
        table = con.sql(query).to_arrow_table()
    except duckdb.PermissionException as e:
        raise SQLError(f"queries are read-only and confined to the cache: {e}") from None
    except duckdb.InvalidInputException as e:
        if "configuration has been locked" in str(e):
            raise SQLError(f"queries are read-only and confined to the cache: {e}") from None
        raise SQLError(str(e)) from None
    except duckdb.Error as e:
        raise SQLError(str(e)) from None
    finally:
        if own:
            con.close()
    names = _unique_names(table.column_names)
    return table.rename_columns(names) if names != table.column_names else table


# --- output -----------------------------------------------------------------------------


def _is_vector(t: pa.DataType) -> bool:
    return (pa.types.is_fixed_size_list(t) or pa.types.is_list(t)) and pa.types.is_floating(
        t.value_type
    )


def _jsonable(v):
    """A Python value from ``to_pylist`` as something ``json.dumps`` writes as valid JSON."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None  # JSON has no NaN/Infinity
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        # A map arrives as a list of (key, value) tuples; keep it a list of pairs.
        return [_jsonable(x) for x in v]
    if isinstance(v, bytes):
        return v.hex()
    if v is None or isinstance(v, (bool, int, str)):
        return v
    return str(v)  # dates, times, decimals, intervals, UUIDs


def _write_csv(table: pa.Table, out: IO[str]) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(table.column_names)
    for batch in table.to_batches():
        for row in zip(*(c.to_pylist() for c in batch.columns), strict=True):
            writer.writerow([_csv_cell(v) for v in row])


def _csv_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # the shortest text that reads back to the same number
    if isinstance(v, (list, tuple, dict, bytes)):
        return json.dumps(_jsonable(v))  # csv has no lists: vectors become "[0.1, ...]"
    return str(v)


def _write_jsonl(table: pa.Table, out: IO[str]) -> None:
    for batch in table.to_batches():
        for row in batch.to_pylist():
            out.write(json.dumps(_jsonable(row), ensure_ascii=False) + "\n")


def write_result(
    table: pa.Table,
    format: str = "table",
    output: str | Path | None = None,
    console: Console | None = None,
    max_rows: int = 50,
) -> None:
    """Write a query result: ``table`` to the terminal, or ``csv`` / ``json`` (JSON Lines, one
    object per row) / ``parquet`` to ``output`` (csv and json go to stdout without one).

    Vectors stay lists in Parquet and JSON and become JSON arrays (``[0.1, ...]``) in csv.
    Files are written to a temporary name and renamed, so a failed write leaves no half file.
    """
    if format not in OUTPUT_FORMATS:
        raise SQLError(f"unknown format {format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    if format == "table":
        if output is not None:
            raise SQLError("--output needs --format csv, json or parquet")
        console = console or Console()
        console.print(render_table(table, max_rows=max_rows, width=console.width))
        return
    if output is None:
        if format == "parquet":
            raise SQLError("--format parquet needs --output FILE")
        (_write_csv if format == "csv" else _write_jsonl)(table, sys.stdout)
        return
    output = Path(output)
    if output.is_dir():
        raise SQLError(f"--output {output} is a directory; give a file name")
    if not output.parent.is_dir():
        raise SQLError(f"cannot write {output}: directory {output.parent} does not exist")
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        if format == "parquet":
            pq.write_table(table, tmp, compression="zstd")
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                (_write_csv if format == "csv" else _write_jsonl)(table, f)
        os.replace(tmp, output)
    except OSError as e:
        raise SQLError(f"cannot write {output}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _cell(v, t: pa.DataType, max_text: int) -> str:
    if v is None:
        return "NULL"
    if _is_vector(t):
        head = ", ".join(f"{x:.3f}" if x is not None else "NULL" for x in v[:3])
        more = ", …" if len(v) > 3 else ""
        return f"[{head}{more}] ({len(v)})"
    if isinstance(v, float):
        s = f"{v:.6g}"
    else:
        s = json.dumps(_jsonable(v)) if pa.types.is_nested(t) else str(v)
    s = s.replace("\n", " ")
    if len(s) > max_text:
        s = s[: max_text - 1] + "…"
    return s


def render_table(
    table: pa.Table, max_rows: int = 50, max_text: int = 60, width: int | None = None
) -> RichTable:
    """A query result for the terminal, one line per row: vectors as
    ``[0.012, -0.034, 0.101, …] (D)``, texts cut at ``max_text`` characters, at most
    ``max_rows`` rows. With ``width`` (the terminal's), columns that do not fit are left out
    rather than squeezed; the caption names them and says how many rows there are.
    """
    shown = table.slice(0, max_rows)
    cells = [
        [_cell(v, f.type, max_text) for v in col.to_pylist()]
        for col, f in zip(shown.columns, shown.schema, strict=True)
    ]
    nulls = [[v is None for v in col.to_pylist()] for col in shown.columns]
    keep = len(cells)
    if width is not None:
        used = 1  # the left border
        for i, (f, col) in enumerate(zip(table.schema, cells, strict=True)):
            natural = max([len(f.name), *(len(c) for c in col)])
            used += natural + 3  # padding and the right border
            if used > width and i > 0:
                keep = i
                break
    caption = f"{table.num_rows} row{'s' if table.num_rows != 1 else ''}"
    if table.num_rows > max_rows:
        caption = f"first {max_rows} of {caption}"
    if keep < len(cells):
        caption += f", {len(cells) - keep} more columns not shown (select fewer)"
    if table.num_rows > max_rows or keep < len(cells):
        caption += "; --format csv|json|parquet writes everything"
    # At least as wide as its caption, so a narrow result does not fold the caption.
    out = RichTable(caption=escape(caption), min_width=min(len(caption) + 4, width or 100))
    for f in list(table.schema)[:keep]:
        t = f.type
        is_num = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
        out.add_column(escape(f.name), justify="right" if is_num else "left", no_wrap=True)
    for r in range(shown.num_rows):
        out.add_row(*("[dim]NULL[/]" if nulls[c][r] else escape(cells[c][r]) for c in range(keep)))
    return out


def example_queries(cache_path: str | Path | None = None) -> dict[str, str]:
    """``EXAMPLE_QUERIES``, with facet and text column names adapted to a cache's own.

    The examples use the flame names (``main_object``, ``description``, ``long_caption``); for a
    cache without them, its first two vector names and its first text column stand in.
    """
    if cache_path is None:
        return dict(EXAMPLE_QUERIES)
    cache = Cache.open(cache_path)
    layout = cache.manifest.layout
    names = list(layout["vector_names"])
    texts = list(layout.get("text_columns", []))
    tokens = [c.removeprefix(TOKENS_PREFIX) for c in _token_columns(cache)]
    subst = {}
    if "main_object" not in names:
        subst["main_object"] = names[0]
    if "description" not in names:
        subst["description"] = names[1] if len(names) > 1 else names[0]
    out = {}
    for name, q in EXAMPLE_QUERIES.items():
        if texts and "long_caption" not in texts:
            q = q.replace("tokens__long_caption", "tokens__" + (tokens or texts)[0])
            q = q.replace("long_caption", texts[0])
        elif not texts:
            if "long_caption AS" in q or ".long_caption" in q:
                continue  # no caption texts stored in this cache
            if tokens:
                q = q.replace("tokens__long_caption", "tokens__" + tokens[0])
        for old, new in subst.items():
            q = re.sub(rf"\b{old}\b", new, q)
        out[name] = q
    return out


def format_examples(examples: dict[str, str]) -> str:
    """Examples as one SQL text with ``-- name`` headers (for ``facetclip sql --examples``)."""
    buf = io.StringIO()
    for name, q in examples.items():
        buf.write(f"-- {name}\n{q};\n\n")
    return buf.getvalue().rstrip() + "\n"
