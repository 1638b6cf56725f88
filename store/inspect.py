"""`facetclip inspect`: what a cache holds, in one screen (or one JSON object).

Everything is read shard by shard and row group by row group, one column at a time, so
memory stays bounded whatever the cache's size. The statistics are cheap (one pass, O(dim)
state per facet), so they cover every row unless ``norm_sample_rows`` caps the vector
statistics.

Vector statistics per facet, on the stored (decoded) vectors:

- ``norm_min / norm_mean / norm_max``: L2 norms (1 for a recipe with ``normalize = true``,
  up to storage rounding);
- ``mean_vector_norm``: ‖mean of the unit-normalised vectors‖, from 0 (directions spread
  evenly) to 1 (all the same direction). LLM hidden states sit in a narrow cone, so expect it
  well above 0; centring on the facet mean before contrastive training removes that offset;
- ``mean_pairwise_cosine``: the mean cosine over all pairs of distinct rows. It follows
  exactly from the same sum, with no pair sampling: with unit vectors u_i and s = Σ u_i,
  Σ_{i≠j} u_i·u_j = ‖s‖² − n, so the mean is (‖s‖² − n) / (n (n − 1)).

>>> summary = inspect_cache("cache/")
>>> summary.rows, [f.name for f in summary.facets]
(60, ['description', 'main_object', ...])
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from store.cache import MANIFEST_FILE, RECIPE_FILE, SHARDS_DIR, SKIPPED_DIR, Cache
from store.errors import CacheError, InputError
from store.format import SCALE_SUFFIX, TOKENS_PREFIX, decode_vectors


@dataclass
class FacetStats:
    name: str
    column: str | None  # the caption column the facet's prompt reads
    dim: int
    dtype: str
    rows: int = 0  # rows the norm statistics cover
    nonfinite_rows: int = 0  # rows left out of them for NaN/Inf (`facetclip verify` names them)
    norm_min: float | None = None
    norm_mean: float | None = None
    norm_max: float | None = None
    mean_vector_norm: float | None = None
    mean_pairwise_cosine: float | None = None


@dataclass
class TokenStats:
    mean: float | None
    max: int | None


@dataclass
class CacheSummary:
    path: str
    rows: int
    shards: int
    bytes: int  # on disk: shards + skipped files + manifest + recipe
    bytes_per_row: float | None
    recipe: str
    model: str
    model_fingerprint: str
    pooling: str
    layer: int
    dtype: str  # storage dtype of the vectors
    facets: list[FacetStats]
    truncated: int
    truncated_share: float | None
    tokens: dict[str, TokenStats]  # caption column -> token counts (before truncation)
    skipped: dict[str, int]  # reason -> rows not embedded
    norm_rows: int  # rows the vector statistics cover (all, unless capped)
    norm_sampled: bool = False
    text_columns: list[str] = field(default_factory=list)
    # an image cache (`facetclip embed-images`): its transform and token grid; None otherwise
    image: dict | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready data (for `facetclip inspect --json`)."""
        return asdict(self)


class _FacetAccumulator:
    """Running norm statistics of one facet: O(dim) state, float64 sums."""

    def __init__(self, stats: FacetStats):
        self.stats = stats
        self.norm_sum = 0.0
        self.unit_sum = np.zeros(stats.dim, np.float64)
        self.n_unit = 0  # rows with a non-zero norm (they have a direction)
        self.lo, self.hi = np.inf, -np.inf

    def add(self, v: np.ndarray) -> None:
        finite = np.isfinite(v).all(axis=1)
        self.stats.nonfinite_rows += int((~finite).sum())
        v = v[finite]
        norms = np.linalg.norm(v.astype(np.float64), axis=1)
        self.stats.rows += len(v)
        if not len(v):
            return
        self.norm_sum += float(norms.sum())
        self.lo, self.hi = min(self.lo, float(norms.min())), max(self.hi, float(norms.max()))
        nz = norms > 0
        self.unit_sum += (v[nz] / norms[nz, None]).sum(axis=0)
        self.n_unit += int(nz.sum())

    def finish(self) -> FacetStats:
        s, n = self.stats, self.n_unit
        if s.rows:
            s.norm_min, s.norm_mean, s.norm_max = self.lo, self.norm_sum / s.rows, self.hi
        if n:
            sq = float(self.unit_sum @ self.unit_sum)
            s.mean_vector_norm = sq**0.5 / n
            if n > 1:
                s.mean_pairwise_cosine = (sq - n) / (n * (n - 1))
        return s


