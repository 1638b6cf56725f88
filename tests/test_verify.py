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


# --- damage that keeps every file valid Parquet and reseals the manifest --------------------
#
# Each case rewrites one shard (or the manifest) as a writer would and records the new size and
# sha256 (``rewrite_shard``), so only the content checks can see it. The expected rows are the
# rows the damage touched; the reference is the damage itself, not verify's output.

FACET = "main_object"


def vectors(t: pa.Table, name: str) -> np.ndarray:
    """[N, D] stored values of a vector column (float16 / float32 / int8 q), a writable copy."""
    col = t.column(name).combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1).copy()


def with_vectors(t: pa.Table, name: str, v: np.ndarray) -> pa.Table:
    i = t.schema.get_field_index(name)
    f = t.schema.field(i)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), type=f.type)
    return t.set_column(i, f, arr)


def with_column(t: pa.Table, name: str, values) -> pa.Table:
    i = t.schema.get_field_index(name)
    f = t.schema.field(i)
    return t.set_column(i, f, pa.array(values, f.type))


def edit_vectors(name: str, rows, fn):
    """A damage: ``fn`` applied to the stored values of ``rows`` of vector ``name``."""

    def damage(t: pa.Table) -> pa.Table:
        v = vectors(t, name)
        idx = np.arange(t.num_rows) if rows is None else np.array(rows)
        v[idx] = fn(v[idx])
        return with_vectors(t, name, v)

    return damage


def edit_column(name: str, row: int, fn):
    def damage(t: pa.Table) -> pa.Table:
        values = t.column(name).to_pylist()
        values[row] = fn(values[row], t)
        return with_column(t, name, values)

    return damage


def zero_row(row: int, names):
    def damage(t: pa.Table) -> pa.Table:
        for n in names:
            t = edit_vectors(n, [row], np.zeros_like)(t)
        return t

    return damage


LONG = ["description", "main_object", "main_characteristic", "minor_object",
        "minor_characteristic", "action", "atmosphere"]  # fmt: skip

# (id, damage to shard 1, kind, columns, rows affected: a list, or "all")
ROW_DAMAGE = [
    ("zero-column", edit_vectors(FACET, None, np.zeros_like), "zero_vectors", [FACET], "all"),
    ("zero-row", zero_row(3, LONG), "zero_vectors", LONG, [3]),
    ("inf", edit_vectors(FACET, [4], lambda v: np.where(np.arange(v.shape[1]) == 0, np.inf, v)),
     "nonfinite_vectors", [FACET], [4]),
    ("halved", edit_vectors("atmosphere", [2, 5], lambda v: v / 2), "unnormalized_vectors",
     ["atmosphere"], [2, 5]),
    ("doubled-column", edit_vectors("action", None, lambda v: v * 2), "unnormalized_vectors",
     ["action"], "all"),
    ("empty-key", edit_column("key", 6, lambda k, t: ""), "bad_keys", ["key"], [6]),
    ("negative-tokens", edit_column("tokens__long_caption", 0, lambda n, t: -n),
     "bad_token_counts", ["tokens__long_caption"], [0]),
    ("flipped-truncated", edit_column("truncated", 1, lambda f, t: not f), "bad_token_counts",
     ["truncated"], [1]),
]  # fmt: skip


@pytest.mark.parametrize("damage, kind, columns, rows", [c[1:] for c in ROW_DAMAGE],
                         ids=[c[0] for c in ROW_DAMAGE])  # fmt: skip
def test_resealed_row_damage_is_named_with_rows_and_columns(cache, damage, kind, columns, rows):
    t = damage(pq.read_table(shard(cache, 1)))
    rewrite_shard(cache, 1, t)
    r = verify_cache(cache)
    assert kinds(r) == {kind}
    (p,) = r.problems
    want_rows = list(range(t.num_rows)) if rows == "all" else rows
    assert p.shard == "part-00001.parquet" and p.columns == columns
    assert p.count == len(want_rows) and p.rows == want_rows[:5]
    assert p.keys == [t.column("key")[i].as_py() for i in want_rows[:5]]
    assert all(c in p.message for c in columns) and "--repair" in p.fix

    fixed = verify_cache(cache, repair=True)
    assert fixed.dropped == ["part-00001.parquet"] and all(q.repaired for q in fixed.problems)
    assert verify_cache(cache).ok  # consistent again, one shard shorter


def test_zeroed_token_counts_disagree_with_truncated(cache):
    t = pq.read_table(shard(cache, 0))
    truncated = t.column("truncated").to_numpy(zero_copy_only=False)
    assert truncated.any()  # the fixture's recipe truncates some captions of this shard
    rewrite_shard(cache, 0, with_column(t, "tokens__long_caption", [0] * t.num_rows))
    (p,) = verify_cache(cache).problems
    assert p.kind == "bad_token_counts" and p.columns == ["truncated"]
    assert p.count == int(truncated.sum()) and p.rows == list(np.flatnonzero(truncated)[:5])


