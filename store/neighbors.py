"""Nearest captions of one caption, by cosine on one facet, over a whole cache.

Streams the cache shard by shard (``store.reader``), keeping a running top-k, so memory is one
shard's vectors plus k candidates whatever the cache's size. Texts are read at the end, for
the k winners only.

>>> for n in find_neighbors("cache", "000000042", facet="main_object", k=5):
...     print(n.rank, f"{n.score:.3f}", n.key, n.text)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from store.cache import Cache
from store.errors import CacheError
from store.reader import read_shard


@dataclass(frozen=True)
class Neighbor:
    """One result: ``rank`` 0 is the query caption itself (score 1), then 1..k by cosine."""

    rank: int
    key: str
    score: float
    text: str | None  # the caption text feeding the facet; None when the cache stores no text


def facet_text_column(cache: Cache, facet: str) -> str | None:
    """The caption column whose prompt group produced ``facet`` (the first stored text column
    when the recipe does not say), or None when the cache stores no caption text."""
    texts = list(cache.manifest.layout.get("text_columns", []))
    pooling = cache.recipe.get("pooling", "last")
    for g in cache.recipe.get("groups", []):
        names = [g.get("mean_name", "mean")] if pooling == "mean" else list(g.get("facets", {}))
        if facet in names and g.get("column") in texts:
            return g["column"]
    return texts[0] if texts else None


def _find_key(cache: Cache, key: str) -> tuple[Path, int]:
    """The shard holding ``key`` and the row within it (reads only the key column)."""
    for path in cache.shard_paths:
        keys = pq.read_table(path, columns=["key"]).column("key")
        hits = pc.index(keys, key).as_py()
        if hits >= 0:
            return path, hits
    raise CacheError(
        f"no caption with key {key!r} in {cache.root}; list some keys with "
        f'`facetclip sql {cache.root} "SELECT key FROM embeddings LIMIT 5"`'
    )


def _unit(v: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero, so their cosine is 0)."""
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norm > 0, norm, 1.0)


def find_neighbors(
    cache_path: str | Path, key: str, facet: str | None = None, k: int = 10
) -> list[Neighbor]:
    """The caption ``key`` (rank 0, score 1.0) followed by its ``k`` nearest captions by cosine
    similarity on ``facet`` (default: the cache's first vector name), most similar first."""
    cache = Cache.open(cache_path)
    facets = list(cache.manifest.layout["vector_names"])
    facet = facets[0] if facet is None else facet
    if facet not in facets:
        raise CacheError(f"no facet {facet!r} in {cache.root}; its facets are {', '.join(facets)}")
    if k < 0:
        raise CacheError(f"k must be >= 0, got {k}")
    qpath, qrow = _find_key(cache, key)
    _, qvecs = read_shard(qpath, [facet])
    query = _unit(qvecs[facet][qrow])

    # Running top-k over all shards: (scores, keys, shard path, row in shard) of the best so far.
    best_scores = np.empty(0, np.float32)
    best: list[tuple[str, Path, int]] = []
    for path in cache.shard_paths:
        keys, vecs = read_shard(path, [facet])
        scores = _unit(vecs[facet]) @ query
        if path == qpath:
            scores[qrow] = -np.inf  # the query itself is rank 0, not a neighbour
        top = np.argpartition(-scores, k)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.isfinite(scores[top])]
        best_scores = np.concatenate([best_scores, scores[top]])
        best += [(keys[i], path, int(i)) for i in top]
        # Keep the k best; a stable sort breaks ties by shard order, then row.
        order = np.argsort(-best_scores, kind="stable")[:k]
        best_scores, best = best_scores[order], [best[i] for i in order]

    column = facet_text_column(cache, facet)
    texts = _texts(column, [(qpath, qrow)] + [(p, r) for _, p, r in best])
    result = [Neighbor(0, key, 1.0, texts[0])]
    result += [
        Neighbor(i + 1, k_, float(s), t)
        for i, ((k_, _, _), s, t) in enumerate(zip(best, best_scores, texts[1:], strict=True))
    ]
    return result


def _texts(column: str | None, rows: list[tuple[Path, int]]) -> list[str | None]:
    """Caption texts of (shard, row) pairs: one read of the text column per shard involved,
    keeping only the rows asked for."""
    if column is None:
        return [None] * len(rows)
    wanted: dict[Path, list[int]] = {}
    for path, row in rows:
        wanted.setdefault(path, []).append(row)
    found: dict[tuple[Path, int], str | None] = {}
    for path, idx in wanted.items():
        values = pq.read_table(path, columns=[column]).column(column).take(idx).to_pylist()
        found.update(zip(((path, r) for r in idx), values, strict=True))
    return [found[r] for r in rows]


def render_neighbors(found: list[Neighbor], key: str, facet: str | None):
    """What `facetclip neighbors` prints: rank, key, cosine and text of each neighbour."""
    from rich.table import Table

    t = Table(title=f"neighbours of {key}" + (f" on {facet}" if facet else ""))
    for col in ("rank", "key", "cosine", "text"):
        t.add_column(col, overflow="fold" if col == "text" else "ellipsis")
    for nb in found:
        t.add_row(str(nb.rank), nb.key, f"{nb.score:.4f}", (nb.text or "")[:200])
    return t
