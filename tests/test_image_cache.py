"""Image caches and heads-only training: `embed-images` read back by DuckDB against a plain
timm forward pass, a kill and rerun equal to a clean run, the join of two caches by key, the
heads (glu included), a heads-only run on Ray that resumes and exports a model which `eval`
uses without Ray, and bad input refused with one clear line."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from cli import app
from store.cache import Cache
from store.errors import CacheError, InputError
from store.verify import verify_cache
from train.cache_pairs import iter_pair_batches, plan_pairs
from train.config import TrainConfig
from train.image_cache import ImageCacheConfig, check_cache_fits, run_embed_images
from train.model import GLU, ModelConfig, build_model, tower_outputs
from train.transforms import ImageTransform, eval_transform

ROOT = Path(__file__).resolve().parents[1]
SIZE, GRID, SHARD_ROWS = 64, 2, 40  # resnet10t at 64 px ends in a 2 x 2 map: the grid is exact


@pytest.fixture(scope="module")
def data(train_data):
    return train_data  # (synth at 32 px, flame-long cache of an untrained tiny LM)


def icache_args(images: Path, out: Path) -> list[str]:
    return [str(images), "--out", str(out), "--tower", "resnet10t", "--random-init",
            "--image-size", str(SIZE), "--grid", str(GRID), "--shard-rows", str(SHARD_ROWS),
            "--no-progress"]  # fmt: skip


def icache_config(images: Path, out: Path, **kw) -> ImageCacheConfig:
    kw = {"tower": "resnet10t", "random_init": True, "image_size": SIZE, "grid": GRID,
          "shard_rows": SHARD_ROWS, **kw}  # fmt: skip
    return ImageCacheConfig(images=images, out=out, **kw)


@pytest.fixture(scope="module")
def icache(data, tmp_path_factory):
    synth, _ = data
    out = tmp_path_factory.mktemp("icache") / "icache"
    summary = run_embed_images(icache_config(synth / "images", out), progress=False)
    return out, summary


def one_thread_env() -> dict:
    """The environment of a CLI subprocess whose features must equal the in-process clean
    run's bit for bit: one torch thread, as tests/conftest.py sets here (a different thread
    count sums the convolutions in another order: equal to ~1e-7, not bit for bit)."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def shard_entries(cache: Path) -> list[tuple]:
    return [(s.name, s.rows, s.sha256, s.input_start, s.input_end)
            for s in Cache.open(cache).manifest.shards]  # fmt: skip


def assert_same_cache(got: Path, want: Path) -> None:
    """A rerun's cache is the clean run's: the same rows (read with DuckDB), the same shard
    files byte for byte in the same manifest entries, and no file the manifest does not name."""
    a, b = frame(got), frame(want)
    assert list(a["key"]) == list(b["key"])
    for name in ("pooled", "grid_0_0", "grid_1_1"):
        assert np.array_equal(np.stack(a[name]), np.stack(b[name]))
    assert shard_entries(got) == shard_entries(want)
    assert sorted(p.name for p in (got / "shards").iterdir()) == [e[0] for e in shard_entries(got)]


def frame(cache: Path):
    """Every row of a cache via DuckDB (an independent reader), by key."""
    return duckdb.sql(f"SELECT * FROM read_parquet('{cache}/shards/*.parquet') ORDER BY key").df()


