"""Stage one on Ray (`embed --engines N [--ray-address]`) and caches on a non-local filesystem.

The reference is always the in-process `--engines 1` cache of the same captions: engine actors
must write the very same rows and vectors, an actor killed mid-run must cost nothing but a
recomputed shard, and a cache in a pyarrow filesystem (fsspec's in-memory one, so nothing
touches the local disk) must read back equal through store/ and stage two's reader.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from embed.distributed import KILL_ACTOR_ENV
from embed.pipeline import EmbedConfig, run_embed
from store.cache import Cache
from store.reader import KeyIndex, iter_batches, iter_cache

ROOT = Path(__file__).parents[1]
N_CAPTIONS, SHARD_ROWS = 50, 10


def config(synth_data, tiny_model, out, **kw) -> EmbedConfig:
    return EmbedConfig(
        captions=synth_data / "captions.parquet", model=str(tiny_model), out=out,
        recipe="flame-long", shard_rows=SHARD_ROWS, limit=N_CAPTIONS, **kw,
    )  # fmt: skip


def cache_table(root, filesystem=None) -> pa.Table:
    """Every row of a cache's finished shards, read by pyarrow alone, sorted by key."""
    cache = Cache.open(root, filesystem)
    table = pa.concat_tables(
        pq.read_table(p, filesystem=cache.fs).replace_schema_metadata(None)
        for p in cache.shard_paths
    )
    return table.sort_by("key")


def manifest_ranges(root, filesystem=None) -> list[tuple[int, int, int, int]]:
    return [
        (s.index, s.input_start, s.input_end, s.rows)
        for s in Cache.open(root, filesystem).manifest.shards
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synth_data, tiny_model):
    """The --engines 1 cache (in-process, no Ray)."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    summary = run_embed(config(synth_data, tiny_model, out), progress=False)
    assert summary.rows == N_CAPTIONS and summary.engines == 1
    return out


def test_two_engines_write_the_cache_of_one(
    tmp_path, synth_data, tiny_model, reference, ray_session
):
    out = tmp_path / "cache"
    summary = run_embed(config(synth_data, tiny_model, out, engines=2), progress=False)
    assert (summary.rows, summary.shards_written, summary.engine_failures) == (N_CAPTIONS, 5, 0)

    got, want = cache_table(out), cache_table(reference)
    assert got.column("key").to_pylist() == want.column("key").to_pylist()
    assert got.equals(want)  # every column: vectors, token counts, truncated flags, texts
    assert manifest_ranges(out) == manifest_ranges(reference)
    # Same bytes, too: actors write shards exactly as the in-process path does.
    sha = {s.index: s.sha256 for s in Cache.open(out).manifest.shards}
    assert sha == {s.index: s.sha256 for s in Cache.open(reference).manifest.shards}
    assert not [p.name for p in (out / "shards").iterdir() if p.name.startswith(".")]

    again = run_embed(config(synth_data, tiny_model, out, engines=2), progress=False)
    assert (again.rows, again.shards_reused, again.rows_reused) == (0, 5, N_CAPTIONS)


def test_killed_actor_loses_only_its_shard_in_flight(
    tmp_path, synth_data, tiny_model, reference, ray_session, monkeypatch
):
    # Actor 0 SIGKILLs itself after staging its first shard, before handing it back.
    monkeypatch.setenv(KILL_ACTOR_ENV, "1")
    out = tmp_path / "cache"
    summary = run_embed(config(synth_data, tiny_model, out, engines=2), progress=False)
    assert summary.engine_failures == 1
    assert summary.rows == N_CAPTIONS and summary.shards_written == 5

    manifest = Cache.open(out).manifest
    indices = [s.index for s in manifest.shards]
    assert indices == sorted(set(indices)) == list(range(5))  # no shard twice
    assert manifest_ranges(out) == manifest_ranges(reference)
    keys = cache_table(out).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == N_CAPTIONS
    assert cache_table(out).equals(cache_table(reference))
    # The dead actor's staged files are gone: only the manifest's shards remain.
    assert sorted(p.name for p in (out / "shards").iterdir()) == [s.name for s in manifest.shards]


def test_every_actor_dying_stops_with_a_clear_error(
    tmp_path, synth_data, tiny_model, ray_session, monkeypatch
):
    from embed.pipeline import EmbedError

    monkeypatch.setenv(KILL_ACTOR_ENV, "1")
    cfg = config(synth_data, tiny_model, tmp_path / "cache", engines=2, max_engine_failures=0)
    with pytest.raises(
        EmbedError, match=r"(?s)engine actor\(s\) died .*rerun the same command to resume"
    ):
        run_embed(cfg, progress=False)


# --- a cache on another filesystem -----------------------------------------------------------


@pytest.fixture
def memory_fs():
    """fsspec's in-memory filesystem as a pyarrow filesystem, and a fresh folder in it."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/facetclip-test-{uuid.uuid4().hex}"
    yield pafs.PyFileSystem(pafs.FSSpecHandler(fs)), f"{root}/cache"
    fs.rm(root, recursive=True)


