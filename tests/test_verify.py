"""`facetclip verify`: a clean cache passes; each kind of damage is named with its own kind and
message; repair drops exactly the bad shards, and rerunning embed brings them back."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embed.pipeline import EmbedConfig, run_embed
from store.cache import sha256_file
from store.errors import CacheError
from store.format import META_RECIPE
from store.verify import render_report, verify_cache

SHARD_ROWS = 20


@pytest.fixture(scope="module")
def embed_args(tmp_path_factory, synth_data, tiny_model):
    """60 captions with one empty, one null and one duplicate key (skipped), a recipe that
    truncates some long captions, 20-row shards: an EmbedConfig's arguments."""
    d = tmp_path_factory.mktemp("verify-input")
    t = pq.read_table(synth_data / "captions.parquet").slice(0, 60).to_pydict()
    t["long_caption"][3] = ""
    t["long_caption"][25] = None
    t["key"][27] = t["key"][26]  # shard 2 skips nothing
    pq.write_table(pa.table(t), d / "captions.parquet")
    from embed.prompts import BUILTIN_RECIPES

    recipe = replace(BUILTIN_RECIPES["flame-long"], name="flame-long-150", max_caption_tokens=150)
    (d / "recipe.toml").write_text(recipe.to_toml())
    return dict(
        captions=d / "captions.parquet",
        model=str(tiny_model),
        recipe=str(d / "recipe.toml"),
        shard_rows=SHARD_ROWS,
        on_duplicate="keep-first",
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, embed_args):
    out = tmp_path_factory.mktemp("verify-cache") / "cache"
    run_embed(EmbedConfig(out=out, **embed_args), progress=False)
    return out


