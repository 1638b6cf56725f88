"""`facetclip embed` end to end: the cache read back by DuckDB and pandas, crash and resume,
and every bad input getting its error or counted skip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli import app
from embed.pipeline import EmbedConfig, EmbedError, run_embed
from store.errors import CacheError, InputError
from store.reader import iter_cache, read_shard


@pytest.fixture(scope="module")
def captions(synth_data):
    return synth_data / "captions.parquet"


def embed(captions, model, out, **kw):
    return run_embed(
        EmbedConfig(captions=captions, model=str(model), out=out, **kw), progress=False
    )


def cache_frame(cache: Path) -> pd.DataFrame:
    """All rows of a cache via DuckDB (an independent reader)."""
    return duckdb.sql(f"SELECT * FROM read_parquet('{cache}/shards/*.parquet') ORDER BY key").df()


@pytest.fixture(scope="module")
def flame_cache(tmp_path_factory, captions, tiny_model):
    out = tmp_path_factory.mktemp("caches") / "flame"
    summary = embed(captions, tiny_model, out, recipe="flame", shard_rows=50)
    return out, summary


def test_duckdb_and_pandas_read_the_cache(flame_cache, captions):
    out, summary = flame_cache
    n = pq.read_metadata(captions).num_rows
    assert summary.rows == n and summary.shards_written == 3 and not summary.skipped
    con = duckdb.connect()
    dim = json.loads((out / "manifest.json").read_text())["layout"]["dim"]
    rows = con.sql(
        f"SELECT key, array_cosine_similarity(main_object::FLOAT[{dim}], atmosphere::FLOAT[{dim}]) AS cos "
        f"FROM read_parquet('{out}/shards/*.parquet') ORDER BY key"
    ).fetchall()
    assert len(rows) == n
    vecs = {}
    for keys, v in iter_cache(out, ["main_object", "atmosphere"]):
        for i, k in enumerate(keys):
            vecs[k] = (v["main_object"][i], v["atmosphere"][i])
    for key, cos in rows:
        a, b = vecs[key]
        assert cos == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), abs=1e-5)
    df = pd.read_parquet(out / "shards")
    assert len(df) == n and df["key"].is_unique
    assert set(df["key"]) == set(pq.read_table(captions, columns=["key"]).column("key").to_pylist())
    # vectors are L2-normalised float16 fixed-size lists; texts and token counts are kept
    assert np.allclose(
        np.linalg.norm(np.stack(df["raw"].to_numpy()).astype(np.float32), axis=1), 1, atol=2e-3
    )
    assert {"caption", "short_caption", "long_caption", "tokens__long_caption", "truncated"} <= set(
        df.columns
    )
    schema = pq.read_schema(out / "shards" / "part-00000.parquet")
    vector = schema.field("raw").type
    assert (
        pa.types.is_fixed_size_list(vector)
        and vector.list_size == dim
        and vector.value_type == pa.float16()
    )
    meta = schema.metadata
    assert b"facetclip.recipe" in meta and json.loads(meta[b"facetclip.layout"])["dim"] == dim


def test_killed_run_resumes_to_the_same_cache(tmp_path, captions, tiny_model, flame_cache):
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "cli", "embed", str(captions), "--model", str(tiny_model), "--out", str(out),
           "--recipe", "flame", "--shard-rows", "50", "--no-progress"]  # fmt: skip
    env = {**os.environ, "FACETCLIP_KILL_AFTER_SHARDS": "1"}
    killed = subprocess.run(cmd, env=env, capture_output=True, cwd=Path(__file__).parents[1])
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 1
    # Leftovers a crash can leave: a temp file and a renamed shard never recorded.
    (out / "shards" / ".part-00001.parquet.tmp-123").write_bytes(b"half a shard")
    (out / "shards" / "part-00002.parquet").write_bytes(b"not in the manifest")
    env.pop("FACETCLIP_KILL_AFTER_SHARDS")
    done = subprocess.run(cmd, env=env, capture_output=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr.decode()
    assert "rows from earlier runs" in done.stdout.decode()
    assert not list((out / "shards").glob(".*"))

    got, want = cache_frame(out), cache_frame(flame_cache[0])
    keys = pq.read_table(captions, columns=["key"]).column("key").to_pylist()
    assert sorted(got["key"]) == sorted(keys) and got["key"].is_unique
    for name in ("raw", "description", "atmosphere"):
        assert np.array_equal(np.stack(got[name]), np.stack(want[name]))


def test_limit_then_full_run_recomputes_the_partial_shard(tmp_path, captions, tiny_model):
    out = tmp_path / "c"
    s1 = embed(captions, tiny_model, out, recipe="flame-long", shard_rows=50, limit=70)
    assert s1.rows == 70 and s1.shards_written == 2
    s2 = embed(captions, tiny_model, out, recipe="flame-long", shard_rows=50)
    assert s2.shards_reused == 1 and s2.shards_written == 2  # shard 1 grew from 20 to 50 rows
    assert len(cache_frame(out)) == pq.read_metadata(captions).num_rows


def test_rerun_of_finished_cache_loads_no_model(tmp_path, captions, tiny_model):
    out = tmp_path / "c"
    embed(captions, tiny_model, out, recipe="prompteol", limit=20)

    class Exploding:
        hidden_size = 64

        def embed(self, items):
            raise AssertionError("a finished shard was recomputed")

    s = run_embed(
        EmbedConfig(captions, str(tiny_model), out, recipe="prompteol", limit=20),
        False,
        Exploding(),
    )
    assert s.rows == 0 and s.rows_reused == 20


def test_mean_pooling_and_storage_dtypes(tmp_path, captions, tiny_model):
    ref = tmp_path / "f32"
    embed(captions, tiny_model, ref, recipe="llm2clip", dtype="float32", limit=40)
    keys, v32 = read_shard(ref / "shards" / "part-00000.parquet")
    assert list(v32) == ["mean"] and v32["mean"].shape == (40, 64)
    for dtype, tol in (("float16", 1e-6), ("int8", 1e-4)):  # the bounds README documents
        embed(captions, tiny_model, tmp_path / dtype, recipe="llm2clip", dtype=dtype, limit=40)
        k, v = read_shard(tmp_path / dtype / "shards" / "part-00000.parquet")
        assert k == keys
        cos = (v["mean"] * v32["mean"]).sum(1) / np.linalg.norm(v["mean"], axis=1)
        assert 1 - cos.max() < tol and 1 - cos.min() < tol


def test_user_recipe_file_and_column_mapping(tmp_path, captions, tiny_model):
    from embed.prompts import BUILTIN_RECIPES

    recipe = replace(BUILTIN_RECIPES["flame-long"], name="mine", max_caption_tokens=16)
    path = tmp_path / "mine.toml"
    path.write_text(recipe.to_toml())
    table = pq.read_table(captions).rename_columns(["id", "alt", "short", "text"]).slice(0, 30)
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in table.to_pylist()) + "\n")
    s = embed(
        jsonl,
        tiny_model,
        tmp_path / "c",
        recipe=str(path),
        key_column="id",
        columns={"long_caption": "text"},
    )
    assert s.rows == 30 and s.truncated == 30  # every long caption exceeds 16 tokens
    df = cache_frame(tmp_path / "c")
    assert df["truncated"].all() and (df["tokens__text"] > 16).all()


# --- bad input ---------------------------------------------------------------------------


def write_parquet(path: Path, rows: dict) -> Path:
    pq.write_table(pa.table(rows), path)
    return path


def test_missing_columns_list_what_was_found(tmp_path, tiny_model):
    p = write_parquet(tmp_path / "c.parquet", {"id": ["a"], "text": ["a star."]})
    with pytest.raises(
        InputError, match=r"columns 'key', 'long_caption' not found.*columns found: id, text"
    ):
        embed(p, tiny_model, tmp_path / "c", recipe="flame-long")


def test_empty_and_null_captions_are_skipped_and_recorded(tmp_path, tiny_model):
    p = write_parquet(
        tmp_path / "c.parquet",
        {"key": ["a", "b", "c", "d"], "long_caption": ["a star.", "", None, "  "]},
    )
    s = embed(p, tiny_model, tmp_path / "c", recipe="flame-long")
    assert s.rows == 1
    assert s.skipped == {"empty caption in long_caption": 2, "null caption in long_caption": 1}
    skipped = duckdb.sql(
        f"SELECT key, reason FROM read_parquet('{tmp_path}/c/skipped/*.parquet') ORDER BY key"
    ).fetchall()
    assert skipped == [("b", "empty caption in long_caption"), ("c", "null caption in long_caption"),
                       ("d", "empty caption in long_caption")]  # fmt: skip


def test_duplicate_keys_error_or_keep_first(tmp_path, tiny_model):
    p = write_parquet(
        tmp_path / "c.parquet",
        {"key": ["a", "b", "a", "c", "b"], "long_caption": ["x.", "y.", "z.", "w.", "v."]},
    )
    with pytest.raises(
        InputError, match=r"2 duplicate key\(s\).*'a', 'b'.*--on-duplicate keep-first"
    ):
        embed(p, tiny_model, tmp_path / "c1", recipe="flame-long")
    assert not (tmp_path / "c1").exists()  # refused before anything was written
    s = embed(p, tiny_model, tmp_path / "c2", recipe="flame-long", on_duplicate="keep-first")
    assert s.rows == 3 and s.skipped == {"duplicate key": 2}
    df = cache_frame(tmp_path / "c2")
    assert df["key"].tolist() == ["a", "b", "c"] and df["long_caption"].tolist() == [
        "x.",
        "y.",
        "w.",
    ]


def test_undecodable_text_names_file_and_row(tmp_path, tiny_model):
    p = tmp_path / "c.csv"
    p.write_bytes(b"key,long_caption\na,a star.\nb,bad \xff\xfe text\n")
    with pytest.raises(InputError, match=r"c\.csv.*row 2"):
        embed(p, tiny_model, tmp_path / "c", recipe="flame-long")


def test_bad_models(tmp_path, captions):
    with pytest.raises(InputError, match="not a directory|neither a local directory"):
        embed(captions, tmp_path / "nope", tmp_path / "c", recipe="flame-long")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertModel"]})
    )
    with pytest.raises(InputError, match="not a causal LM"):
        embed(captions, bert, tmp_path / "c", recipe="flame-long")


def test_nan_vectors_stop_the_run_and_leave_no_shard(tmp_path, captions, tiny_model):
    class NaNEngine:
        hidden_size = 64

        def embed(self, items):
            out = np.ones((sum(len(i.facets) for i in items), 64), np.float32)
            out[3] = np.nan
            return out

    cfg = EmbedConfig(captions, str(tiny_model), tmp_path / "c", recipe="flame-long", shard_rows=50)
    with pytest.raises(EmbedError, match=r"NaN/Inf.*shard 0.*keys \['000000000'\]"):
        run_embed(cfg, False, NaNEngine())
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["shards"] == []
    assert not list((tmp_path / "c" / "shards").iterdir())


def test_another_recipe_is_refused_with_the_difference(tmp_path, captions, tiny_model):
    out = tmp_path / "c"
    embed(captions, tiny_model, out, recipe="flame-long", limit=5)
    with pytest.raises(
        CacheError,
        match=r"another recipe(.|\n)*name: cache has 'flame-long', this run has 'prompteol'",
    ):
        embed(captions, tiny_model, out, recipe="prompteol", limit=5)
    with pytest.raises(CacheError, match=r"layer: cache has -1, this run has 2"):
        run_embed(
            EmbedConfig(captions, str(tiny_model), out, recipe="flame-long", layer=2, limit=5),
            False,
        )


def test_cli_prints_one_line_errors(tmp_path, captions, tiny_model):
    r = CliRunner().invoke(app, ["embed", str(captions), "--model", str(tiny_model), "--out", str(tmp_path / "c"),
                                 "--recipe", "nope"])  # fmt: skip
    assert r.exit_code == 2
    assert "unknown recipe 'nope'" in r.output and "Traceback" not in r.output