def test_duplicate_key_within_a_shard(cache):
    t = pq.read_table(shard(cache, 2))
    keys = t.column("key").to_pylist()
    rewrite_shard(cache, 2, with_column(t, "key", [keys[0]] + keys[:-1]))  # row 1 repeats row 0
    (p,) = verify_cache(cache).problems
    assert p.kind == "duplicate_keys" and p.shard == "part-00002.parquet"
    assert "1 repeated within the shard" in p.message and p.keys == [keys[0]]
    assert p.rows == [0, 1] and p.count == 2


def test_norms_within_float16_rounding_pass(cache):
    # Off 1 by 5e-4 (about float16's own rounding): no report.
    t = pq.read_table(shard(cache, 1))
    v = vectors(t, FACET).astype(np.float32) * 1.0005
    rewrite_shard(cache, 1, with_vectors(t, FACET, v.astype(np.float16)))
    assert verify_cache(cache).ok


def stored_as(name: str, np_dtype, pa_dtype, dim: int):
    """A damage: vector ``name`` stored with another value type or dimension (first ``dim``
    components), in a file whose metadata still states the layout."""

    def damage(t: pa.Table) -> pa.Table:
        v = vectors(t, name)[:, :dim].astype(np_dtype)
        f = pa.field(name, pa.list_(pa.field("item", pa_dtype, nullable=False), dim), False)
        arr = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), type=f.type)
        return t.set_column(t.schema.get_field_index(name), f, arr)

    return damage


@pytest.mark.parametrize(
    "damage, text",
    [
        (stored_as(FACET, np.float16, pa.float16(), 63), "halffloat not null>[63]"),
        (stored_as(FACET, np.float32, pa.float32(), 64), "float not null>[64]"),
        (lambda t: t.drop_columns(["truncated"]), "missing column(s) ['truncated']"),
    ],
    ids=["dim", "dtype", "dropped-column"],
)
def test_resealed_schema_damage(cache, damage, text):
    t = pq.read_table(shard(cache, 1))
    rewrite_shard(cache, 1, damage(t).replace_schema_metadata(t.schema.metadata))
    (p,) = verify_cache(cache).problems
    assert p.kind == "schema_mismatch" and p.shard == "part-00001.parquet", p.message
    assert text in p.message


def test_row_count_mismatch(cache):
    t = pq.read_table(shard(cache, 1))
    rewrite_shard(cache, 1, t.slice(1))  # size and sha256 resealed, the row count not
    (p,) = verify_cache(cache).problems
    assert p.kind == "row_count_mismatch" and f"the manifest recorded {t.num_rows}" in p.message


def test_same_size_garbage_is_unreadable(cache):
    path = shard(cache, 0)
    path.write_bytes(bytes(path.stat().st_size))
    (p,) = verify_cache(cache).problems
    assert p.kind == "unreadable_shard" and p.shard == "part-00000.parquet"


def test_skipped_file_with_another_row_count(cache):
    path = cache / "skipped" / "part-00000.parquet"
    t = pq.read_table(path)
    pq.write_table(pa.concat_tables([t, t]), path)
    (p,) = verify_cache(cache).problems
    assert p.kind == "bad_skipped_file" and f"has {2 * t.num_rows} rows" in p.message


def test_shard_metadata_layout_edited(cache):
    t = pq.read_table(shard(cache, 2))
    meta = dict(t.schema.metadata)
    lay = json.loads(meta[b"facetclip.layout"])
    meta[b"facetclip.layout"] = json.dumps({**lay, "dim": 65}).encode()
    rewrite_shard(cache, 2, t.replace_schema_metadata(meta))
    (p,) = verify_cache(cache).problems
    assert p.kind == "layout_mismatch" and p.shard == "part-00002.parquet" and "65" in p.message


@pytest.mark.parametrize(
    "edit, text",
    [
        ({"dim": 65}, "every shard's metadata has"),
        ({"dtype": "float32"}, "recipe.toml stores 'float16'"),
        ({"vector_names": LONG[::-1]}, "recipe.toml makes"),
        ({"dim": "64"}, "has dim '64', not a positive integer"),
        ({"dtype": "bfloat16"}, "has dtype 'bfloat16'"),
    ],
    ids=["dim", "dtype", "names", "dim-type", "unknown-dtype"],
)
def test_edited_manifest_layout_is_one_problem_repair_keeps_shards(cache, edit, text):
    m = manifest(cache)
    m["layout"].update(edit)
    (cache / "manifest.json").write_text(json.dumps(m))
    r = verify_cache(cache, repair=True)
    assert kinds(r) == {"bad_layout"} and len(r.problems) == 1, [p.message for p in r.problems]
    (p,) = r.problems
    assert text in p.message and p.shard is None and "facetclip.layout" in p.fix
    assert r.dropped == [] and not p.repaired
    assert len(manifest(cache)["shards"]) == 3  # nothing dropped: the shards are fine


