"""`facetclip verify` on a big cache: its time against the two reads any verifier must do, the
sha256 of every shard (what the manifest's checksums cost alone) and a plain pyarrow read of
every column, side by side in one run, for float16 and int8 caches.

The cache is written through the same writer `embed` uses, with the flame-long recipe's
layout (7 facets, token counts, truncated flag) and unit vectors, so every row check runs
(norms, zero rows, int8 scales and grid, tokens, keys). Files are in the page cache after
the first pass: this measures verify's own work, not the disk.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from store.cache import SKIPPED_SCHEMA, Cache, sha256_file
from store.format import TOKENS_PREFIX, encode_vectors, layout_metadata, shard_schema
from store.verify import verify_cache
from tests.bench import Report, Target

FULL = {"rows": 50_000, "dim": 1024, "shard_rows": 5_000, "repeats": 3}
QUICK = {"rows": 10_000, "dim": 256, "shard_rows": 2_500, "repeats": 2}


def write_cache(root: Path, rows: int, dim: int, dtype: str, shard_rows: int) -> Cache:
    """A flame-long cache of ``rows`` random unit vectors per facet (no caption texts)."""
    from embed.prompts import BUILTIN_RECIPES

    recipe = replace(BUILTIN_RECIPES["flame-long"], dtype=dtype)
    names, columns = recipe.vector_names, recipe.columns
    layout = layout_metadata(names, dim, dtype, [])
    cache = Cache.create(root, recipe.to_dict(), layout, shard_rows, {"path": "bench"})
    schema = shard_schema(names, dim, dtype, [], columns)
    rng = np.random.default_rng(0)
    for i, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        arrays = {"key": pa.array([f"{start + j:09d}" for j in range(n)])}
        for name in names:
            v = rng.standard_normal((n, dim), dtype=np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            for suffix, arr in encode_vectors(v, dtype).items():
                arrays[name + suffix] = arr
        tokens = rng.integers(20, 300, n).astype(np.int32)
        for c in columns:
            arrays[TOKENS_PREFIX + c] = pa.array(tokens)
        arrays["truncated"] = pa.array(tokens > recipe.max_caption_tokens)
        table = pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)
        cache.write_shard(i, table, SKIPPED_SCHEMA.empty_table(), start, start + n)
    return cache


def _sha256(cache: Cache) -> None:
    for p in cache.shard_paths:
        sha256_file(p)


def _read(cache: Cache) -> None:
    for p in cache.shard_paths:
        pq.read_table(p)


def _verify(cache: Cache) -> None:
    report = verify_cache(cache.root)
    assert report.ok, [p.message for p in report.problems]


def measure(p: dict, dtype: str, tmp: Path) -> tuple[list[str], float]:
    cache = write_cache(tmp / dtype, p["rows"], p["dim"], dtype, p["shard_rows"])
    mb = sum(path.stat().st_size for path in cache.shard_paths) / 1e6
    steps = {"verify": _verify, "sha256": _sha256, "read": _read}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():  # warm-up: page cache, imports
        fn(cache)
    for r in range(p["repeats"]):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        for name in order:
            t0 = time.perf_counter()
            steps[name](cache)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["verify"] / (med["sha256"] + med["read"])
    row = [dtype, f"{mb:,.0f}", f"{med['verify']:.2f}", f"{p['rows'] / med['verify']:,.0f}",
           f"{med['sha256']:.2f}", f"{med['read']:.2f}", f"{ratio:.2f}"]  # fmt: skip
    return row, ratio


def run(quick: bool = False) -> Report:
    p = QUICK if quick else FULL
    table = [["dtype", "MB", "verify s", "rows/s", "sha256 s", "read s", "verify/(sha+read)"]]
    targets = []
    with tempfile.TemporaryDirectory() as d:
        for dtype in ("float16", "int8"):
            row, ratio = measure(p, dtype, Path(d))
            table.append(row)
            targets.append(
                Target(f"{dtype}: verify time / (sha256 + read) time", ratio, 1.5, False, 2)
            )
    notes = [f"{p['rows']:,} rows x 7 facets x {p['dim']} dims, shards of {p['shard_rows']:,}; "
             f"medians of {p['repeats']} (order alternated)"]  # fmt: skip
    return Report("verify on a big cache vs the reads it needs", table, targets, notes)
