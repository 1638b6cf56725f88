"""The cache as training reads it: ``store.reader.iter_batches`` (Parquet shards, float16
fixed-size lists -> float32 numpy batches) against clip-retrieval-style ``.npy`` files read
with ``np.load`` (+ the same float32 conversion), side by side in one run; and the storage
table: bytes per row and the cosine error of float16 and int8 against float32 on vectors of a
real embed run.

Both readers see files already in the page cache after the warm-up (dropping it needs root),
so this measures decoding, not the disk: the part the cache format decides.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from store.cache import Cache
from store.export import export_npy
from store.format import encode_vectors, layout_metadata, shard_schema
from store.reader import iter_batches
from tests.bench import Report, Target

FULL = {
    "rows": 20_000,
    "dim": 1024,
    "facets": 11,
    "shard_rows": 5_000,
    "repeats": 3,
    "captions": 256,
}
QUICK = {"rows": 8_000, "dim": 512, "facets": 11, "shard_rows": 4_000, "repeats": 2, "captions": 64}


def _write_cache(
    root: Path, vectors: np.ndarray, names: list[str], dtype: str, shard_rows: int
) -> Cache:
    """A cache holding ``vectors`` [N, K, D] through the same writer ``embed`` uses."""
    n, _, dim = vectors.shape
    layout = layout_metadata(names, dim, dtype, [])
    cache = Cache.create(
        root,
        {"name": "bench", "dtype": dtype},
        layout,
        shard_rows,
        {"path": "bench", "format": "none"},
    )
    schema = shard_schema(names, dim, dtype, [], [])
    skipped = pa.table(
        {
            "key": pa.array([], pa.string()),
            "input_row": pa.array([], pa.int64()),
            "reason": pa.array([], pa.string()),
        }
    )
    for i, start in enumerate(range(0, n, shard_rows)):
        v = vectors[start : start + shard_rows]
        arrays = {"key": pa.array([f"{start + j:09d}" for j in range(len(v))])}
        for k, name in enumerate(names):
            for suffix, arr in encode_vectors(v[:, k], dtype).items():
                arrays[name + suffix] = arr
        arrays["truncated"] = pa.array(np.zeros(len(v), bool))
        table = pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)
        cache.write_shard(i, table, skipped, start, start + len(v))
    return cache


def _synthetic_vectors(rows: int, facets: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors in a narrow cone, like LLM hidden states (a shared component + noise)."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(dim).astype(np.float32)
    v = common + 0.5 * rng.standard_normal((rows, facets, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=2, keepdims=True)


def _read_cache(cache: Path, batch_rows: int) -> int:
    rows = 0
    for keys, _vecs in iter_batches(cache, batch_rows=batch_rows):
        rows += len(keys)
    return rows


def _read_npy(folder: Path, names: list[str]) -> int:
    rows = 0
    files = sorted((folder / names[0]).glob("emb_*.npy"))
    for f in files:
        batch = {n: np.load(folder / n / f.name).astype(np.float32) for n in names}
        rows += len(batch[names[0]])
    return rows


def throughput(p: dict, tmp: Path) -> tuple[list[list[str]], Target, list[str]]:
    names = [f"facet_{k}" for k in range(p["facets"])]
    vectors = _synthetic_vectors(p["rows"], p["facets"], p["dim"])
    cache = _write_cache(tmp / "cache", vectors, names, "float16", p["shard_rows"])
    export_npy(cache.root, tmp / "npy")
    out_mb = p["rows"] * p["facets"] * p["dim"] * 4 / 1e6  # float32 delivered to the caller
    times: dict[str, list[float]] = {"cache": [], "npy": []}
    _read_cache(cache.root, 16384), _read_npy(tmp / "npy", names)  # warm-up: page cache, imports
    for r in range(p["repeats"]):
        order = ("cache", "npy") if r % 2 == 0 else ("npy", "cache")
        for which in order:
            t0 = time.perf_counter()
            n = (
                _read_cache(cache.root, 16384)
                if which == "cache"
                else _read_npy(tmp / "npy", names)
            )
            times[which].append(time.perf_counter() - t0)
            assert n == p["rows"]
    med = {k: statistics.median(v) for k, v in times.items()}
    table = [
        ["", "cache (Parquet)", ".npy (np.load)"],
        ["rows/s", f"{p['rows'] / med['cache']:,.0f}", f"{p['rows'] / med['npy']:,.0f}"],
        ["MB/s (float32 out)", f"{out_mb / med['cache']:,.0f}", f"{out_mb / med['npy']:,.0f}"],
        ["median seconds", f"{med['cache']:.3f}", f"{med['npy']:.3f}"],
        [
            "all seconds",
            " ".join(f"{t:.3f}" for t in times["cache"]),
            " ".join(f"{t:.3f}" for t in times["npy"]),
        ],
    ]
    ratio = med["npy"] / med["cache"]
    notes = [f"{p['rows']:,} rows x {p['facets']} facets x {p['dim']} dims, float16 on disk, float32 batches out; "
             f"cache/npy throughput ratio {ratio:.2f}"]  # fmt: skip
    return table, Target("cache reader throughput / .npy throughput", ratio, 0.5), notes


def storage(p: dict, tmp: Path) -> tuple[list[list[str]], list[str]]:
    """Bytes per row and the error of each storage dtype, on vectors of a real embed run."""
    from embed.pipeline import EmbedConfig, run_embed
    from eval.synth import iter_samples
    from eval.tiny_llm import TinyLLMConfig, build_tiny_llm
    from store.reader import read_shard

    model = tmp / "llm"
    build_tiny_llm(
        model,
        TinyLLMConfig(
            steps=0,
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            intermediate_size=768,
            n_captions=300,
        ),
        progress=False,
    )
    samples = list(iter_samples(p["captions"], seed=3))
    captions = tmp / "captions.parquet"
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table(
            {"key": [s.key for s in samples], "long_caption": [s.long_caption for s in samples]}
        ),
        captions,
    )
    ref_cache = tmp / "f32"
    run_embed(
        EmbedConfig(
            captions, str(model), ref_cache, recipe="flame-long", dtype="float32", store_text=False
        ),
        progress=False,
    )
    names = Cache.open(ref_cache).manifest.layout["vector_names"]
    _, ref = read_shard(Cache.open(ref_cache).shard_paths[0])
    ref_v = np.stack([ref[n] for n in names], axis=1)
    rows = [["dtype", "bytes/row", "vs float32", "mean 1-cos", "max 1-cos", "max |err|"]]
    base = None
    for dtype in ("float32", "float16", "int8"):
        c = _write_cache(tmp / f"c_{dtype}", ref_v, names, dtype, len(ref_v))
        size = sum(path.stat().st_size for path in c.shard_paths)
        per_row = size / len(ref_v)
        base = base or per_row
        _, got = read_shard(c.shard_paths[0])
        v = np.stack([got[n] for n in names], axis=1)
        cos = (v * ref_v).sum(-1) / np.linalg.norm(v, axis=-1) / np.linalg.norm(ref_v, axis=-1)
        rows.append([dtype, f"{per_row:,.0f}", f"{per_row / base:.2f}", f"{np.mean(1 - cos):.2e}",
                     f"{np.max(1 - cos):.2e}", f"{np.abs(v - ref_v).max():.2e}"])  # fmt: skip
    notes = [f"{len(ref_v)} captions x {len(names)} facets x 256 dims (flame-long, untrained 4-layer LM), "
             "unit vectors; bytes/row = shard bytes on disk / rows (vectors only; int8 adds a float32 scale per vector)"]  # fmt: skip
    return rows, notes


def run(quick: bool = False) -> Report:
    p = QUICK if quick else FULL
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        table, target, notes = throughput(p, tmp)
        s_rows, s_notes = storage(p, tmp)
    notes += (
        ["storage per dtype:"]
        + ["  " + "  ".join(c.rjust(12) for c in row) for row in s_rows]
        + s_notes
    )
    return Report("cache reader vs .npy, and storage per dtype", table, [target], notes)
