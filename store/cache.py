"""A cache directory: its recipe, its manifest of finished shards, and atomic shard writes.

```
CACHE/
  recipe.toml        the exact recipe incl. model fingerprint; another recipe is refused
  manifest.json      layout + one entry per finished shard (rows, bytes, sha256, input range)
  shards/part-00000.parquet ...
  skipped/part-00000.parquet ...   rows not embedded, with the reason (one file per shard)
```

Crash safety: a shard is written to a temporary name, fsynced, renamed into place, and only
then recorded in the manifest, which is itself rewritten atomically (temp + fsync + rename).
A shard file without a manifest entry is unfinished work and is recomputed on resume, so a
killed run never leaves a row twice or a half-written file in the manifest.

Writing is two steps, ``stage_shard`` (temporary files) and ``commit_shard`` (rename into
place + manifest), so that distributed embedding can stage shards on many engine actors
while one process, the driver, alone commits them: one manifest writer, never a shard twice.

One writer at a time: ``facetclip embed`` and ``facetclip verify --repair`` hold the cache's
writer lock (``CacheLock``, a ``flock`` on ``CACHE/writer.lock``) while they write, so a repair
can never delete the shards an embed is staging, nor two embeds clean up each other's files.

Where a cache lives: a local folder (``cache/flame``, or ``file:///…``), or any filesystem
``pyarrow.fs`` writes, given as a URI (``s3://bucket/caches/flame``, ``gs://…``) or as an
explicit ``pyarrow.fs.FileSystem`` plus a path in it. Local folders keep the fsync + rename
path above. Object stores have no atomic rename (a move is copy + delete) and no fsync: there
the manifest, written last as one object, is the commit point; a shard object that the
manifest does not list is unfinished work, removed on resume like a local orphan.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
import tomllib
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from store.errors import CacheError
from store.format import META_LAYOUT, META_RECIPE
from store.tomlfile import dump_toml, read_toml

RECIPE_FILE = "recipe.toml"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
SKIPPED_DIR = "skipped"
LOCK_FILE = "writer.lock"
SKIPPED_SCHEMA = pa.schema(
    [("key", pa.string()), ("input_row", pa.int64()), ("reason", pa.string())]
)


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _temp_name(name: str) -> str:
    # pid + a random part: engine actors on several hosts may share one NFS or S3 folder.
    return f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _parquet_options(table: pa.Table) -> dict:
    """pq.write_table options for a cache shard (vector columns raw, the rest zstd)."""
    # Row groups of ~64 MB (at most 64k rows) bound the memory of a streaming reader: one
    # FLAME row of a 5120-wide LLM is 112 KB, so a fixed row count would not.
    row_bytes = max(1, table.nbytes // max(1, table.num_rows))
    # Vector columns: no dictionary and no compression. Dictionary-encoding float16 lists made
    # reads 4x slower and zstd another 1.5x, for nothing: LLM vectors do not compress.
    # int8 vectors keep the dictionary: Parquet stores int8 as 32-bit integers, and a
    # dictionary of at most 255 values packs them back to one byte each.
    vectors = {f.name for f in table.schema if pa.types.is_fixed_size_list(f.type)}
    int8 = {
        f.name for f in table.schema if f.name in vectors and pa.types.is_int8(f.type.value_type)
    }
    others = [f.name for f in table.schema if f.name not in vectors]
    return dict(
        compression={name: ("none" if name in vectors else "zstd") for name in table.column_names},
        use_dictionary=others + [f"{name}.list.element" for name in sorted(int8)],  # leaf paths
        write_statistics=others,
        row_group_size=int(min(65536, max(1, (64 << 20) // row_bytes))),
    )


def _write_parquet_temp(table: pa.Table, path: Path) -> Path:
    """Write Parquet next to ``path`` under a temporary name and fsync it; returns that name."""
    tmp = path.with_name(_temp_name(path.name))
    pq.write_table(table, tmp, **_parquet_options(table))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    return tmp


def _replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write Parquet to a temp name, fsync, rename into place, fsync the folder."""
    _replace(_write_parquet_temp(table, path), path)


# --- one writer at a time -----------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except PermissionError:
        return True  # it exists, owned by someone else
    except (ProcessLookupError, OverflowError):
        return False
    return True


