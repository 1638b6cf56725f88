"""Reading the cache back: bounded batches, lookup by key, and the npy export."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from embed.pipeline import EmbedConfig, run_embed
from store.cache import Cache
from store.errors import CacheError
from store.export import export_npy
from store.reader import (
    INDEX_FILE,
    MEANS_FILE,
    KeyIndex,
    iter_batches,
    read_shard,
    vector_means,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, synth_data, tiny_model):
    out = tmp_path_factory.mktemp("reader") / "cache"
    cfg = EmbedConfig(
        synth_data / "captions.parquet",
        str(tiny_model),
        out,
        recipe="flame-long",
        shard_rows=40,
        limit=100,
    )
    run_embed(cfg, progress=False)
    return out


def all_rows(cache) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in Cache.open(cache).shard_paths], ignore_index=True)


def test_iter_batches_is_bounded_and_complete(cache):
    df = all_rows(cache)
    seen, vecs = [], []
    for keys, v in iter_batches(cache, ["main_object", "action"], batch_rows=16):
        assert len(keys) <= 16 and set(v) == {"main_object", "action"}
        assert v["action"].dtype == np.float32 and v["action"].shape == (len(keys), 64)
        seen += keys
        vecs.append(v["main_object"])
    assert seen == df["key"].tolist()
    want = np.stack(df["main_object"].to_numpy()).astype(np.float32)
    assert np.array_equal(np.concatenate(vecs), want)
    with pytest.raises(CacheError, match="no vector"):
        next(iter_batches(cache, ["nope"]))


def test_vector_means_match_pandas_and_are_computed_once(cache, tmp_path):
    import shutil

    df = all_rows(cache)
    names = ["action", "main_object"]
    want = np.stack([np.stack(df[n].to_numpy()).astype(np.float64).mean(axis=0) for n in names])
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    got = vector_means(copy, names)
    assert got.shape == (2, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
    saved = (copy / MEANS_FILE).stat().st_mtime_ns
    np.testing.assert_array_equal(vector_means(copy, names[::-1]), got[::-1])  # reused
    assert (copy / MEANS_FILE).stat().st_mtime_ns == saved
    # a stale file (another cache state) is recomputed, never trusted
    np.savez(copy / MEANS_FILE, stamp=np.array("other"), action=np.zeros(64, np.float32))
    np.testing.assert_allclose(vector_means(copy, ["action"])[0], want[0], atol=1e-6)
    with pytest.raises(CacheError, match="no vector"):
        vector_means(copy, ["nope"])


def test_key_index_finds_every_key_and_nothing_else(cache, tmp_path):
    df = all_rows(cache)
    index = KeyIndex.load(cache)
    assert len(index) == len(df) and (cache / INDEX_FILE).is_file()
    keys = df["key"].tolist()[::7][::-1]
    got = index.vectors(keys, ["description"])["description"]
    want = np.stack(df.set_index("key").loc[keys, "description"].to_numpy()).astype(np.float32)
    assert np.array_equal(got, want)
    assert index.locate(["not-a-key"]) == [None]
    with pytest.raises(CacheError, match="not in the cache"):
        index.vectors(["not-a-key"])
    # 16 bytes a key: int64 hash + int32 shard + int32 row
    assert index.hashes.nbytes + index.shard.nbytes + index.row.nbytes == 16 * len(df)


def test_key_index_is_rebuilt_when_the_cache_grows(cache, tmp_path, synth_data, tiny_model):
    import shutil

    grown = tmp_path / "grown"
    shutil.copytree(cache, grown)
    assert len(KeyIndex.load(grown)) == 100
    cfg = EmbedConfig(
        synth_data / "captions.parquet",
        str(tiny_model),
        grown,
        recipe="flame-long",
        shard_rows=40,
        limit=120,
    )
    run_embed(cfg, progress=False)
    assert len(KeyIndex.load(grown)) == 120


def test_export_npy_reads_back_equal(cache, tmp_path):
    out = tmp_path / "npy"
    summary = export_npy(cache, out)
    df = all_rows(cache)
    assert summary.rows == len(df)
    names = Cache.open(cache).manifest.layout["vector_names"]
    for name in names:
        files = sorted((out / name).glob("emb_*.npy"))
        assert len(files) == 3
        got = np.concatenate([np.load(f) for f in files])
        assert got.dtype == np.float16
        assert np.array_equal(got, np.stack(df[name].to_numpy()))
    meta = pd.concat(
        [pq.read_table(f).to_pandas() for f in sorted((out / "metadata").glob("*.parquet"))]
    )
    assert (
        meta["key"].tolist() == df["key"].tolist()
        and meta["long_caption"].tolist() == df["long_caption"].tolist()
    )
    with pytest.raises(CacheError, match="not empty"):
        export_npy(cache, out)


def test_read_shard_errors(tmp_path):
    with pytest.raises(CacheError, match="not a readable Parquet shard"):
        read_shard(tmp_path / "missing.parquet")