def tar_images(images: Path) -> dict[str, bytes]:
    """key -> JPEG bytes of the synthetic training images, straight from the tars."""
    out = {}
    for tar_path in sorted(images.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    out[m.name.split(".")[0]] = tar.extractfile(m).read()
    return out


# --- the image cache ---------------------------------------------------------------------------


def test_cache_holds_a_plain_timm_forward_pass_and_verifies(data, icache):
    import timm
    from safetensors.torch import load_file

    synth, _ = data
    out, summary = icache
    jpegs = tar_images(synth / "images")
    df = frame(out)
    assert sorted(df["key"]) == sorted(jpegs) and df["key"].is_unique
    assert summary.rows == len(jpegs) and summary.shards_written == -(-len(jpegs) // SHARD_ROWS)
    assert summary.failed_images > 0  # synth fails a few downloads on purpose; counted
    # The reference: the cache's backbone in a fresh timm model, the feature map averaged
    # by hand (resnet's pooled feature) and read position by position (the 2 x 2 grid).
    tower = timm.create_model("resnet10t", num_classes=0).eval()
    tower.load_state_dict(load_file(out / "backbone.safetensors"))
    recipe = Cache.open(out).recipe
    t = ImageTransform(SIZE, train=False, mean=tuple(recipe["transform"]["mean"]),
                       std=tuple(recipe["transform"]["std"]))  # fmt: skip
    keys = list(df["key"][:12])
    x = torch.from_numpy(
        np.stack([eval_transform(Image.open(io.BytesIO(jpegs[k])), t) for k in keys])
    )
    with torch.no_grad():
        fmap = tower.forward_features(x)  # [B, C, 2, 2]
    assert fmap.shape[-2:] == (GRID, GRID)
    got = {c: np.stack(df[c][:12]).astype(np.float32) for c in ("pooled", "grid_0_1", "grid_1_0")}
    np.testing.assert_allclose(got["pooled"], fmap.mean(dim=(2, 3)).numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(got["grid_0_1"], fmap[:, :, 0, 1].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(got["grid_1_0"], fmap[:, :, 1, 0].numpy(), rtol=2e-3, atol=2e-3)
    assert recipe["kind"] == "image" and recipe["model"] == "resnet10t"
    assert recipe["transform"]["image_size"] == SIZE and recipe["grid"] == GRID
    assert verify_cache(out).ok
    runner = CliRunner()
    for argv in (["inspect", str(out)], ["verify", str(out)],
                 ["sql", str(out), "SELECT count(*) AS n FROM embeddings"]):  # fmt: skip
        r = runner.invoke(app, argv)
        assert r.exit_code == 0, r.output
    assert str(len(jpegs)) in r.output


def test_killed_embed_images_then_rerun_equals_a_clean_run(data, icache, tmp_path):
    synth, _ = data
    out = tmp_path / "icache"
    cmd = [sys.executable, "-c", "from cli import app; app()", "embed-images",
           *icache_args(synth / "images", out)]  # fmt: skip
    env = {**one_thread_env(), "FACETCLIP_KILL_AFTER_SHARDS": "1"}
    killed = subprocess.run(cmd, env=env, capture_output=True, cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 1
    # Leftovers a crash can leave: a temp file and a renamed shard never recorded.
    (out / "shards" / ".part-00001.parquet.tmp-123").write_bytes(b"half a shard")
    (out / "shards" / "part-00002.parquet").write_bytes(b"not in the manifest")
    env.pop("FACETCLIP_KILL_AFTER_SHARDS")
    done = subprocess.run(cmd, env=env, capture_output=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode()
    assert "images from earlier runs" in done.stdout.decode()
    assert_same_cache(out, icache[0])


def test_a_kill_from_outside_at_a_random_moment_then_rerun_equals_a_clean_run(
    data, icache, tmp_path
):
    """SIGKILL from another process, a seeded random moment after the first shard was sealed:
    the kill may land mid-shard (a half-written temporary file), between the rename and the
    manifest, or after the run ended; the rerun must give the clean run's cache either way."""
    import random
    import time

    synth, _ = data
    out = tmp_path / "icache"
    cmd = [sys.executable, "-c", "from cli import app; app()", "embed-images",
           *icache_args(synth / "images", out)]  # fmt: skip
    env = one_thread_env()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            try:  # the manifest is replaced atomically; it may not exist yet
                if json.loads((out / "manifest.json").read_text())["shards"]:
                    break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.01)
        time.sleep(random.Random(15).uniform(0.0, 0.3))  # a shard takes ~0.1-0.5 s here
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    print("killed" if proc.returncode == -signal.SIGKILL else "ended first", proc.returncode,
          len(json.loads((out / "manifest.json").read_text())["shards"]), "shards sealed",
          sorted(p.name for p in (out / "shards").iterdir()))  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode()
    assert_same_cache(out, icache[0])
    assert verify_cache(out).ok


def test_two_tower_actors_write_the_cache_of_one(data, icache, tmp_path, ray_session):
    synth, _ = data
    out = tmp_path / "icache"
    summary = run_embed_images(icache_config(synth / "images", out, engines=2), progress=False)
    assert summary.engines == 2 and summary.engine_failures == 0
    assert shard_entries(out) == shard_entries(icache[0])  # the same bytes as in-process
    assert not [p.name for p in (out / "shards").iterdir() if p.name.startswith(".")]


# --- the join of two caches ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def partial_icache(data, tmp_path_factory):
    """An image cache sharing only part of its keys with the text cache: the first 10 training
    images left out, 5 held-out images (no caption in the text cache) added."""
    synth, _ = data
    folder = tmp_path_factory.mktemp("partial") / "images"
    folder.mkdir()
    train = tar_images(synth / "images")
    kept = dict(sorted(train.items())[10:])
    extra = sorted((synth / "eval" / "retrieval" / "images").glob("*.jpg"))[:5]
    for k, b in kept.items():
        (folder / f"{k}.jpg").write_bytes(b)
    for p in extra:
        (folder / p.name).write_bytes(p.read_bytes())
    out = folder.parent / "icache"
    run_embed_images(
        icache_config(folder, out, grid=0, image_size=32, shard_rows=25), progress=False
    )
    return out, set(kept), {p.stem for p in extra}


def test_join_counts_keys_missing_on_either_side(data, partial_icache):
    _, cache = data
    out, kept, extra = partial_icache
    text_keys = set(
        pq.read_table(Path(cache) / "shards", columns=["key"]).column("key").to_pylist()
    )
    plan = plan_pairs(str(cache), str(out))
    s = plan.stats
    assert (s.text_keys, s.image_keys) == (len(text_keys), len(kept | extra))
    assert s.joined == len(text_keys & (kept | extra)) == len(kept)
    assert s.texts_without_image == len(text_keys - kept) >= 10
    assert s.images_without_text == len(extra) == 5
    assert sorted(plan.table.column("key").to_pylist()) == sorted(text_keys & kept)


def test_batches_pair_each_text_with_its_own_image(data, partial_icache):
    _, cache = data
    out, _, _ = partial_icache
    plan = plan_pairs(str(cache), str(out), facets=["main_object", "atmosphere"])
    # Independent reference: DuckDB reads both caches; each vector's bytes name its key.
    texts, images = frame(cache), frame(out)
    text_key = {np.stack([a, b]).astype(np.float32).tobytes(): k
                for k, a, b in zip(texts["key"], texts["main_object"], texts["atmosphere"], strict=True)}  # fmt: skip
    image_key = {np.asarray(v).astype(np.float32).tobytes(): k
                 for k, v in zip(images["key"], images["pooled"], strict=True)}  # fmt: skip
    b = 8

    def keys_of(rank: int, world: int, start: int = 0, epoch: int = 1) -> list[list[str]]:
        batches = []
        for text, image, names in iter_pair_batches(plan, b, seed=3, epoch=epoch, rank=rank,
                                                    world_size=world, start_batch=start):  # fmt: skip
            assert text.shape == (b, 2, plan.text_dim) and image.shape == (b, 1, plan.image_dim)
            keys = [text_key[t.tobytes()] for t in text]
            assert keys == [image_key[i[0].tobytes()] for i in image]  # each row: one key
            assert names == keys  # the keys it names are the rows' own
            batches.append(keys)
        return batches

    one = keys_of(0, 1)
    flat = [k for batch in one for k in batch]
    assert len(flat) == len(set(flat)) == plan.stats.joined // b * b  # once each; whole batches
    assert keys_of(0, 1, start=2) == one[2:]  # a resumed epoch starts at its batch, no replay
    r0, r1 = keys_of(0, 2), keys_of(1, 2)
    assert len(r0) == len(r1) and not {k for x in r0 for k in x} & {k for x in r1 for k in x}
    assert keys_of(0, 1) == one and keys_of(0, 1, epoch=2) != one  # seeded, per epoch


def test_no_shared_key_is_refused_before_training(data, icache, tmp_path):
    from embed.pipeline import EmbedConfig, run_embed

    synth, cache = data
    heldout = tmp_path / "heldout-text"  # the held-out captions: no training image's key
    captions = synth / "eval" / "retrieval" / "captions.parquet"
    run_embed(EmbedConfig(captions, Cache.open(cache).recipe["model"], heldout,
                          recipe="flame-long"), progress=False)  # fmt: skip
    with pytest.raises(InputError, match="share no keys"):
        plan_pairs(str(heldout), str(icache[0]))


# --- heads ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_head,text_head", [("linear", "none"), ("mlp", "linear"),
                                                  ("glu", "glu"), ("token-mlp", "adapter")])  # fmt: skip
def test_heads_only_model_shapes(image_head, text_head):
    cfg = ModelConfig(tower="resnet10t", image_head=image_head, text_head=text_head,
                      embed_dim=32, glu_width=2, loss="siglip")  # fmt: skip
    model = build_model(cfg, text_dim=64, image_dim=48)
    assert model.tower is None and not any(
        n.startswith("tower.") for n, _ in model.named_parameters()
    )
    features = torch.randn(5, 4, 48) if image_head == "token-mlp" else torch.randn(5, 48)
    out = model(features, torch.randn(5, 3, 64))
    width = 64 if text_head == "none" else 32
    assert out["image_features"].shape == (5, width) and out["text_features"].shape == (5, 3, width)
    for k in ("image_features", "text_features"):
        torch.testing.assert_close(out[k].norm(dim=-1), torch.ones(out[k].shape[:-1]))


def test_glu_head_is_sails_gated_layer():
    torch.manual_seed(0)
    glu = GLU(6, 5, width=3)
    x = torch.randn(4, 6)
    h = F.layer_norm(x, (6,), glu.norm.weight, glu.norm.bias)
    a = h @ glu.gate.weight.T + glu.gate.bias
    v = h @ glu.value.weight.T + glu.value.bias
    want = (a.clamp(0, 6) * v) @ glu.out.weight.T + glu.out.bias
    assert glu.gate.weight.shape == (18, 6) and glu.out.weight.shape == (5, 18)
    torch.testing.assert_close(glu(x), want)


@pytest.mark.parametrize("image_head,grid", [("glu", 0), ("token-mlp", 2)])
def test_heads_on_cached_features_equal_heads_on_the_tower(image_head, grid):
    """What the image cache stores is what encode_image feeds the head: a heads-only model is
    the full model once its tower is put back."""
    cfg = ModelConfig(tower="resnet10t", image_head=image_head, text_head="none",
                      token_grid=grid, glu_width=2)  # fmt: skip
    torch.manual_seed(0)
    full = build_model(cfg, text_dim=16).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        pooled, tokens = tower_outputs(full.tower, x, grid)
        cached = tokens if image_head == "token-mlp" else pooled
        heads = build_model(cfg, text_dim=16, image_dim=cached.shape[-1])
        heads.load_state_dict(
            {k: v for k, v in full.state_dict().items() if not k.startswith("tower.")}
        )
        torch.testing.assert_close(heads(cached, torch.randn(3, 16))["image_features"],
                                   full.encode_image(x))  # fmt: skip


# --- a heads-only run: Ray Train, resume, export, eval without Ray -------------------------------


def heads_config(data, icache: Path, out: Path, **kw) -> TrainConfig:
    _, cache = data
    cfg = TrainConfig(image_cache=str(icache), cache=str(cache), out=str(out), steps=4,
                      batch_size=16, num_facets=3)  # fmt: skip
    cfg.model.image_head, cfg.model.text_head, cfg.model.glu_width = "glu", "glu", 2
    cfg.model.embed_dim = 32
    cfg.optim.warmup_steps, cfg.run.log_every, cfg.run.checkpoint_every = 1, 1, 2
    for k, v in kw.items():
        setattr(cfg.run, k, v)
    return cfg


@pytest.fixture(scope="module")
def heads_run(data, icache, tmp_path_factory, ray_session):
    from train.loop import train

    run = tmp_path_factory.mktemp("heads") / "run"
    train(heads_config(data, icache[0], run), progress=False)
    return run


def test_heads_only_run_resumes_to_the_same_weights(data, icache, heads_run, tmp_path):
    from safetensors.torch import load_file

    from store.runs import METRICS_FILE, latest_checkpoint
    from train.loop import TrainError, train

    broken = tmp_path / "broken"
    with pytest.raises(TrainError, match="--resume"):
        train(heads_config(data, icache[0], broken, fault_step=2, max_failures=0), progress=False)
    result = train(TrainConfig(out=str(broken)), resume=True, progress=False)
    assert result.steps == 4
    a = load_file(latest_checkpoint(heads_run) / "model.safetensors")
    b = load_file(latest_checkpoint(broken) / "model.safetensors")
    assert not any(k.startswith("tower.") for k in a)  # the tower never trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    rows = [json.loads(line) for line in (heads_run / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    stats = json.loads((heads_run / "data_stats.json").read_text())
    assert rows[-1]["skipped_texts_without_image"] == stats["texts_without_image"] > 0
    cfg = TrainConfig.from_toml(heads_run / "config.toml")
    assert (cfg.model.tower, cfg.data.image_size, cfg.images) == ("resnet10t", SIZE, "")


def test_export_carries_the_frozen_tower_and_eval_needs_no_ray(data, icache, heads_run, tmp_path):
    from safetensors.torch import load_file

    synth, _ = data
    icache_dir = icache[0]
    meta = json.loads((heads_run / "model" / "config.json").read_text())
    assert meta["backbone"]["fingerprint"] == Cache.open(icache_dir).recipe["model_fingerprint"]
    backbone = load_file(icache_dir / "backbone.safetensors")
    tower = load_file(heads_run / "model" / "tower.safetensors")
    assert all(torch.equal(backbone[k], tower[k]) for k in backbone)
    # An image cache of the eval split, made from the exported run's own tower.
    eval_split = synth / "eval" / "retrieval"
    eval_cache = tmp_path / "eval-icache"
    run_embed_images(ImageCacheConfig(images=eval_split, out=eval_cache, from_run=heads_run),
                     progress=False)  # fmt: skip
    train_keys = list(frame(icache_dir)["key"][:6])
    jpegs = tar_images(synth / "images")
    for k in train_keys:
        (tmp_path / f"{k}.jpg").write_bytes(jpegs[k])
    script = f"""
import sys, json, numpy as np
sys.modules["ray"] = None  # importing ray now fails: export and eval must not need it
from PIL import Image
from eval.evaluation import EvalConfig, evaluate
from store.cache import Cache
from train.export import load
from train.image_cache import cached_features
m = load({str(heads_run)!r})
keys = {train_keys!r}
on_tower = m.encode_image([Image.open({str(tmp_path)!r} + f"/{{k}}.jpg") for k in keys])
cached = m.encode_features(cached_features(Cache.open({str(icache_dir)!r}), keys, None))
out = {{"cos": float((on_tower * cached).sum(axis=1).min())}}
for ic in (None, {str(eval_cache)!r}):
    r = evaluate(EvalConfig(run={str(heads_run)!r}, task="retrieval", data={str(eval_split)!r},
                            plots=False, image_cache=ic))
    out[str(ic)] = r.features[0].tolist()
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["cos"] > 0.999  # the export's tower gives the features the heads trained on
    on_tower, from_cache = np.array(got["None"]), np.array(got[str(eval_cache)])
    assert on_tower.shape == from_cache.shape == (8, 32)
    assert (on_tower * from_cache).sum(axis=1).min() > 0.999


# --- bad input: one clear line -------------------------------------------------------------------


def _one_line_error(argv: list[str], cfg: ImageCacheConfig) -> str:
    """The CLI prints the error (no traceback) and exits 2; the message is one line (the
    console may wrap it on a narrow terminal)."""
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2 and r.output.startswith("error:"), r.output
    assert "Traceback" not in r.output
    with pytest.raises(InputError) as e:
        run_embed_images(cfg, progress=False)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_unknown_tower_and_missing_weights_get_one_line(data, tmp_path):
    synth, _ = data
    images = synth / "images"
    line = _one_line_error(
        ["embed-images", str(images), "--out", str(tmp_path / "a"), "--tower", "resnet10tt",
         "--random-init"],
        ImageCacheConfig(images, tmp_path / "a", tower="resnet10tt", random_init=True),
    )  # fmt: skip
    assert "unknown timm model 'resnet10tt'" in line and "resnet10t" in line
    line = _one_line_error(
        ["embed-images", str(images), "--out", str(tmp_path / "b"), "--tower", "resnet10t"],
        ImageCacheConfig(images, tmp_path / "b", tower="resnet10t"),
    )
    assert "--weights" in line and "--random-init" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_image_cache_of_another_transform_or_tower_is_refused_by_eval(
    data, heads_run, icache, tmp_path
):
    from eval.evaluation import EvalConfig, evaluate

    synth, _ = data
    eval_split = synth / "eval" / "retrieval"
    meta = json.loads((heads_run / "model" / "config.json").read_text())
    other_size = tmp_path / "48px"
    run_embed_images(ImageCacheConfig(images=eval_split, out=other_size, from_run=heads_run,
                                      image_size=48), progress=False)  # fmt: skip
    with pytest.raises(InputError, match="another transform") as e:
        check_cache_fits(Cache.open(other_size).recipe, meta, str(other_size))
    assert "\n" not in str(e.value) and "48 px" in str(e.value) and f"{SIZE} px" in str(e.value)
    other_tower = tmp_path / "seed1"
    run_embed_images(icache_config(eval_split, other_tower, seed=1), progress=False)
    for cache, what in (
        (other_size, "another transform"),
        (other_tower, "not of this model's tower"),
    ):
        with pytest.raises(InputError, match=what) as e:
            evaluate(EvalConfig(run=heads_run, task="retrieval", data=eval_split, plots=False,
                                image_cache=cache))  # fmt: skip
        assert "\n" not in str(e.value)


def test_token_mlp_on_a_cache_without_a_grid_is_refused(data, partial_icache, tmp_path):
    from train.loop import prepare_run

    cfg = heads_config(data, partial_icache[0], tmp_path / "r")
    cfg.model.image_head = "token-mlp"
    with pytest.raises(InputError, match="--grid"):
        prepare_run(cfg)
    with pytest.raises(CacheError, match="caption cache"):
        prepare_run(heads_config(data, data[1], tmp_path / "r2"))