@pytest.fixture
def cache(pristine, tmp_path) -> Path:
    """A private copy of the pristine cache, free to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "cache"))


def manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def shard(cache: Path, i: int) -> Path:
    return cache / "shards" / f"part-{i:05d}.parquet"


def rewrite_shard(cache: Path, i: int, table: pa.Table) -> None:
    """Replace shard i and record its new size and sha256, so only content checks can fire."""
    path = shard(cache, i)
    pq.write_table(table, path, compression="zstd")
    m = manifest(cache)
    entry = next(s for s in m["shards"] if s["index"] == i)
    entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    (cache / "manifest.json").write_text(json.dumps(m))


def kinds(report) -> set[str]:
    return {p.kind for p in report.problems}


def test_clean_cache_passes(cache):
    r = verify_cache(cache)
    assert r.ok and r.problems == [] and r.shards == 3
    assert r.rows == sum(pq.read_metadata(p).num_rows for p in (cache / "shards").iterdir())
    assert json.loads(json.dumps(r.to_dict()))["ok"] is True


def test_flipped_byte_is_a_checksum_mismatch(cache):
    path = shard(cache, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a data page, away from the footer
    path.write_bytes(bytes(data))
    r = verify_cache(cache)
    assert not r.ok and kinds(r) == {"checksum_mismatch"}
    (p,) = r.problems
    assert p.shard == "part-00001.parquet" and "checksum mismatch" in p.message
    assert "--repair" in p.fix and "facetclip embed" in p.fix


def test_truncated_shard(cache):
    path = shard(cache, 2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    r = verify_cache(cache)
    assert kinds(r) == {"truncated_shard"}
    assert "truncated" in r.problems[0].message and r.problems[0].shard == "part-00002.parquet"


def test_deleted_shard(cache):
    shard(cache, 0).unlink()
    r = verify_cache(cache)
    assert kinds(r) == {"missing_shard"} and "missing" in r.problems[0].message


def test_duplicate_key_across_shards(cache):
    key0 = pq.read_table(shard(cache, 0), columns=["key"]).column(0)[5].as_py()
    t = pq.read_table(shard(cache, 2))
    keys = t.column("key").to_pylist()
    keys[0] = key0
    rewrite_shard(cache, 2, t.set_column(0, t.schema.field("key"), pa.array(keys, pa.string())))
    r = verify_cache(cache)
    assert kinds(r) == {"duplicate_keys"}
    assert {p.shard for p in r.problems} == {"part-00000.parquet", "part-00002.parquet"}
    assert all(repr(key0) in p.message for p in r.problems)
    assert "part-00000.parquet" in next(
        p.message for p in r.problems if p.shard.endswith("2.parquet")
    )


def test_nan_vector(cache):
    t = pq.read_table(shard(cache, 1))
    col = t.column("main_object").combine_chunks()
    v = col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1).copy()
    v[3, 7] = np.nan
    bad = pa.FixedSizeListArray.from_arrays(
        pa.array(v.reshape(-1)), type=t.schema.field("main_object").type
    )
    i = t.schema.get_field_index("main_object")
    rewrite_shard(cache, 1, t.set_column(i, t.schema.field(i), bad))
    r = verify_cache(cache)
    assert kinds(r) == {"nonfinite_vectors"}
    (p,) = r.problems
    key = t.column("key")[3].as_py()
    assert p.shard == "part-00001.parquet" and "NaN" in p.message
    assert repr(key) in p.message and "main_object" in p.message


def test_shard_from_another_recipe(cache):
    t = pq.read_table(shard(cache, 1))
    meta = dict(t.schema.metadata)
    meta[META_RECIPE] = meta[META_RECIPE].replace(b"layer = -1", b"layer = 2")
    rewrite_shard(cache, 1, t.replace_schema_metadata(meta))
    r = verify_cache(cache)
    assert kinds(r) == {"foreign_shard"}
    (p,) = r.problems
    assert p.shard == "part-00001.parquet" and "another recipe" in p.message
    assert "layer" in p.message


def test_edited_recipe_toml_is_one_problem(cache):
    path = cache / "recipe.toml"
    path.write_text(path.read_text().replace("layer = -1", "layer = 2"))
    r = verify_cache(cache)
    assert kinds(r) == {"recipe_mismatch"} and len(r.problems) == 1
    assert "every shard" in r.problems[0].message and r.problems[0].shard is None


@pytest.mark.parametrize(
    "damage, kind, text",
    [
        (
            lambda c: shutil.copy(shard(c, 0), c / "shards" / "part-00007.parquet"),
            "orphan_file",
            "shards/part-00007.parquet is not in the manifest",
        ),
        (
            lambda c: (c / "shards" / ".part-00001.parquet.tmp-99999999").write_bytes(b"half"),
            "temp_file",
            "shards/.part-00001.parquet.tmp-99999999 is a temp file",
        ),
        (
            lambda c: (c / "skipped" / "part-00001.parquet").unlink(),
            "missing_skipped_file",
            "skipped/part-00001.parquet",
        ),
    ],
    ids=["orphan", "temp", "skipped-file"],
)
def test_stray_and_missing_files(cache, damage, kind, text):
    damage(cache)
    r = verify_cache(cache)
    assert kinds(r) == {kind} and text in r.problems[0].message


def test_lost_empty_skipped_file_is_written_again(cache):
    (cache / "skipped" / "part-00002.parquet").unlink()
    r = verify_cache(cache, repair=True)
    assert kinds(r) == {"missing_skipped_file"} and r.problems[0].shard is None
    assert r.problems[0].repaired and r.dropped == []
    assert pq.read_table(cache / "skipped" / "part-00002.parquet").num_rows == 0
    assert verify_cache(cache).ok


def test_inconsistent_manifest_entry(cache):
    m = manifest(cache)
    m["shards"][1]["input_end"] += 1
    (cache / "manifest.json").write_text(json.dumps(m))
    r = verify_cache(cache)
    assert kinds(r) == {"bad_manifest_entry"} and "covers input rows" in r.problems[0].message


def test_repair_then_embed_restores_a_clean_cache(cache, pristine, embed_args):
    # Damage two shards, and leave an orphan and a temp file.
    path = shard(cache, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    shard(cache, 2).unlink()
    (cache / "shards" / "part-00009.parquet").write_bytes(b"orphan")
    (cache / "skipped" / ".part-00000.parquet.tmp-99999999").write_bytes(b"tmp")

    r = verify_cache(cache, repair=True)
    assert not r.ok and all(p.repaired for p in r.problems)
    assert r.dropped == ["part-00001.parquet", "part-00002.parquet"]
    assert sorted(r.deleted) == [
        "shards/part-00001.parquet",
        "shards/part-00009.parquet",
        "skipped/.part-00000.parquet.tmp-99999999",
        "skipped/part-00001.parquet",
        "skipped/part-00002.parquet",
    ]
    assert [s["name"] for s in manifest(cache)["shards"]] == ["part-00000.parquet"]
    assert verify_cache(cache).ok  # consistent, just shorter

    s = run_embed(EmbedConfig(out=cache, **embed_args), progress=False)
    assert s.shards_reused == 1 and s.shards_written == 2
    assert verify_cache(cache).ok
    got = pq.read_table(cache / "shards").sort_by("key")
    want = pq.read_table(pristine / "shards").sort_by("key")
    assert got.num_rows == want.num_rows == 57
    assert got.column("key").equals(want.column("key"))
    assert got.column("atmosphere").equals(want.column("atmosphere"))


def test_render_report_names_problem_and_fix(cache):
    from rich.console import Console

    shard(cache, 0).unlink()
    console = Console(record=True, width=200)
    console.print(render_report(verify_cache(cache)))
    text = console.export_text()
    assert "missing_shard" in text and "fix:" in text and "1 problem(s)" in text


def test_not_a_cache_or_unreadable_manifest(tmp_path, cache):
    with pytest.raises(
        CacheError, match="not a facetclip cache: missing recipe.toml, manifest.json"
    ):
        verify_cache(tmp_path / "cache" / "shards")
    with pytest.raises(CacheError, match="not a directory"):
        verify_cache(tmp_path / "nope")
    m = cache / "manifest.json"
    for text in ('{"layout": {}, "shard', "[]", '{"layout": 3, "shard_rows": 20}'):
        m.write_text(text)
        with pytest.raises(CacheError, match=r"manifest.json is unreadable.*delete .* rerun") as e:
            verify_cache(cache)
        assert "facetclip verify" not in str(e.value)  # no advice to run the command that failed
    m.unlink()
    with pytest.raises(CacheError, match="missing manifest.json"):
        verify_cache(cache)
