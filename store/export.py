"""`facetclip export CACHE --format npy OUT`: the clip-retrieval / embedding-reader layout.

```
OUT/
  <vector name>/emb_00000.npy     [rows, D] float16 (float32 for float32 or int8 caches)
  metadata/metadata_00000.parquet key + caption texts, row i <-> row i of every emb_00000.npy
```
One file pair per cache shard; zero-padded numbers keep name order equal to shard order,
which is how embedding-reader pairs embeddings with metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from store.cache import Cache
from store.errors import CacheError
from store.reader import read_shard

EXPORT_FORMATS = ("npy",)


@dataclass
class ExportSummary:
    out: Path
    files: int
    rows: int
    bytes: int


def export_npy(
    cache: str | Path, out: str | Path, facets: Sequence[str] | None = None, overwrite: bool = False
) -> ExportSummary:
    c = Cache.open(cache)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CacheError(f"{out} exists and is not empty; choose another OUT or pass --overwrite")
    layout = c.manifest.layout
    names = list(facets) if facets else layout["vector_names"]
    # float16 stays float16 (what clip-retrieval writes); int8 is dequantised to float32.
    dtype = np.float16 if layout["dtype"] == "float16" else np.float32
    for n in names:
        (out / n).mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    files = rows = size = 0
    for i, path in enumerate(c.shard_paths):
        keys, vecs = read_shard(path, names)
        for n in names:
            f = out / n / f"emb_{i:05d}.npy"
            np.save(f, vecs[n].astype(dtype))
            size += f.stat().st_size
            files += 1
        meta = pq.read_table(path, columns=["key", *layout["text_columns"]])
        m = out / "metadata" / f"metadata_{i:05d}.parquet"
        pq.write_table(meta, m)
        size += m.stat().st_size
        rows += len(keys)
    return ExportSummary(out, files, rows, size)


def render_export(s: ExportSummary) -> str:
    """What `facetclip export` prints."""
    return (
        f"exported {s.rows:,} rows into {s.files} .npy files ({s.bytes / 1e6:.1f} MB) "
        f"under [bold]{s.out}[/]"
    )