def _facet_columns(recipe: dict) -> dict[str, str]:
    """Vector name -> the caption column its prompt group reads."""
    pooling = recipe.get("pooling", "last")
    out = {}
    for g in recipe.get("groups", []):
        names = [g.get("mean_name", "mean")] if pooling == "mean" else list(g.get("facets", {}))
        out.update(dict.fromkeys(names, g.get("column")))
    return out


def _norm_shards(cache: Cache, cap: int | None) -> tuple[set[str], bool]:
    """Shards whose vectors feed the norm statistics: all, or under a row cap, shards spread
    evenly over the cache (input order often correlates with content) until the cap is met."""
    shards = [s for s in cache.manifest.shards if s.rows]
    total = sum(s.rows for s in shards)
    if cap is None or cap >= total:
        return {s.name for s in shards}, False
    per_shard = total / len(shards)
    k = min(len(shards), max(1, int(np.ceil(cap / per_shard))))
    picks = np.unique(np.linspace(0, len(shards) - 1, k).round().astype(int))
    chosen = [shards[i] for i in picks]
    # Rounding can leave the picks short of the cap; add shards in order until it is met.
    for s in shards:
        if sum(c.rows for c in chosen) >= cap:
            break
        if s not in chosen:
            chosen.append(s)
    return {s.name for s in chosen}, True


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def inspect_cache(path: str | Path, norm_sample_rows: int | None = None) -> CacheSummary:
    """Summarise the cache at ``path``: size, recipe, facets and their norm statistics,
    truncation, token counts and skipped rows.

    ``norm_sample_rows`` caps the rows the vector statistics read (whole shards spread over
    the cache, cut at the cap); everything else always covers every row. Raises CacheError
    if ``path`` is not a cache or a listed file cannot be read.
    """
    if norm_sample_rows is not None and norm_sample_rows < 1:
        raise InputError("--norm-sample-rows must be >= 1")
    cache = Cache.open(path)
    root, recipe, layout = cache.root, cache.recipe, cache.manifest.layout
    names, dtype = list(layout["vector_names"]), layout["dtype"]
    columns = _facet_columns(recipe)
    accs = [_FacetAccumulator(FacetStats(n, columns.get(n), layout["dim"], dtype)) for n in names]
    norm_shards, sampled = _norm_shards(cache, norm_sample_rows)
    norm_budget = norm_sample_rows if sampled else None

    truncated = 0
    tok_sum: Counter = Counter()
    tok_max: dict[str, int] = {}
    for entry in cache.manifest.shards:
        shard = root / SHARDS_DIR / entry.name
        try:
            pf = pq.ParquetFile(shard)
            token_cols = [c for c in pf.schema_arrow.names if c.startswith(TOKENS_PREFIX)]
            for rg in range(pf.metadata.num_row_groups):
                t = pf.read_row_group(rg, columns=["truncated", *token_cols])
                truncated += int(np.count_nonzero(t.column("truncated").to_numpy()))
                for c in token_cols:
                    counts = t.column(c).to_numpy()
                    col = c.removeprefix(TOKENS_PREFIX)
                    tok_sum[col] += int(counts.sum(dtype=np.int64))
                    if len(counts):
                        tok_max[col] = max(tok_max.get(col, 0), int(counts.max()))
                    else:
                        tok_max.setdefault(col, 0)
                if entry.name not in norm_shards or norm_budget == 0:
                    continue
                take = t.num_rows if norm_budget is None else min(t.num_rows, norm_budget)
                for acc in accs:
                    cols = [acc.stats.name] + (
                        [acc.stats.name + SCALE_SUFFIX] if dtype == "int8" else []
                    )
                    vt = pf.read_row_group(rg, columns=cols).slice(0, take)
                    acc.add(decode_vectors(vt, acc.stats.name, dtype))
                if norm_budget is not None:
                    norm_budget -= take
        except (OSError, pa.ArrowException, KeyError, ValueError) as e:
            raise CacheError(f"cannot read {shard} ({e}); run `facetclip verify {root}`") from None

    skipped: Counter = Counter()
    for entry in cache.manifest.shards:
        if not entry.skipped:
            continue
        path_s = root / SKIPPED_DIR / entry.name
        try:
            reasons = pq.read_table(path_s, columns=["reason"]).column(0).to_pylist()
        except (OSError, pa.ArrowException, KeyError) as e:
            raise CacheError(f"cannot read {path_s} ({e}); run `facetclip verify {root}`") from None
        skipped.update(reasons)

    rows = cache.rows
    size = sum(
        _size(root / SHARDS_DIR / s.name) + _size(root / SKIPPED_DIR / s.name)
        for s in cache.manifest.shards
    )
    size += _size(root / MANIFEST_FILE) + _size(root / RECIPE_FILE)
    facets = [a.finish() for a in accs]
    return CacheSummary(
        path=str(root),
        rows=rows,
        shards=len(cache.manifest.shards),
        bytes=size,
        bytes_per_row=size / rows if rows else None,
        recipe=recipe.get("name", ""),
        model=recipe.get("model", ""),
        model_fingerprint=recipe.get("model_fingerprint", ""),
        pooling=recipe.get("pooling", ""),
        layer=recipe.get("layer", -1),
        dtype=dtype,
        facets=facets,
        truncated=truncated,
        truncated_share=truncated / rows if rows else None,
        tokens={
            c: TokenStats(tok_sum[c] / rows if rows else None, tok_max.get(c)) for c in tok_max
        },
        skipped=dict(skipped.most_common()),
        norm_rows=facets[0].rows + facets[0].nonfinite_rows if facets else 0,
        norm_sampled=sampled,
        text_columns=list(layout.get("text_columns", [])),
        image=(
            {"transform": recipe.get("transform", {}), "grid": recipe.get("grid", 0)}
            if recipe.get("kind") == "image"
            else None
        ),
    )


