"""`facetclip sql`: the `embeddings`/`skipped` views against pyarrow + numpy, confinement of
queries to the cache, the example queries, and the output formats read back."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from embed.pipeline import EmbedConfig, run_embed
from store.cache import Cache
from store.sql import (
    EXAMPLE_QUERIES,
    SQLError,
    check_read_only,
    connect,
    example_queries,
    format_examples,
    render_table,
    run_query,
    write_result,
)

FACETS = ["main_object", "atmosphere"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory, synth_data, tiny_model):
    """Two flame-long caches of 60 captions in shards of 25: float16 from the synthetic
    captions, and int8 from a copy with two unusable captions (skipped) and one repeated text."""
    root = tmp_path_factory.mktemp("sql")
    df = pd.read_parquet(synth_data / "captions.parquet").iloc[:62].reset_index(drop=True)
    df.loc[5, "long_caption"] = "   "
    df.loc[7, "long_caption"] = None
    df.loc[11, "long_caption"] = df.loc[10, "long_caption"]
    edited = root / "edited.parquet"
    df.to_parquet(edited)
    out = {}
    for dtype, captions, limit in [
        ("float16", synth_data / "captions.parquet", 60),
        ("int8", edited, 62),
    ]:
        out[dtype] = root / dtype
        run_embed(
            EmbedConfig(
                captions=captions,
                model=str(tiny_model),
                out=out[dtype],
                recipe="flame-long",
                dtype=dtype,
                limit=limit,
                shard_rows=25,
            ),
            progress=False,
        )
    return out


@pytest.fixture(params=["float16", "int8"])
def cache(request, caches):
    return caches[request.param]


def pyarrow_rows(cache: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in Cache.open(cache).shard_paths)


def pyarrow_vectors(table: pa.Table, name: str) -> np.ndarray:
    """Vectors decoded by hand from the raw columns (not by store.format)."""
    col = table.column(name).combine_chunks()
    v = np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32)
    v = v.reshape(len(col), col.type.list_size)
    if pa.types.is_int8(col.type.value_type):
        v = v * table.column(name + "__scale").to_numpy()[:, None]
    return v


# --- the views --------------------------------------------------------------------------


def test_view_columns_are_float_arrays_and_rows_match_pyarrow(cache):
    layout = Cache.open(cache).manifest.layout
    d = layout["dim"]
    con = connect(cache)
    types = dict(con.sql("SELECT column_name, column_type FROM (DESCRIBE embeddings)").fetchall())
    assert list(types) == [
        "key",
        *layout["text_columns"],
        *layout["vector_names"],
        "tokens__long_caption",
        "truncated",
        "shard",
    ]
    assert all(types[n] == f"FLOAT[{d}]" for n in layout["vector_names"])
    table = pyarrow_rows(cache)
    assert con.sql("SELECT count(*) FROM embeddings").fetchall() == [(table.num_rows,)]
    assert sorted(run_query(cache, "SELECT key FROM embeddings")["key"].to_pylist()) == sorted(
        table["key"].to_pylist()
    )


def test_cosine_and_vectors_equal_numpy_on_pyarrow(cache):
    table = pyarrow_rows(cache)
    a, b = (pyarrow_vectors(table, n) for n in FACETS)
    expected = dict(
        zip(
            table["key"].to_pylist(),
            (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1),
            strict=True,
        )
    )
    got = run_query(
        cache,
        "SELECT key, main_object, array_cosine_similarity(main_object, atmosphere) AS cos "
        "FROM embeddings",
    )
    for key, cos in zip(got["key"].to_pylist(), got["cos"].to_pylist(), strict=True):
        assert cos == pytest.approx(float(expected[key]), abs=1e-5)
    order = {k: i for i, k in enumerate(table["key"].to_pylist())}
    rows = [order[k] for k in got["key"].to_pylist()]
    np.testing.assert_allclose(np.stack(got["main_object"].to_numpy(zero_copy_only=False)), a[rows])


def test_skipped_view_and_shard_column(caches):
    cache = caches["int8"]
    skipped = run_query(cache, "SELECT key, input_row, reason FROM skipped ORDER BY input_row")
    assert skipped["input_row"].to_pylist() == [5, 7]
    assert skipped["reason"].to_pylist() == [
        "empty caption in long_caption",
        "null caption in long_caption",
    ]
    shards = run_query(cache, "SELECT shard, count(*) AS n FROM embeddings GROUP BY 1 ORDER BY 1")
    manifest = Cache.open(cache).manifest
    assert shards["shard"].to_pylist() == [s.name for s in manifest.shards]
    assert shards["n"].to_pylist() == [s.rows for s in manifest.shards]


def test_only_files_in_the_manifest_are_read(caches, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(caches["float16"], cache)
    n = Cache.open(cache).rows
    # an unfinished shard of a running embed, and a temp file: neither is in the manifest
    shutil.copy(cache / "shards/part-00000.parquet", cache / "shards/part-00007.parquet")
    shutil.copy(cache / "shards/part-00000.parquet", cache / "shards/.part-00008.parquet.tmp-1")
    assert run_query(cache, "SELECT count(*) AS n FROM embeddings")["n"].to_pylist() == [n]


def test_a_cache_without_shards_has_empty_typed_views(caches, tmp_path):
    src = Cache.open(caches["float16"])
    Cache.create(tmp_path / "empty", src.recipe, src.manifest.layout, 25, {"path": "x"})
    con = connect(tmp_path / "empty")
    assert con.sql("SELECT count(*) FROM embeddings").fetchall() == [(0,)]
    assert con.sql("SELECT count(*) FROM skipped").fetchall() == [(0,)]
    types = dict(con.sql("SELECT column_name, column_type FROM (DESCRIBE embeddings)").fetchall())
    assert types["main_object"] == f"FLOAT[{src.manifest.layout['dim']}]"


# --- confinement ------------------------------------------------------------------------

OUTSIDE = "/tmp/facetclip-sql-test-must-not-exist.csv"


@pytest.mark.parametrize(
    "query",
    [
        f"COPY (SELECT 1) TO '{OUTSIDE}'",
        "COPY (SELECT key FROM embeddings) TO '{cache}/x.csv'",
        "COPY embeddings TO '{cache}/shards/part-00000.parquet'",
        "EXPLAIN ANALYZE COPY (SELECT 1) TO '{cache}/x.csv'",
        "EXPLAIN (ANALYZE) COPY (SELECT 1) TO '{cache}/x.csv'",
        "EXPORT DATABASE '{cache}/db'",
        "SELECT * FROM read_csv('/etc/hostname')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM read_parquet('{other}/shards/*.parquet')",
        "SELECT * FROM read_parquet('{cache}/../{other_name}/shards/*.parquet')",
        "SELECT * FROM glob('/etc/*')",
        "SELECT * FROM read_csv('https://example.com/x.csv')",
        "ATTACH '{cache}/x.db' AS x",
        "ATTACH ':memory:' AS x",
        "SET enable_external_access = true",
        "RESET allowed_directories",
        "SET lock_configuration = false",
        "INSTALL httpfs",
        "LOAD httpfs",
        "CREATE TABLE t AS SELECT 1",
        "CREATE OR REPLACE VIEW embeddings AS SELECT 1",
        "PRAGMA enable_profiling",
        "IMPORT DATABASE '{cache}'",
        "CALL checkpoint()",
        "SELECT 1; COPY (SELECT 1) TO '{cache}/x.csv'",
    ],
)
def test_queries_cannot_write_or_leave_the_cache(caches, query):
    cache, other = caches["int8"], caches["float16"]
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    con = connect(cache)
    q = query.format(cache=cache, other=other, other_name=other.name)
    with pytest.raises(SQLError, match="read-only and confined to the cache|one statement"):
        run_query(cache, q, con=con)
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before
    assert not Path(OUTSIDE).exists()
    # the connection still answers ordinary queries afterwards
    assert run_query(cache, "SELECT count(*) AS n FROM embeddings", con=con)["n"].to_pylist() == [
        60
    ]


def test_duckdb_itself_confines_the_connection(caches):
    """Below the statement check: DuckDB's sandbox holds for a raw connection too."""
    cache = caches["int8"]
    con = connect(cache)
    with pytest.raises(duckdb.PermissionException):
        con.sql("SELECT * FROM read_csv('/etc/hostname')").fetchall()
    with pytest.raises(duckdb.PermissionException):
        con.execute(f"COPY (SELECT 1) TO '{OUTSIDE}'")
    for setting in ("SET enable_external_access = true", "SET allowed_directories = ['/']"):
        with pytest.raises(duckdb.InvalidInputException, match="locked"):
            con.execute(setting)
    with pytest.raises(duckdb.Error):
        con.execute("LOAD httpfs")
    # reading anything inside the cache is fine
    recipe = con.sql(f"SELECT content FROM read_text('{cache.resolve()}/recipe.toml')").fetchall()
    assert "flame-long" in recipe[0][0]


