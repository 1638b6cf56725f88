"""Stage two's input pipeline: images joined by key to the cache, decoded, counted, seeded.

Every expectation is computed independently: keys and failures from the synth's labels.parquet,
vectors from the cache's shards read with pandas, pixels from PIL decoding the stored bytes.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from embed.pipeline import EmbedConfig, run_embed
from eval.synth import SynthConfig, write_synth
from store.cache import Cache
from store.errors import InputError
from train.data import DataConfig, build_dataset, plan_join, scan_keys
from train.transforms import IMAGE_BYTES, decode_batch, drop_invalid

N, EMBEDDED = 60, 45  # the cache holds the first 45 captions: the last images have no vectors
FACETS = ["atmosphere", "main_object"]  # not the cache's order: `text` must follow this one
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model):
    """Both img2dataset formats of one synth dataset (same keys), and a cache of part of it."""
    root = tmp_path_factory.mktemp("train_data")
    for fmt in ("webdataset", "parquet"):
        write_synth(
            root / fmt,
            SynthConfig(n=N, shard_size=30, n_retrieval=5, n_zeroshot_per_class=1, format=fmt),
            progress=False,
        )
    cache = root / "cache"
    run_embed(
        EmbedConfig(
            captions=root / "webdataset" / "captions.parquet",
            model=str(tiny_model),
            out=cache,
            recipe="flame-long",
            shard_rows=20,
            limit=EMBEDDED,
        ),
        progress=False,
    )
    return root, cache


@pytest.fixture(scope="module")
def ray_data_session(ray_session):
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False


def cache_vectors(cache: Path) -> dict[str, np.ndarray]:
    """key -> float32 [K, D] in FACETS order, read without facetclip's reader."""
    df = pd.concat([pd.read_parquet(p) for p in Cache.open(cache).shard_paths])
    return {
        k: np.stack([np.asarray(row[f], np.float32) for f in FACETS])
        for k, (_, row) in zip(df["key"], df.iterrows(), strict=True)
    }


def stored_jpegs(root: Path, fmt: str) -> dict[str, bytes]:
    images = root / fmt / "images"
    if fmt == "parquet":
        df = pd.concat([pd.read_parquet(p) for p in sorted(images.glob("*.parquet"))])
        return {k: v for k, v in zip(df["key"], df["jpg"], strict=True) if v is not None}
    out = {}
    for path in sorted(images.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    out[m.name[: -len(".jpg")]] = tar.extractfile(m).read()
    return out


def normalised(jpeg: bytes, cfg: DataConfig) -> np.ndarray:
    x = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float64) / 255.0
    return ((x - np.array(cfg.mean)) / np.array(cfg.std)).transpose(2, 0, 1)


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_rows_carry_the_cache_vectors_of_their_key(data, ray_data_session, fmt):
    root, cache = data
    labels = pd.read_parquet(root / fmt / "labels.parquet").query("split == 'train'")
    ok = labels[~labels["failed"]]["key"].tolist()
    embedded = labels["key"].tolist()[:EMBEDDED]
    want_keys = [k for k in embedded if k in set(ok)]  # cache order
    # Eval mode: every row, cache order, centre resize (identity at the stored 64 px).
    cfg = DataConfig(root / fmt / "images", cache, facets=FACETS, train=False, unit_rows=7, decode_rows=4)  # fmt: skip
    plan = plan_join(cfg)
    assert plan.image_format == fmt
    s = plan.stats
    assert (s.image_keys, s.cache_keys, s.joined) == (len(ok), EMBEDDED, len(want_keys))
    assert s.failed_images == int(labels["failed"].sum()) > 0
    assert s.images_without_vectors == len(ok) - len(want_keys) > 0
    assert s.vectors_without_images == EMBEDDED - len(want_keys) > 0  # the failed downloads

    rows = build_dataset(cfg, plan=plan).take_all()
    assert [r["key"] for r in rows] == want_keys
    vectors, jpegs = cache_vectors(cache), stored_jpegs(root, fmt)
    for r in rows:
        assert r["valid"] and r["text"].dtype == np.float32 and r["text"].shape == (2, 64)
        np.testing.assert_array_equal(r["text"], vectors[r["key"]])
        assert r["image"].dtype == np.float32 and r["image"].shape == (3, 64, 64)
        np.testing.assert_allclose(r["image"], normalised(jpegs[r["key"]], cfg), atol=1e-5)


