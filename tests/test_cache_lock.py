"""One writer at a time: `embed` and `verify --repair` hold the cache's writer lock; a live
holder is refused in one line naming its pid, a dead one's lock is taken over. The concurrent
writers here are real processes (a `facetclip embed` stopped with SIGSTOP mid-run, one killed
with SIGKILL)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from embed.pipeline import EmbedConfig, run_embed
from store.cache import LOCK_FILE, Cache, CacheLock, read_lock_record
from store.errors import CacheError
from store.verify import verify_cache

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_second_holder_is_refused_naming_the_first(tmp_path):
    with CacheLock.acquire(tmp_path, "facetclip embed x --out c", create=True) as lock:
        record = read_lock_record(tmp_path)
        assert record["pid"] == os.getpid() and record["command"] == "facetclip embed x --out c"
        with pytest.raises(CacheError) as e:
            CacheLock.acquire(tmp_path, "facetclip verify --repair c")
        msg = str(e.value)
        assert f"process {os.getpid()}" in msg and "facetclip embed x --out c" in msg
        assert "wait for it to finish or stop it" in msg and "\n" not in msg
        assert lock.fd is not None
    assert not (tmp_path / LOCK_FILE).exists()  # released: the file goes with the lock
    CacheLock.acquire(tmp_path, "again").release()


def test_lock_is_not_pickled_with_the_cache(tmp_path):
    cache = Cache.create(tmp_path / "c", {"name": "r"}, {"dim": 4}, 10, {"path": "x"},
                         writer="test")  # fmt: skip
    assert cache.lock is not None
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.lock is None
    del copy  # a copy's garbage collection must not release the original's lock
    with pytest.raises(CacheError, match="being written by"):
        CacheLock.acquire(tmp_path / "c", "other")
    cache.unlock()
    CacheLock.acquire(tmp_path / "c", "other").release()


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from store.cache import CacheLock; lock = CacheLock.acquire(Path(sys.argv[1]), 'holder'); "
         "print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        env=ENV, cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CacheError, match=f"process {holder.pid} on .*holder"):
            CacheLock.acquire(tmp_path, "me")
    finally:
        holder.kill()
        holder.wait()
    assert read_lock_record(tmp_path)["pid"] == holder.pid  # its file is left behind
    lock = CacheLock.acquire(tmp_path, "me")
    assert lock.taken_over["pid"] == holder.pid and read_lock_record(tmp_path)["command"] == "me"
    lock.release()


@pytest.fixture(scope="module")
def captions(tmp_path_factory, synth_data):
    """240 captions (the synth captions twice, new keys): an embed long enough to stop."""
    t = pq.read_table(synth_data / "captions.parquet")
    parts = [t.set_column(0, "key", pa.array([f"{i}-{k}" for k in t.column("key").to_pylist()]))
             for i in range(2)]  # fmt: skip
    path = tmp_path_factory.mktemp("lock-input") / "captions.parquet"
    pq.write_table(pa.concat_tables(parts), path)
    return path


def embed_cmd(captions: Path, model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cli", "embed", str(captions), "--model", str(model),
            "--out", str(out), "--recipe", "flame-long", "--shard-rows", "20", "--no-progress"]  # fmt: skip


def wait_for_first_shard(out: Path, pid: int, proc: subprocess.Popen) -> None:
    """Until ``proc`` holds the lock and has committed a shard (of 12)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        record = read_lock_record(out)
        if record and record.get("pid") == pid:
            try:
                if json.loads((out / "manifest.json").read_text())["shards"]:
                    return
            except (OSError, ValueError):
                pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise AssertionError("embed never committed a shard")


def test_repair_and_second_embed_refused_while_an_embed_runs(tmp_path, captions, tiny_model):
    out = tmp_path / "cache"
    proc = subprocess.Popen(embed_cmd(captions, tiny_model, out), env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for_first_shard(out, proc.pid, proc)
        os.kill(proc.pid, signal.SIGSTOP)  # a live writer, mid-run, holding the lock
        # The CLI: one line, exit 2, naming the pid and the command.
        r = CliRunner().invoke(app(), ["verify", "--repair", str(out)])
        assert r.exit_code == 2 and "Traceback" not in r.output
        lines = [line for line in r.output.splitlines() if line.strip()]
        text = " ".join(lines)
        assert f"process {proc.pid}" in text and "facetclip embed" in text
        assert text.startswith("error:") and "wait for it to finish or stop it" in text
        with pytest.raises(CacheError, match=f"being written by process {proc.pid}"):
            run_embed(EmbedConfig(captions, str(tiny_model), out, recipe="flame-long",
                                  shard_rows=20), progress=False)  # fmt: skip
        # A read-only verify still runs, and says who is writing.
        report = verify_cache(out)
        assert f"process {proc.pid} (facetclip embed" in report.writer
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert not (out / LOCK_FILE).exists()
    r = verify_cache(out)
    assert r.ok and r.rows == pq.read_metadata(captions).num_rows and r.writer == ""


def test_killed_embed_leaves_a_lock_that_repair_and_embed_take_over(tmp_path, captions, tiny_model):
    out = tmp_path / "cache"
    env = {**ENV, "FACETCLIP_KILL_AFTER_SHARDS": "2"}
    killed = subprocess.run(embed_cmd(captions, tiny_model, out), env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert read_lock_record(out)["pid"] == killed_pid(out)
    report = verify_cache(out, repair=True)
    assert report.ok and report.shards == 2 and not (out / LOCK_FILE).exists()
    done = subprocess.run(embed_cmd(captions, tiny_model, out), env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert verify_cache(out).ok


def killed_pid(out: Path) -> int:
    pid = json.loads((out / LOCK_FILE).read_text())["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


def app():
    from cli import app

    return app