def test_spilling_stays_in_a_private_temp_folder(caches, tmp_path, monkeypatch):
    """A query bigger than memory spills into the connection's own 0700 folder, not DuckDB's
    default ./.tmp; the folder goes with the connection and the setting is locked."""
    import gc
    import tempfile
    import threading

    cache = caches["float16"]
    monkeypatch.chdir(tmp_path)  # where DuckDB's default temp_directory (./.tmp) would land
    before = sorted(p.relative_to(cache) for p in cache.rglob("*"))
    con = connect(cache, memory_limit="100MB")
    spill = Path(con.sql("SELECT current_setting('temp_directory')").fetchall()[0][0])
    assert spill.parent == Path(tempfile.gettempdir()) and spill.stat().st_mode & 0o777 == 0o700
    with pytest.raises(duckdb.InvalidInputException, match="locked"):
        con.execute(f"SET temp_directory = '{tmp_path}'")

    seen, done = set(), threading.Event()

    def watch() -> None:  # DuckDB deletes its spill files when the query ends: look meanwhile
        while not done.is_set():
            seen.update(os.listdir(spill))
            done.wait(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        q = ("SELECT count(*) AS n, count(DISTINCT r) AS d FROM (SELECT i, random() AS r, "
             "repeat('x', 60) AS s FROM range(2500000) t(i) ORDER BY r)")  # fmt: skip
        result = run_query(cache, q, con=con)
    finally:
        done.set()
        watcher.join()
    assert result["n"].to_pylist() == [2_500_000]
    assert any(name.endswith(".tmp") for name in seen), seen  # it did spill, and only here
    assert list(tmp_path.iterdir()) == []
    assert sorted(p.relative_to(cache) for p in cache.rglob("*")) == before
    del con
    gc.collect()
    assert not spill.exists()


@pytest.mark.parametrize(
    "query",
    [
        "SELECT 1",
        "FROM embeddings SELECT key LIMIT 1",
        "WITH t AS (SELECT key FROM embeddings) SELECT count(*) FROM t",
        "DESCRIBE embeddings",
        "SUMMARIZE SELECT tokens__long_caption FROM embeddings",
        "SHOW TABLES",
        "EXPLAIN SELECT count(*) FROM embeddings",
        "EXPLAIN ANALYZE SELECT count(*) FROM embeddings",
        "SELECT * FROM pragma_table_info('embeddings')",
        "  -- a comment\nSELECT 1;  ",
    ],
)
def test_read_statements_are_allowed(caches, query):
    check_read_only(query)
    assert run_query(caches["int8"], query).num_rows >= 1


def test_invalid_sql_is_an_sql_error_with_duckdbs_message(caches):
    with pytest.raises(SQLError, match="syntax error"):
        run_query(caches["int8"], "SELEKT 1")
    with pytest.raises(SQLError, match="embedings"):
        run_query(caches["int8"], "SELECT * FROM embedings")
    with pytest.raises(SQLError, match="empty"):
        run_query(caches["int8"], "  ")


# --- example queries --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXAMPLE_QUERIES))
def test_example_queries_run(cache, name):
    result = run_query(cache, example_queries(cache)[name])
    assert result.num_columns >= 1
    if name == "similar_pairs":
        cos = result["cosine"].to_pylist()
        assert len(cos) == 10 and cos == sorted(cos, reverse=True)


def test_near_duplicates_finds_repeated_text(caches):
    result = run_query(caches["int8"], EXAMPLE_QUERIES["near_duplicates"])
    same = [r for r in result.to_pylist() if r["same_text"]]
    assert len(same) == 1 and {same[0]["key_a"], same[0]["key_b"]} == {"000000010", "000000011"}
    assert same[0]["cosine"] == pytest.approx(1.0, abs=1e-5)


def test_example_queries_adapt_to_other_names(tmp_path, synth_data, tiny_model):
    """A prompteol cache has one vector, `raw`: the examples use it for both facets."""
    cache = tmp_path / "prompteol"
    run_embed(
        EmbedConfig(
            captions=synth_data / "captions.parquet",
            model=str(tiny_model),
            out=cache,
            recipe="prompteol",
            limit=20,
        ),
        progress=False,
    )
    examples = example_queries(cache)
    assert examples.keys() == EXAMPLE_QUERIES.keys()
    assert "main_object" not in examples["similar_pairs"] and "a.raw" in examples["similar_pairs"]
    for q in examples.values():
        run_query(cache, q)


# --- output -----------------------------------------------------------------------------

RESULT = """SELECT key, long_caption, main_object, tokens__long_caption, truncated,
    array_cosine_similarity(main_object, description) AS cos,
    CASE WHEN tokens__long_caption > 130 THEN NULL ELSE 'short' END AS maybe
FROM embeddings ORDER BY key LIMIT 20"""


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_output_files_read_back_equal_to_the_result(caches, tmp_path, fmt):
    table = run_query(caches["int8"], RESULT)
    out = tmp_path / f"result.{fmt}"
    write_result(table, fmt, out)
    assert out.is_file() and not list(tmp_path.glob(".*tmp*"))
    expected = table.to_pandas()
    if fmt == "parquet":
        got = pq.read_table(out)
        assert got.equals(table)
        return
    if fmt == "csv":
        got = pd.read_csv(out, dtype={"key": str, "long_caption": str, "maybe": str})
    else:
        got = pd.read_json(out, lines=True, dtype=False)
    assert list(got.columns) == table.column_names
    assert got["key"].tolist() == expected["key"].tolist()
    assert got["long_caption"].tolist() == expected["long_caption"].tolist()
    assert got["tokens__long_caption"].tolist() == expected["tokens__long_caption"].tolist()
    assert got["truncated"].astype(bool).tolist() == expected["truncated"].tolist()
    np.testing.assert_array_equal(got["cos"].to_numpy(np.float32), expected["cos"].to_numpy())
    assert got["maybe"].isna().tolist() == expected["maybe"].isna().tolist()
    vectors = got["main_object"].map(json.loads) if fmt == "csv" else got["main_object"]
    np.testing.assert_array_equal(
        np.array(vectors.tolist(), np.float32), np.stack(expected["main_object"].to_numpy())
    )


def test_csv_and_json_go_to_stdout_without_output(caches, capsys):
    table = run_query(caches["int8"], "SELECT key, tokens__long_caption FROM embeddings LIMIT 2")
    write_result(table, "csv")
    assert capsys.readouterr().out.splitlines()[0] == "key,tokens__long_caption"
    write_result(table, "json")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and set(json.loads(lines[0])) == {"key", "tokens__long_caption"}
    with pytest.raises(SQLError, match="--output"):
        write_result(table, "parquet")
    with pytest.raises(SQLError, match="unknown format"):
        write_result(table, "xlsx")


def test_render_table_abbreviates_vectors_and_texts(caches):
    table = run_query(caches["int8"], RESULT)
    console = Console(record=True, width=250, file=io.StringIO())
    console.print(render_table(table, max_rows=5, max_text=30))
    text = console.export_text()
    first = table["main_object"][0].as_py()
    assert f"[{first[0]:.3f}, {first[1]:.3f}, {first[2]:.3f}, …] (64)" in text
    assert table["long_caption"][0].as_py()[:29] + "…" in text
    assert "first 5 of 20 rows" in text
    console.print(render_table(run_query(caches["int8"], "SELECT NULL AS n")))
    assert "NULL" in console.export_text()
    # too narrow: trailing columns are left out and counted, the first ones stay readable
    narrow = Console(record=True, width=200, file=io.StringIO())
    narrow.print(render_table(table, max_rows=3, width=60))
    text = narrow.export_text()
    assert "6 more columns not shown" in text and table["key"][0].as_py() in text


def test_duplicate_column_names_are_made_unique(caches):
    table = run_query(caches["int8"], "SELECT 1 AS a, 2 AS a, 3 AS a_1")
    assert table.column_names == ["a", "a_2", "a_1"]


def test_module_docstring_shows_every_example_query():
    import store.sql

    doc = " ".join(store.sql.__doc__.split())
    for name, q in EXAMPLE_QUERIES.items():
        assert f"-- {name}:" in doc and " ".join(q.split()) in doc, name
    text = format_examples(EXAMPLE_QUERIES)
    assert text.count(";\n") == len(EXAMPLE_QUERIES) and "-- near_duplicates\n" in text
