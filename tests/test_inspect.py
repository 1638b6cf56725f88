"""`facetclip inspect`: every figure matches an independent count made with pyarrow and numpy."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embed.pipeline import EmbedConfig, run_embed
from store.errors import CacheError
from store.inspect import inspect_cache, render_summary
from store.verify import verify_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory, synth_data, tiny_model) -> Path:
    """60 captions, three of them skipped for three reasons, a recipe that truncates some long
    captions, 20-row shards, int8 storage (so statistics run on decoded vectors)."""
    from embed.prompts import BUILTIN_RECIPES

    d = tmp_path_factory.mktemp("inspect")
    t = pq.read_table(synth_data / "captions.parquet").slice(0, 60).to_pydict()
    t["long_caption"][3] = " "
    t["long_caption"][25] = None
    t["key"][47] = t["key"][46]
    pq.write_table(pa.table(t), d / "captions.parquet")
    recipe = replace(BUILTIN_RECIPES["flame-long"], name="flame-long-150", max_caption_tokens=150)
    (d / "recipe.toml").write_text(recipe.to_toml())
    out = d / "cache"
    cfg = EmbedConfig(d / "captions.parquet", str(tiny_model), out, recipe=str(d / "recipe.toml"),
                      dtype="int8", shard_rows=20, on_duplicate="keep-first")  # fmt: skip
    run_embed(cfg, progress=False)
    return out


def decoded(table: pa.Table, name: str) -> np.ndarray:
    """int8 vectors times their scale, the plain numpy way."""
    q = np.stack(table.column(name).to_numpy(zero_copy_only=False)).astype(np.float64)
    return q * table.column(name + "__scale").to_numpy()[:, None]


def test_figures_match_pyarrow_and_numpy(cache):
    s = inspect_cache(cache)
    t = pq.read_table(cache / "shards")
    files = [Path(dp) / f for dp, _, fs in os.walk(cache) for f in fs]
    assert s.rows == t.num_rows == 57 and s.shards == len(list((cache / "shards").iterdir())) == 3
    assert s.bytes == sum(f.stat().st_size for f in files)
    assert s.bytes_per_row == pytest.approx(s.bytes / 57)
    assert (s.recipe, s.pooling, s.layer, s.dtype) == ("flame-long-150", "last", -1, "int8")
    assert s.model_fingerprint.startswith("sha256:")
    assert verify_cache(cache).ok  # int8 vectors and their scales pass the NaN scan

    truncated = t.column("truncated").to_numpy()
    assert 0 < truncated.sum() < 57  # the fixture exercises a real share
    assert s.truncated == truncated.sum() and s.truncated_share == pytest.approx(truncated.mean())
    tokens = t.column("tokens__long_caption").to_numpy()
    assert s.tokens["long_caption"].mean == pytest.approx(tokens.mean())
    assert s.tokens["long_caption"].max == tokens.max()

    reasons = pq.read_table(cache / "skipped", columns=["reason"]).column(0).to_pylist()
    assert (
        s.skipped
        == dict(Counter(reasons))
        == {
            "empty caption in long_caption": 1,
            "null caption in long_caption": 1,
            "duplicate key": 1,
        }
    )

    assert [f.name for f in s.facets] == json.loads(t.schema.metadata[b"facetclip.layout"])[
        "vector_names"
    ]
    assert s.norm_rows == 57 and not s.norm_sampled
    for f in s.facets:
        v = decoded(t, f.name)
        norms = np.linalg.norm(v, axis=1)
        u = v / norms[:, None]
        cos = u @ u.T
        assert (f.dim, f.dtype, f.column, f.rows) == (v.shape[1], "int8", "long_caption", 57)
        assert f.norm_min == pytest.approx(norms.min(), abs=1e-6)
        assert f.norm_mean == pytest.approx(norms.mean(), abs=1e-6)
        assert f.norm_max == pytest.approx(norms.max(), abs=1e-6)
        assert f.mean_vector_norm == pytest.approx(np.linalg.norm(u.mean(axis=0)), abs=1e-6)
        off_diagonal = cos[~np.eye(len(u), dtype=bool)]
        assert f.mean_pairwise_cosine == pytest.approx(off_diagonal.mean(), abs=1e-6)


def test_sample_cap_limits_vector_statistics_only(cache):
    full, s = inspect_cache(cache), inspect_cache(cache, norm_sample_rows=25)
    assert s.norm_sampled and s.norm_rows == 25 and all(f.rows == 25 for f in s.facets)
    assert (s.rows, s.truncated, s.tokens, s.skipped) == (
        full.rows,
        full.truncated,
        full.tokens,
        full.skipped,
    )
    for a, b in zip(s.facets, full.facets, strict=True):
        assert a.mean_vector_norm == pytest.approx(b.mean_vector_norm, abs=0.1)


def test_json_and_rendering(cache):
    from rich.console import Console

    s = inspect_cache(cache)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["rows"] == 57 and d["facets"][0]["name"] == "description"
    assert d["skipped"]["duplicate key"] == 1
    console = Console(record=True, width=160)
    console.print(render_summary(s))
    text = console.export_text()
    assert "flame-long-150" in text and "main_object" in text and "duplicate key: 1" in text


def test_not_a_cache_and_unreadable_manifest(tmp_path, cache):
    with pytest.raises(
        CacheError, match="not a facetclip cache: missing recipe.toml, manifest.json"
    ):
        inspect_cache(tmp_path)
    with pytest.raises(CacheError, match="not a directory"):
        inspect_cache(tmp_path / "nope")
    copy = Path(shutil.copytree(cache, tmp_path / "c"))
    (copy / "manifest.json").write_text('{"layout": ')
    with pytest.raises(CacheError, match="manifest.json is unreadable"):
        inspect_cache(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(CacheError, match="missing manifest.json"):
        inspect_cache(copy)


def test_missing_shard_points_to_verify(tmp_path, cache):
    copy = Path(shutil.copytree(cache, tmp_path / "c"))
    (copy / "shards" / "part-00001.parquet").unlink()
    with pytest.raises(CacheError, match="part-00001.parquet.*facetclip verify"):
        inspect_cache(copy)
