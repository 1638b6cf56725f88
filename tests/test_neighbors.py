"""`facetclip neighbors`: streamed top-k by cosine against a brute-force numpy reference."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embed.pipeline import EmbedConfig, run_embed
from store.cache import Cache
from store.errors import CacheError
from store.neighbors import find_neighbors


@pytest.fixture(scope="module", params=["float16", "int8"])
def cache(request, tmp_path_factory, synth_data, tiny_model):
    """60 flame-long captions in shards of 25 (so the top-k is merged across three shards)."""
    out = tmp_path_factory.mktemp("neighbors") / request.param
    run_embed(
        EmbedConfig(
            captions=synth_data / "captions.parquet",
            model=str(tiny_model),
            out=out,
            recipe="flame-long",
            dtype=request.param,
            limit=60,
            shard_rows=25,
        ),
        progress=False,
    )
    return out


def brute_force(cache, key: str, facet: str) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """All other keys by descending cosine, computed from all rows at once with pyarrow."""
    t = pa.concat_tables(pq.read_table(p) for p in Cache.open(cache).shard_paths)
    col = t.column(facet).combine_chunks()
    v = np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(t), -1)
    if pa.types.is_int8(col.type.value_type):
        v = v * t.column(facet + "__scale").to_numpy()[:, None]
    keys = t["key"].to_pylist()
    q = v[keys.index(key)]
    cos = v @ q / np.linalg.norm(v, axis=1) / np.linalg.norm(q)
    order = [i for i in np.argsort(-cos, kind="stable") if keys[i] != key]
    texts = dict(zip(keys, t["long_caption"].to_pylist(), strict=True))
    return [keys[i] for i in order], cos[order], texts


@pytest.mark.parametrize("facet", [None, "main_object", "atmosphere"])
def test_neighbors_equal_brute_force(cache, facet):
    key = "000000030"  # in the middle shard
    got = find_neighbors(cache, key, facet=facet, k=7)
    keys, scores, texts = brute_force(cache, key, facet or "description")
    assert [n.rank for n in got] == list(range(8))
    assert (got[0].key, got[0].score, got[0].text) == (key, 1.0, texts[key])
    assert [n.key for n in got[1:]] == keys[:7]
    np.testing.assert_allclose([n.score for n in got[1:]], scores[:7], atol=1e-5)
    assert all(a.score >= b.score for a, b in zip(got[1:], got[2:], strict=False))
    assert all(n.text == texts[n.key] for n in got)


def test_k_larger_than_the_cache_returns_every_other_caption(cache):
    got = find_neighbors(cache, "000000000", k=1000)
    assert len(got) == 60 and len({n.key for n in got}) == 60
    keys, scores, _ = brute_force(cache, "000000000", "description")
    assert [n.key for n in got[1:]] == keys
    assert find_neighbors(cache, "000000000", k=0)[0].key == "000000000"


def test_unknown_key_or_facet_is_a_clear_error(cache):
    with pytest.raises(CacheError, match=r"'nope'.*facetclip sql .*SELECT key FROM embeddings"):
        find_neighbors(cache, "nope")
    with pytest.raises(CacheError, match="no facet 'colour'.*main_object, main_characteristic"):
        find_neighbors(cache, "000000000", facet="colour")