def test_same_seed_same_order_and_pixels(data, ray_data_session):
    root, cache = data
    cfg = DataConfig(root / "webdataset" / "images", cache, seed=3, unit_rows=8, decode_rows=5)
    plan = plan_join(cfg)

    def epoch(e: int, **kw):
        rows = build_dataset(cfg, epoch=e, plan=plan, **kw).take_all()
        return [r["key"] for r in rows], {r["key"]: r["image"] for r in rows}

    keys, pixels = epoch(0)
    again_keys, again_pixels = epoch(0)
    assert keys == again_keys and len(keys) == plan.stats.joined
    assert all(np.array_equal(pixels[k], again_pixels[k]) for k in keys)
    cache_order = plan.table.column("key").to_pylist()
    assert keys != cache_order and sorted(keys) == sorted(cache_order)  # shuffled, all there

    next_keys, next_pixels = epoch(1)
    assert next_keys != keys  # another order and other crops in another epoch
    assert not all(np.array_equal(pixels[k], next_pixels[k]) for k in keys)

    # Two ranks: equal disjoint slices of the same epoch, a sample's crop independent of rank.
    (k0, p0), (k1, _) = epoch(0, rank=0, world_size=2), epoch(0, rank=1, world_size=2)
    assert len(k0) == len(k1) == len(keys) // 2 and not set(k0) & set(k1)
    assert all(np.array_equal(p0[k], pixels[k]) for k in k0)


def test_unreadable_images_are_invalid_rows_not_errors(data, ray_data_session, tmp_path):
    """A CSV of key + path: a corrupt file and a missing one arrive as valid=False rows."""
    root, cache = data
    jpegs = stored_jpegs(root, "webdataset")
    keys = sorted(jpegs)[:6]
    (tmp_path / "img").mkdir()
    for k in keys:
        (tmp_path / "img" / f"{k}.jpg").write_bytes(jpegs[k])
    (tmp_path / "img" / f"{keys[1]}.jpg").write_bytes(jpegs[keys[1]][:300])  # truncated
    (tmp_path / "img" / f"{keys[2]}.jpg").unlink()  # listed, but gone
    rel = [f"img/{k}.jpg" for k in keys]
    pd.DataFrame({"key": keys, "image": rel}).to_csv(tmp_path / "images.csv", index=False)

    cfg = DataConfig(tmp_path, cache, train=False)
    plan = plan_join(cfg)
    assert plan.image_format == "csv" and plan.stats.joined == len(keys)
    rows = build_dataset(cfg, plan=plan).take_all()
    valid = {r["key"]: bool(r["valid"]) for r in rows}
    assert valid == {k: k not in keys[1:3] for k in keys}
    assert all(not r["image"].any() for r in rows if not r["valid"])

    # The same folder read as img2dataset `files`: the missing file is simply not an image.
    stats = scan_keys(DataConfig(tmp_path / "img", cache, image_format="files"))
    assert (stats.image_keys, stats.joined) == (len(keys) - 1, len(keys) - 1)


def test_decode_batch_counts_corrupt_bytes(data):
    root, cache = data
    good = next(iter(stored_jpegs(root, "webdataset").values()))
    batch = {
        "key": ["a", "b", "c", "d"],
        IMAGE_BYTES: [good, good[: len(good) // 2], b"not an image", None],
        "text": np.ones((4, 2, 8), np.float32),
    }
    for train in (True, False):
        cfg = DataConfig(root, cache, image_size=32, train=train)
        out = decode_batch(batch, cfg.transform)
        assert out["valid"].tolist() == [True, False, False, False]
        assert out["image"].shape == (4, 3, 32, 32) and out["image"].dtype == np.float32
        assert out["image"][0].std() > 0 and not out["image"][1:].any()
        assert IMAGE_BYTES not in out and out["text"] is batch["text"]
        kept, dropped = drop_invalid(out)
        assert dropped == 3 and kept["key"] == ["a"] and kept["image"].shape == (1, 3, 32, 32)


def test_no_shared_keys_is_an_error_before_ray(data):
    """eval/retrieval (images/ + captions.parquet) has no key in the train cache. The check
    runs in a fresh interpreter to show that it never imports Ray."""
    root, cache = data
    code = (
        "import sys\n"
        "from train.data import DataConfig, scan_keys\n"
        "from store.errors import InputError\n"
        f"try:\n    scan_keys(DataConfig({str(root / 'webdataset/eval/retrieval')!r}, {str(cache)!r}))\n"
        "except InputError as e:\n    print(e)\n"
        "assert 'ray' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    retrieval = pd.read_parquet(root / "webdataset/eval/retrieval/captions.parquet")
    assert "share no keys" in done.stdout
    assert retrieval["key"][0] in done.stdout  # a sample of the images' keys ...
    assert (
        pd.read_parquet(Cache.open(cache).shard_paths[0])["key"][0] in done.stdout
    )  # ... and the cache's
    with pytest.raises(InputError, match="share no keys"):
        build_dataset(DataConfig(root / "webdataset/eval/retrieval", cache))
