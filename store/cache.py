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
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from store.errors import CacheError
from store.format import META_LAYOUT, META_RECIPE, dump_toml

RECIPE_FILE = "recipe.toml"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
SKIPPED_DIR = "skipped"
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


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write Parquet to a temp name, fsync, rename into place, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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
    pq.write_table(
        table,
        tmp,
        compression={name: ("none" if name in vectors else "zstd") for name in table.column_names},
        use_dictionary=others + [f"{name}.list.element" for name in sorted(int8)],  # leaf paths
        write_statistics=others,
        row_group_size=int(min(65536, max(1, (64 << 20) // row_bytes))),
    )
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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


class Cache:
    """One cache directory. Create or resume with ``Cache.create``; read with ``Cache.open``."""

    def __init__(self, root: Path, recipe: dict, manifest: Manifest):
        self.root = root
        self.recipe = recipe
        self.manifest = manifest

    # --- opening ----------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path) -> Cache:
        root = Path(root)
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
        try:
            recipe = tomllib.loads(rpath.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise CacheError(f"{rpath} is unreadable ({e})") from None
        return cls(root, recipe, manifest)

    @classmethod
    def create(
        cls, root: str | Path, recipe: dict, layout: dict, shard_rows: int, input_info: dict
    ) -> Cache:
        """Start a new cache, or reopen an unfinished one made with the same recipe and input."""
        root = Path(root)
        if (root / MANIFEST_FILE).exists():
            cache = cls.open(root)
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
        if root.exists() and any(root.iterdir()):
            raise CacheError(
                f"{root} exists, is not empty and is not a facetclip cache; choose another --out"
            )
        (root / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        (root / SKIPPED_DIR).mkdir(exist_ok=True)
        atomic_write_bytes(root / RECIPE_FILE, dump_toml(recipe).encode())
        manifest = Manifest(layout=layout, shard_rows=shard_rows, input=input_info)
        cache = cls(root, recipe, manifest)
        cache._save_manifest()
        return cache

    # --- writing ----------------------------------------------------------------------
    def clean_temporaries(self) -> None:
        """Remove leftovers of a killed run: temp files, and shards missing from the manifest."""
        known = {s.name for s in self.manifest.shards}
        for d in (self.root / SHARDS_DIR, self.root / SKIPPED_DIR):
            for p in d.glob(".*.tmp-*"):
                p.unlink(missing_ok=True)
            for p in d.glob("part-*.parquet"):
                if p.name not in known:
                    p.unlink()

    def _save_manifest(self) -> None:
        atomic_write_bytes(self.root / MANIFEST_FILE, self.manifest.to_json().encode())

    def write_shard(
        self, index: int, table: pa.Table, skipped: pa.Table, input_start: int, input_end: int
    ) -> ShardEntry:
        """Write shard ``index`` atomically and record it; replaces an older entry of that index."""
        name = shard_name(index)
        metadata = {
            META_RECIPE: dump_toml(self.recipe).encode(),
            META_LAYOUT: json.dumps(self.manifest.layout).encode(),
        }
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
        path = self.root / SHARDS_DIR / name
        write_parquet_atomic(table, path)
        write_parquet_atomic(skipped.cast(SKIPPED_SCHEMA), self.root / SKIPPED_DIR / name)
        entry = ShardEntry(
            name=name,
            index=index,
            rows=table.num_rows,
            bytes=path.stat().st_size,
            sha256=sha256_file(path),
            input_start=input_start,
            input_end=input_end,
            skipped=skipped.num_rows,
        )
        self.manifest.shards = sorted(
            [s for s in self.manifest.shards if s.index != index] + [entry], key=lambda s: s.index
        )
        self._save_manifest()
        return entry

    # --- reading ----------------------------------------------------------------------
    @property
    def shard_paths(self) -> list[Path]:
        return [self.root / SHARDS_DIR / s.name for s in self.manifest.shards]

    @property
    def skipped_paths(self) -> list[Path]:
        return [self.root / SKIPPED_DIR / s.name for s in self.manifest.shards]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.manifest.shards)