# --- rendering --------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""  # unreachable


def render_summary(summary: CacheSummary):
    """A rich renderable: an overview table, then one row per facet."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    s = summary
    over = Table(title=f"cache {escape(s.path)}", show_header=False, title_justify="left")
    over.add_row("rows", f"{s.rows:,} in {s.shards} shard(s)")
    per_row = f" ({_human_bytes(s.bytes_per_row)} per row)" if s.bytes_per_row else ""
    over.add_row("size on disk", f"{_human_bytes(s.bytes)}{per_row}")
    if s.image is not None:  # features of a frozen vision tower (`facetclip embed-images`)
        t, g = s.image["transform"], s.image["grid"]
        grid = f" + a {g} x {g} token grid" if g else ""
        over.add_row("image cache", f"pooling {s.pooling}{grid}, stored as {s.dtype}")
        over.add_row("tower", escape(s.model))
        over.add_row("weights fingerprint", s.model_fingerprint)
        over.add_row("transform", f"{t.get('image_size')} px, {t.get('resize')}, "
                     f"mean {t.get('mean')}, std {t.get('std')}")  # fmt: skip
    else:
        over.add_row(
            "recipe",
            f"{escape(s.recipe)}: pooling {s.pooling}, layer {s.layer}, stored as {s.dtype}",
        )
        over.add_row("model", escape(s.model))
        over.add_row("model fingerprint", s.model_fingerprint)
        over.add_row(
            "truncated captions",
            f"{s.truncated:,} ({_fmt(s.truncated_share and 100 * s.truncated_share, '.1f')}%)"
            if s.rows
            else "–",
        )
    for c, t in s.tokens.items():
        over.add_row(f"tokens of {escape(c)}", f"mean {_fmt(t.mean, '.1f')}, max {t.max}")
    over.add_row(
        "skipped rows",
        ", ".join(f"{escape(r)}: {n:,}" for r, n in s.skipped.items()) or "none",
    )

    facets = Table(
        title=f"facets (norm statistics over {s.norm_rows:,} rows"
        + (", sampled)" if s.norm_sampled else ")"),
        title_justify="left",
    )
    for h in ("facet", "column", "dim", "‖v‖ min", "‖v‖ mean", "‖v‖ max", "‖mean‖", "mean cos"):
        facets.add_column(h, justify="left" if h in ("facet", "column") else "right")
    for f in s.facets:
        facets.add_row(
            f.name + (f" [red]({f.nonfinite_rows} NaN/Inf)[/]" if f.nonfinite_rows else ""),
            escape(f.column or ""),
            str(f.dim),
            _fmt(f.norm_min),
            _fmt(f.norm_mean),
            _fmt(f.norm_max),
            _fmt(f.mean_vector_norm),
            _fmt(f.mean_pairwise_cosine),
        )
    facets.caption = (
        "‖mean‖: norm of the mean unit vector (0 = spread evenly, 1 = one direction); "
        "mean cos: mean cosine over all pairs of rows"
    )
    return Group(over, facets)