def test_zeroed_column_repaired_and_reembedded(cache, pristine, embed_args):
    # The case: a column of all-zero vectors, the manifest's checksum resealed.
    t = pq.read_table(shard(cache, 1))
    rewrite_shard(cache, 1, edit_vectors(FACET, None, np.zeros_like)(t))
    assert kinds(verify_cache(cache, repair=True)) == {"zero_vectors"}
    s = run_embed(EmbedConfig(out=cache, **embed_args), progress=False)
    assert s.shards_reused == 2 and s.shards_written == 1
    assert verify_cache(cache).ok
    got = pq.read_table(cache / "shards").sort_by("key")
    want = pq.read_table(pristine / "shards").sort_by("key")
    assert got.column(FACET).equals(want.column(FACET))


# --- the other storage dtypes and a recipe that does not normalise ----------------------------


@pytest.fixture(scope="module")
def variants(tmp_path_factory, embed_args):
    """Pristine caches of the first 40 rows as int8, float32, and float16 without
    normalisation (a recipe with normalize = false)."""
    from embed.prompts import get_recipe

    root = tmp_path_factory.mktemp("verify-variants")
    captions = root / "captions.parquet"
    pq.write_table(pq.read_table(embed_args["captions"]).slice(0, 40), captions)
    raw = root / "raw.toml"
    raw.write_text(replace(get_recipe(embed_args["recipe"]), normalize=False).to_toml())
    out = {}
    for name, extra in [("int8", {"dtype": "int8"}), ("float32", {"dtype": "float32"}),
                        ("raw", {"recipe": str(raw)})]:  # fmt: skip
        args = {**embed_args, "captions": captions, **extra}
        run_embed(EmbedConfig(out=root / name, **args), progress=False)
        out[name] = root / name
    return out


@pytest.fixture
def variant(variants, tmp_path, request):
    return Path(shutil.copytree(variants[request.param], tmp_path / request.param))


@pytest.mark.parametrize("variant", ["int8", "float32", "raw"], indirect=True)
def test_clean_variants_pass(variant):
    r = verify_cache(variant)
    assert r.ok, [p.message for p in r.problems]


def scale_damage(fn, row=None):
    def damage(t: pa.Table) -> pa.Table:
        s = t.column(FACET + "__scale").to_numpy().copy()
        idx = slice(None) if row is None else [row]
        s[idx] = fn(s[idx])
        return with_column(t, FACET + "__scale", s)

    return damage


INT8_DAMAGE = [
    ("zero-scale", scale_damage(np.zeros_like, 2), "bad_scales", [FACET + "__scale"], [2]),
    ("negative-scales", scale_damage(np.negative), "bad_scales", [FACET + "__scale"], "all"),
    ("nan-scale", scale_damage(lambda s: s * np.nan, 3), "nonfinite_vectors",
     [FACET + "__scale"], [3]),
    ("halved-q", edit_vectors(FACET, [1, 4], lambda q: q // 2), "bad_scales", [FACET], [1, 4]),
    ("doubled-scale", scale_damage(lambda s: s * 2, 0), "unnormalized_vectors", [FACET], [0]),
    ("zero-q", edit_vectors(FACET, None, np.zeros_like), "zero_vectors", [FACET], "all"),
]  # fmt: skip


@pytest.mark.parametrize("damage, kind, columns, rows", [c[1:] for c in INT8_DAMAGE],
                         ids=[c[0] for c in INT8_DAMAGE])  # fmt: skip
@pytest.mark.parametrize("variant", ["int8"], indirect=True)
def test_int8_damage(variant, damage, kind, columns, rows):
    t = pq.read_table(shard(variant, 1))
    rewrite_shard(variant, 1, damage(t))
    r = verify_cache(variant)
    assert kinds(r) == {kind}, [p.message for p in r.problems]
    (p,) = r.problems
    want_rows = list(range(t.num_rows)) if rows == "all" else rows
    assert p.columns == columns and p.count == len(want_rows) and p.rows == want_rows[:5]


@pytest.mark.parametrize("variant", ["float32"], indirect=True)
def test_float32_norm_tolerance_is_tighter(variant):
    t = pq.read_table(shard(variant, 0))
    rewrite_shard(variant, 0, edit_vectors(FACET, [0], lambda v: v * 1.001)(t))
    (p,) = verify_cache(variant).problems
    assert p.kind == "unnormalized_vectors" and p.rows == [0] and "1.001" in p.message


@pytest.mark.parametrize("variant", ["raw"], indirect=True)
def test_unnormalised_recipe_promises_no_norm_but_no_zero_rows(variant):
    t = pq.read_table(shard(variant, 0))
    rewrite_shard(variant, 0, edit_vectors(FACET, None, lambda v: v * 2)(t))
    assert verify_cache(variant).ok  # the recipe does not normalise: any norm is its own
    rewrite_shard(variant, 0, edit_vectors(FACET, [5], np.zeros_like)(t))
    (p,) = verify_cache(variant).problems
    assert p.kind == "zero_vectors" and p.rows == [5]