def test_cache_on_a_pyarrow_filesystem_reads_back_equal(
    synth_data, tiny_model, reference, memory_fs
):
    fs, root = memory_fs
    summary = run_embed(config(synth_data, tiny_model, root, out_filesystem=fs), progress=False)
    assert summary.rows == N_CAPTIONS
    assert not Path(root).exists()  # nothing went to the local disk

    assert cache_table(root, fs).equals(cache_table(reference))
    assert manifest_ranges(root, fs) == manifest_ranges(reference)
    cache = Cache.open(root, fs)
    got = {
        k: v
        for keys, vecs in iter_cache(cache)
        for k, v in zip(keys, vecs["main_object"], strict=True)
    }
    want = {
        k: v
        for keys, vecs in iter_batches(reference, ["main_object"], batch_rows=7)
        for k, v in zip(keys, vecs["main_object"], strict=True)
    }
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)
    some = sorted(want)[::9]
    found = KeyIndex.load(cache).vectors(some, ["main_object"])["main_object"]
    assert np.array_equal(found, np.stack([want[k] for k in some]))

    # A crash's leftovers in the object store are removed on resume, finished shards reused.
    handler = fs.open_output_stream
    with handler(f"{root}/shards/.part-00007.parquet.tmp-1-abc") as f:
        f.write(b"half a shard")
    with handler(f"{root}/shards/part-00008.parquet") as f:
        f.write(b"not in the manifest")
    again = run_embed(config(synth_data, tiny_model, root, out_filesystem=fs), progress=False)
    assert (again.rows, again.shards_reused) == (0, 5)
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{root}/shards"))]
    assert sorted(names) == [s.name for s in cache.manifest.shards]


def test_training_reader_joins_a_cache_on_a_pyarrow_filesystem(
    synth_data, tiny_model, reference, memory_fs
):
    from train.data import DataConfig, UnitReader, plan_join

    fs, root = memory_fs
    run_embed(config(synth_data, tiny_model, root, out_filesystem=fs), progress=False)
    facets = ["main_object", "atmosphere"]
    remote = plan_join(DataConfig(synth_data / "images", root, facets, cache_filesystem=fs))
    local = plan_join(DataConfig(synth_data / "images", reference, facets))
    assert remote.stats == local.stats and remote.table.equals(local.table)

    t = remote.table.slice(0, 5)
    shard, rg = int(t.column("shard")[0].as_py()), int(t.column("rg")[0].as_py())
    rows, keys = t.column("row").to_numpy(), t.column("key").to_pylist()
    vectors = UnitReader.of(remote).vectors(shard, rg, rows, keys)
    index = KeyIndex.load(reference)
    want = index.vectors(keys, facets)
    assert np.array_equal(vectors, np.stack([want[f] for f in facets], axis=1))


# --- a Ray cluster started on its own, joined by both stages ----------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, f"{cmd[:2]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_both_stages_join_a_ray_head_started_separately(tmp_path, synth_data, tiny_model):
    """`ray start --head` in its own process; embed (2 engine actors) and train join it.

    The head runs with --block and is stopped by terminating that one process (its Ray
    processes share its fate), not with `ray stop`, which would stop every Ray on the host.
    Each step has a timeout, so a wedged cluster fails the test instead of hanging it.
    """
    from train.config import TrainConfig

    bin_dir = Path(sys.executable).parent
    # Ray workers and the CLI must import this checkout, whichever one is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}  # fmt: skip
    env.pop(KILL_ACTOR_ENV, None)
    # Ray 2.60's `ray start` turns token authentication on whenever ~/.ray/auth_token exists
    # (any earlier local ray.init writes one), while a client joining by address does not:
    # state the mode for head and clients alike, so the host's history cannot matter.
    env["RAY_AUTH_MODE"] = "disabled"
    port = _free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = tempfile.mkdtemp(prefix="fcray-")  # short: Ray's socket paths have a length cap
    log = tmp_path / "ray-head.log"
    # Every port the head would otherwise take at a fixed default is a free one: other Ray
    # clusters on this host must not make the test fail.
    ports = {f"--{name}-port": str(_free_port())
             for name in ("dashboard", "ray-client-server", "dashboard-agent-listen")}  # fmt: skip
    with open(log, "wb") as out:
        head = subprocess.Popen(
            [str(bin_dir / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
             "--port", str(port), "--num-cpus", "4", "--num-gpus", "0",
             "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", temp_dir,
             *(x for kv in ports.items() for x in kv), "--block"],
            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text(errors="replace"):
            assert head.poll() is None, f"ray start --head exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"no Ray head after 180 s:\n{log.read_text()[-3000:]}"
            )
            time.sleep(1)

        cache = tmp_path / "cache"
        done = _run(
            [str(bin_dir / "facetclip"), "embed", str(synth_data / "captions.parquet"),
             "--model", str(tiny_model), "--out", str(cache), "--recipe", "flame-long",
             "--shard-rows", str(SHARD_ROWS), "--limit", str(N_CAPTIONS), "--engines", "2",
             "--ray-address", address, "--no-progress"],
            env, timeout=300,
        )  # fmt: skip
        assert "rows embedded" in done.stdout
        assert Cache.open(cache).rows == N_CAPTIONS

        cfg = TrainConfig(images=str(synth_data / "images"), cache=str(cache), out="",
                          steps=2, batch_size=8, num_facets=3)  # fmt: skip
        cfg.model.tower = "vit_tiny_patch16_224"
        cfg.model.tower_kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1,
                                  "num_heads": 2}  # fmt: skip
        cfg.data.image_size = 32
        cfg.optim.warmup_steps = 1
        cfg.run.log_every = 1
        cfg.run.checkpoint_every = 2
        (tmp_path / "train.toml").write_text(cfg.to_toml())
        run = tmp_path / "run"
        _run(
            [str(bin_dir / "facetclip"), "train", "--config", str(tmp_path / "train.toml"),
             "--out", str(run), "--ray-address", address, "--no-progress"],
            env, timeout=400,
        )  # fmt: skip
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert metrics and metrics[-1]["step"] == 2 and np.isfinite(metrics[-1]["loss"])
        assert (run / "model").is_dir()
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=30)