def _holder_text(record: dict | None) -> str:
    """``process 123 on host (facetclip embed …, since 12:00:01)`` from a lock file's record."""
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return "another process"
    pid, host = record["pid"], record.get("host", "?")
    text = f"process {pid} on {host}"
    details = [str(record["command"])] if record.get("command") else []
    if isinstance(record.get("since"), (int, float)):
        details.append(
            "since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["since"]))
        )
    if host == socket.gethostname() and not pid_alive(pid):
        # A flock outlives its process only in a child that inherited the descriptor.
        details.append("it has exited, but a process it started still holds the lock")
    return text + (f" ({', '.join(details)})" if details else "")


def read_lock_record(root: Path) -> dict | None:
    """What ``CACHE/writer.lock`` says about its holder, or None (no file, unreadable).

    Reading takes no lock. The file exists while a writer holds the lock (it is removed on
    release), so a record whose process is gone was left by a writer that was killed."""
    try:
        record = json.loads((Path(root) / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class CacheLock:
    """The writer lock of a local cache: ``flock`` on ``CACHE/writer.lock``, whose text names the
    holder (pid, host, command, start time) for the refusal message.

    Why flock and not "a file with a pid": the kernel drops a flock when its holder dies, however
    it dies (SIGKILL, OOM killer, power loss of a client), so a lock left by a killed run is
    taken over by the next one with no stale-pid guessing (pids are reused; a pid means nothing
    on another NFS client). On a filesystem that cannot flock, writing goes ahead unlocked.

    >>> with CacheLock.acquire(Path("cache/flame"), "facetclip verify --repair"):
    ...     pass  # nobody else writes the cache here
    """

    def __init__(self, path: Path, fd: int | None, taken_over: dict | None = None):
        self.path, self.fd = path, fd
        self.taken_over = taken_over  # the record of a dead holder whose lock file was left

    @classmethod
    def acquire(cls, root: Path, command: str, create: bool = False) -> CacheLock:
        """Take the lock of the cache at ``root`` (creating the folder when ``create``), or
        raise CacheError naming the process that holds it and what to do."""
        root = Path(root)
        if create:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CacheError(
                    f"cannot create the cache folder {root} ({e.strerror or e}); choose another --out"
                ) from None
        path = root / LOCK_FILE
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise CacheError(
                    f"cannot write {path} to lock the cache ({e.strerror or e}); a cache can only "
                    "be written (embed, verify --repair) where you may create files"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_text(_read_fd_record(fd))
                os.close(fd)
                raise CacheError(
                    f"{root} is being written by {holder}; wait for it to finish or stop it, then "
                    f"run this command again (a lock left by a process that died is taken over)"
                ) from None
            except OSError:  # the filesystem cannot flock (some NFS mounts): go ahead unlocked
                os.close(fd)
                return cls(path, None)
            # A holder that released between our open and our flock removed the file we opened:
            # the lock is then on a name nobody else sees; take the new file instead.
            try:
                st, now = os.fstat(fd), os.stat(path)
                if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = _read_fd_record(fd)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "argv": sys.argv,
            "since": time.time(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return cls(path, fd, previous)

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self.fd is None:
            return
        # Unlink first, then unlock: a process waiting on the old file finds it was replaced.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> CacheLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        # At interpreter shutdown this may fail; the kernel drops the flock anyway.
        with contextlib.suppress(Exception):
            self.release()


def _read_fd_record(fd: int) -> dict | None:
    try:
        record = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


# --- other filesystems (pyarrow.fs); paths there are strings joined with "/" -------------------


def cache_location(
    root: str | Path, filesystem: pafs.FileSystem | None = None
) -> tuple[pafs.FileSystem | None, Path | str]:
    """(None, local folder) or (pyarrow filesystem, path in it) for a cache root.

    ``s3://bucket/path``, ``gs://…``, ``hdfs://…`` and any other URI pyarrow knows go through
    ``pyarrow.fs.FileSystem.from_uri``; plain paths and ``file://`` URIs stay local (and keep
    the fsync + rename path). With ``filesystem`` given, ``root`` is a path in it.

    >>> cache_location("s3://bucket/caches/flame")  # doctest: +SKIP
    (<pyarrow._s3fs.S3FileSystem ...>, 'bucket/caches/flame')
    """
    if filesystem is not None:
        if isinstance(filesystem, pafs.LocalFileSystem):
            return None, Path(root)
        return filesystem, str(root).rstrip("/")
    text = str(root)
    if "://" not in text:
        return None, Path(root)
    if text.startswith("file://"):
        return None, Path(text.removeprefix("file://"))
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowException, ValueError, OSError) as e:
        raise CacheError(
            f"cannot open {text} ({e}); give a local folder or a URI pyarrow.fs knows "
            "(s3://bucket/path, gs://bucket/path, hdfs://host/path) with its credentials set"
        ) from None
    if isinstance(fs, pafs.LocalFileSystem):
        return None, Path(path)
    return fs, path.rstrip("/")


def _fs_is_file(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def _fs_read_text(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def _fs_write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    # One object written whole: readers see the old or the new manifest, never a mix (S3 and
    # GCS make an object visible only once its upload completed).
    tmp = f"{path.rpartition('/')[0]}/{_temp_name(path.rpartition('/')[2])}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def _fs_list(fs: pafs.FileSystem, folder: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return [i.path for i in infos if i.type == pafs.FileType.File]


@dataclass
class ShardEntry:
    name: str
    index: int
    rows: int
    bytes: int
    sha256: str
    input_start: int  # input rows [input_start, input_end) went into this shard or skipped/
    input_end: int
    skipped: int = 0


@dataclass
class Manifest:
    layout: dict
    shard_rows: int
    input: dict = field(default_factory=dict)
    shards: list[ShardEntry] = field(default_factory=list)

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("the manifest is not a JSON object")
        d["shards"] = [ShardEntry(**s) for s in d.get("shards", [])]
        return cls(**d)

    def entry(self, index: int) -> ShardEntry | None:
        for s in self.shards:
            if s.index == index:
                return s
        return None


def recipe_diff(
    old: dict, new: dict, labels: tuple[str, str] = ("cache has", "this run has"), prefix: str = ""
) -> list[str]:
    """Human-readable differences between two recipe dicts, one line per differing field:
    ``layer: cache has -1, this run has 2``."""
    lines = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += recipe_diff(a, b, labels, f"{prefix}{k}.")
        elif a != b:
            lines.append(f"{prefix}{k}: {labels[0]} {a!r}, {labels[1]} {b!r}")
    return lines


@dataclass
class StagedShard:
    """A shard written under temporary names, not yet in the manifest (``Cache.commit_shard``).

    Small and picklable: an engine actor stages a shard and hands this to the driver."""

    entry: ShardEntry
    shard_tmp: str
    skipped_tmp: str


class Cache:
    """One cache directory. Create or resume with ``Cache.create``; read with ``Cache.open``.

    ``fs`` is None for a local folder (``root`` a Path); otherwise a ``pyarrow.fs`` filesystem
    and ``root`` a path in it (see ``cache_location``)."""

    def __init__(
        self, root: Path | str, recipe: dict, manifest: Manifest, fs: pafs.FileSystem | None = None
    ):
        self.fs = fs
        self.root = Path(root) if fs is None else str(root)
        self.recipe = recipe
        self.manifest = manifest
        self.lock: CacheLock | None = None  # held by a writer from Cache.create(writer=...)

    def __getstate__(self) -> dict:
        # The writer lock belongs to this process: a copy sent to a Ray actor must not carry
        # (and on garbage collection release) it.
        return {**self.__dict__, "lock": None}

    def path(self, *parts: str) -> Path | str:
        """A file of the cache: a Path when local, else a path in ``self.fs``."""
        return self.root.joinpath(*parts) if self.fs is None else "/".join([self.root, *parts])

    # --- opening ----------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path, filesystem: pafs.FileSystem | None = None) -> Cache:
        fs, root = cache_location(root, filesystem)
        if fs is not None:
            return cls._open_fs(fs, root)
        if not root.is_dir():
            raise CacheError(
                f"{root} is not a directory; expected a cache made by `facetclip embed`"
            )
        mpath, rpath = root / MANIFEST_FILE, root / RECIPE_FILE
        if not mpath.is_file() or not rpath.is_file():
            missing = [p.name for p in (rpath, mpath) if not p.is_file()]
            raise CacheError(f"{root} is not a facetclip cache: missing {', '.join(missing)}")
        try:
            manifest = Manifest.from_json(mpath.read_text())
        except (OSError, ValueError, TypeError) as e:
            raise CacheError(
                f"{mpath} is unreadable ({e}); run `facetclip verify {root}`"
            ) from None
        recipe = read_toml(rpath, "the cache's recipe", CacheError)
        return cls(root, recipe, manifest)

    @classmethod
    def _open_fs(cls, fs: pafs.FileSystem, root: str) -> Cache:
        mpath, rpath = f"{root}/{MANIFEST_FILE}", f"{root}/{RECIPE_FILE}"
        try:
            missing = [p.rpartition("/")[2] for p in (rpath, mpath) if not _fs_is_file(fs, p)]
            if missing:
                raise CacheError(f"{root} is not a facetclip cache: missing {', '.join(missing)}")
            manifest = Manifest.from_json(_fs_read_text(fs, mpath))
            recipe = tomllib.loads(_fs_read_text(fs, rpath))
        except (OSError, ValueError, TypeError, pa.ArrowException) as e:
            raise CacheError(f"cannot read the cache at {root} ({e})") from None
        return cls(root, recipe, manifest, fs)

    @classmethod
    def existing_manifest(
        cls, root: str | Path, filesystem: pafs.FileSystem | None = None
    ) -> Manifest | None:
        """The manifest of the cache at ``root``, or None when there is none yet."""
        fs, root = cache_location(root, filesystem)
        exists = (
            (root / MANIFEST_FILE).is_file()
            if fs is None
            else _fs_is_file(fs, f"{root}/{MANIFEST_FILE}")
        )
        return cls.open(root, fs).manifest if exists else None

    @classmethod
    def create(
        cls,
        root: str | Path,
        recipe: dict,
        layout: dict,
        shard_rows: int,
        input_info: dict,
        filesystem: pafs.FileSystem | None = None,
        writer: str | None = None,
    ) -> Cache:
        """Start a new cache, or reopen an unfinished one made with the same recipe and input.

        ``writer`` (a description such as ``facetclip embed captions.parquet``) first takes the
        cache's writer lock (``CacheLock``; local caches only), held until ``unlock()``: another
        writer is refused before anything is checked or cleaned."""
        fs, root = cache_location(root, filesystem)
        lock = CacheLock.acquire(root, writer, create=True) if writer and fs is None else None
        try:
            cache = cls._create(root, recipe, layout, shard_rows, input_info, fs)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        cache.lock = lock
        return cache

    def unlock(self) -> None:
        """Release the writer lock taken by ``Cache.create(writer=...)`` (if any)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @classmethod
    def _create(
        cls,
        root: Path | str,
        recipe: dict,
        layout: dict,
        shard_rows: int,
        input_info: dict,
        fs: pafs.FileSystem | None,
    ) -> Cache:
        if cls.existing_manifest(root, fs) is not None:
            cache = cls.open(root, fs)
            old = dict(cache.recipe)
            if old.get("model_fingerprint") == recipe.get("model_fingerprint"):
                old["model"] = recipe.get("model")  # the same weights at another path are fine
            diff = recipe_diff(old, recipe)
            if diff:
                raise CacheError(
                    f"{root} was made with another recipe; refusing to mix vectors. Differences:\n"
                    + "\n".join("  " + line for line in diff)
                    + "\nUse another --out, or delete the cache to start over."
                )
            if cache.manifest.layout != layout:
                raise CacheError(
                    f"{root} has layout {cache.manifest.layout}, this run would write {layout}"
                )
            if cache.manifest.shard_rows != shard_rows:
                raise CacheError(
                    f"{root} was written with --shard-rows {cache.manifest.shard_rows}; resume with the same value"
                )
            old_in = {k: cache.manifest.input.get(k) for k in ("path", "format")}
            new_in = {k: input_info.get(k) for k in ("path", "format")}
            if old_in != new_in:
                raise CacheError(
                    f"{root} was made from input {old_in}, not {new_in}; use another --out"
                )
            cache.clean_temporaries()
            return cache
        manifest = Manifest(layout=layout, shard_rows=shard_rows, input=input_info)
        cache = cls(root, recipe, manifest, fs)
        if fs is None:
            if root.exists() and any(p.name != LOCK_FILE for p in root.iterdir()):
                raise CacheError(
                    f"{root} exists, is not empty and is not a facetclip cache; choose another --out"
                )
            (root / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
            (root / SKIPPED_DIR).mkdir(exist_ok=True)
            atomic_write_bytes(root / RECIPE_FILE, dump_toml(recipe).encode())
        else:
            try:
                if fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
                    raise CacheError(
                        f"{root} exists, is not empty and is not a facetclip cache; choose another --out"
                    )
                for d in (SHARDS_DIR, SKIPPED_DIR):
                    fs.create_dir(f"{root}/{d}", recursive=True)
                _fs_write_bytes(fs, f"{root}/{RECIPE_FILE}", dump_toml(recipe).encode())
            except (OSError, pa.ArrowException) as e:
                raise CacheError(f"cannot write the cache at {root} ({e})") from None
        cache._save_manifest()
        return cache

    # --- writing ----------------------------------------------------------------------
    def clean_temporaries(self) -> None:
        """Remove leftovers of a killed run: temp files, and shards missing from the manifest."""
        known = {s.name for s in self.manifest.shards}
        if self.fs is not None:
            for d in (SHARDS_DIR, SKIPPED_DIR):
                for p in _fs_list(self.fs, f"{self.root}/{d}"):
                    name = p.rpartition("/")[2]
                    if (name.startswith(".") and ".tmp-" in name) or (
                        name.startswith("part-") and name not in known
                    ):
                        self.fs.delete_file(p)
            return
        for d in (self.root / SHARDS_DIR, self.root / SKIPPED_DIR):
            for p in d.glob(".*.tmp-*"):
                p.unlink(missing_ok=True)
            for p in d.glob("part-*.parquet"):
                if p.name not in known:
                    p.unlink()

    def _save_manifest(self) -> None:
        data = self.manifest.to_json().encode()
        if self.fs is None:
            atomic_write_bytes(self.root / MANIFEST_FILE, data)
        else:
            _fs_write_bytes(self.fs, f"{self.root}/{MANIFEST_FILE}", data)

    def _write_temp(self, table: pa.Table, folder: str, name: str) -> tuple[str, int, str]:
        """Write ``folder/name`` under a temporary name: (temp path, bytes, sha256)."""
        if self.fs is None:
            tmp = _write_parquet_temp(table, self.root / folder / name)
            return str(tmp), tmp.stat().st_size, sha256_file(tmp)
        # Serialised in memory first (the table is in memory anyway): the checksum then costs
        # no second read from the object store.
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, **_parquet_options(table))
        data = buf.getvalue()
        tmp = f"{self.root}/{folder}/{_temp_name(name)}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        return tmp, data.size, hashlib.sha256(data).hexdigest()

    def stage_shard(
        self, index: int, table: pa.Table, skipped: pa.Table, input_start: int, input_end: int
    ) -> StagedShard:
        """Write shard ``index`` (and its skipped rows) under temporary names; not yet visible."""
        name = shard_name(index)
        metadata = {
            META_RECIPE: dump_toml(self.recipe).encode(),
            META_LAYOUT: json.dumps(self.manifest.layout).encode(),
        }
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
        shard_tmp, size, sha = self._write_temp(table, SHARDS_DIR, name)
        skipped_tmp, _, _ = self._write_temp(skipped.cast(SKIPPED_SCHEMA), SKIPPED_DIR, name)
        entry = ShardEntry(
            name=name,
            index=index,
            rows=table.num_rows,
            bytes=size,
            sha256=sha,
            input_start=input_start,
            input_end=input_end,
            skipped=skipped.num_rows,
        )
        return StagedShard(entry, shard_tmp, skipped_tmp)

    def commit_shard(self, staged: StagedShard) -> ShardEntry:
        """Move a staged shard into place and record it in the manifest (the commit point);
        replaces an older entry of that index."""
        entry = staged.entry
        moves = [(staged.shard_tmp, SHARDS_DIR), (staged.skipped_tmp, SKIPPED_DIR)]
        for tmp, folder in moves:
            if self.fs is None:
                _replace(Path(tmp), self.root / folder / entry.name)
            else:
                self.fs.move(tmp, f"{self.root}/{folder}/{entry.name}")
        self.manifest.shards = sorted(
            [s for s in self.manifest.shards if s.index != entry.index] + [entry],
            key=lambda s: s.index,
        )
        self._save_manifest()
        return entry

    def discard(self, staged: StagedShard) -> None:
        """Delete a staged shard's temporary files (a shard another actor already committed)."""
        for tmp in (staged.shard_tmp, staged.skipped_tmp):
            if self.fs is None:
                Path(tmp).unlink(missing_ok=True)
            elif _fs_is_file(self.fs, tmp):
                self.fs.delete_file(tmp)

    def write_shard(
        self, index: int, table: pa.Table, skipped: pa.Table, input_start: int, input_end: int
    ) -> ShardEntry:
        """Write shard ``index`` atomically and record it; replaces an older entry of that index."""
        return self.commit_shard(self.stage_shard(index, table, skipped, input_start, input_end))

    # --- reading ----------------------------------------------------------------------
    @property
    def shard_paths(self) -> list[Path | str]:
        """The finished shards' files (paths in ``self.fs`` when it is not None)."""
        return [self.path(SHARDS_DIR, s.name) for s in self.manifest.shards]

    @property
    def skipped_paths(self) -> list[Path | str]:
        return [self.path(SKIPPED_DIR, s.name) for s in self.manifest.shards]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.manifest.shards)
