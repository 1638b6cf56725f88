"""`facetclip embed`: stream captions -> token ids -> engine -> shards in a resumable cache.

Shard i holds the input rows [i * shard_rows, (i + 1) * shard_rows) (embedded or skipped), so
a rerun of the same command recognises finished shards by their input range, skips them
without loading the model, and recomputes only what is missing.

``engines=1`` runs here, in this process, without Ray; ``engines>1`` (or a ``ray_address``)
hands the same shards to Ray actors (embed.distributed). Both paths share ``plan_embed`` (validation, the cache, the
shards still to do) and ``ShardEmbedder`` (one shard's vectors and its staged files).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from embed.engine import (
    Engine,
    EngineConfig,
    inspect_model,
    make_engine,
    model_fingerprint,
    pick_engine,
)
from embed.prompts import PFORMER_POOLINGS, Recipe, get_recipe
from embed.tokenize import PromptTokenizer
from store.cache import SKIPPED_SCHEMA, Cache, StagedShard
from store.errors import FacetclipError, InputError
from store.format import TOKENS_PREFIX, encode_vectors, layout_metadata, shard_schema
from store.progress import Bar
from store.tables import (
    CaptionBatch,
    CaptionSource,
    available_columns,
    count_rows,
    iter_caption_batches,
    iter_keys,
    resolve_format,
)

ON_DUPLICATE = ("error", "keep-first")


class EmbedError(FacetclipError):
    """Embedding produced something that must not be written (e.g. NaN/Inf vectors)."""


@dataclass
class EmbedConfig:
    captions: Path
    model: str
    out: Path | str  # a local folder, or a pyarrow.fs URI such as s3://bucket/caches/flame
    recipe: str = "flame"
    engine: str = "auto"
    compute_dtype: str = "auto"  # float32 on CPU, bfloat16 on CUDA
    dtype: str | None = None  # storage dtype; default: the recipe's (float16)
    layer: int | None = None  # default: the recipe's
    shard_rows: int | None = None  # default: a cache's own, else sized for ~256 MB shards
    limit: int | None = None
    input_format: str = "auto"
    key_column: str = "key"
    columns: dict[str, str] = field(default_factory=dict)  # recipe column -> input column
    on_duplicate: str = "error"
    store_text: bool = True
    batch_rows: int = 256  # rows per engine call (progress granularity)
    token_budget: int = 16384
    device: str = "auto"
    engines: int = 1  # >1: that many engine actors on Ray (embed.distributed)
    ray_address: str | None = None  # run the actors on this Ray cluster (even with engines=1)
    max_engine_failures: int = 3  # actor deaths tolerated before the run stops
    out_filesystem: Any = None  # a pyarrow.fs.FileSystem holding ``out`` (default: from out)


@dataclass
class ShardStats:
    """What embedding one shard produced, summed into ``EmbedSummary``."""

    rows: int = 0
    tokens: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)


@dataclass
class EmbedSummary:
    out: Path | str
    rows: int = 0  # rows written by this run
    rows_reused: int = 0  # rows in shards finished by an earlier run
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    tokens: int = 0  # tokens the model computed (context once + facets)
    shards_written: int = 0
    shards_reused: int = 0
    engines: int = 1
    engine_failures: int = 0  # engine actors that died and were replaced (engines > 1)
    seconds: float = 0.0
    engine: str = ""  # the engine that ran and why (--engine auto says what it picked)

    def add(self, stats: ShardStats) -> None:
        self.rows += stats.rows
        self.tokens += stats.tokens
        self.truncated += stats.truncated
        self.skipped.update(stats.skipped)
        self.shards_written += 1

    @property
    def captions_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def resolve_recipe(cfg: EmbedConfig) -> Recipe:
    return recipe_with_overrides(cfg.recipe, cfg.dtype, cfg.layer, cfg.columns)


def recipe_with_overrides(
    name: str, dtype: str | None, layer: int | None, columns: dict[str, str]
) -> Recipe:
    """A recipe by name or file, with the command line's --dtype, --layer and --column applied."""
    recipe = get_recipe(name)
    if dtype is not None:
        recipe = replace(recipe, dtype=dtype)
    if layer is not None:
        recipe = replace(recipe, layer=layer)
    unknown = set(columns) - set(recipe.columns)
    if unknown:
        raise InputError(
            f"--column names {sorted(unknown)} are not columns of recipe {recipe.name!r} ({recipe.columns})"
        )
    return recipe.with_columns(columns)


def auto_shard_rows(n_vectors: int, dim: int, dtype: str) -> int:
    bytes_per_row = n_vectors * dim * {"float16": 2, "float32": 4, "int8": 1}[dtype] + 1024
    return int(np.clip((256 << 20) // bytes_per_row, 1000, 100_000))


def find_duplicates(source: CaptionSource, limit: int | None) -> dict[str, int]:
    """Every key that occurs more than once in the input -> the row of its first occurrence.

    Pass one keeps only a 64-bit hash per key (8 bytes a row, whatever the key length);
    pass two confirms the suspects with the real strings, so a hash collision cannot cause a
    false error.
    """
    hashes = []
    seen = 0
    for keys in iter_keys(source):
        if limit is not None:
            keys = keys[: max(0, limit - seen)]
        hashes.append(np.fromiter((hash(k) for k in keys), dtype=np.int64, count=len(keys)))
        seen += len(keys)
        if limit is not None and seen >= limit:
            break
    if not hashes:
        return {}
    h = np.sort(np.concatenate(hashes))
    suspects = set(h[1:][h[1:] == h[:-1]].tolist())
    if not suspects:
        return {}
    first: dict[str, int] = {}
    counts: Counter = Counter()
    row = 0
    for keys in iter_keys(source):
        for k in keys:
            if limit is not None and row >= limit:
                break
            if hash(k) in suspects:
                counts[k] += 1
                first.setdefault(k, row)
            row += 1
    return {k: first[k] for k, c in counts.items() if c > 1}


def _shards(
    source: CaptionSource, columns: list[str], shard_rows: int, limit: int | None
) -> Iterator[CaptionBatch]:
    """Input rows regrouped into shard-sized batches (start is a multiple of shard_rows)."""
    keys: list[str] = []
    cols: dict[str, list] = {c: [] for c in columns}
    start = 0
    read = 0
    for batch in iter_caption_batches(source, columns, batch_rows=min(shard_rows, 4096)):
        n = len(batch.keys)
        if limit is not None:
            n = min(n, limit - read)
        pos = 0
        while pos < n:
            take = min(n - pos, shard_rows - len(keys))
            keys += batch.keys[pos : pos + take]
            for c in columns:
                cols[c] += batch.columns[c][pos : pos + take]
            pos += take
            if len(keys) == shard_rows:
                yield CaptionBatch(start, keys, cols)
                start += len(keys)
                keys, cols = [], {c: [] for c in columns}
        read += n
        if limit is not None and read >= limit:
            break
    if keys:
        yield CaptionBatch(start, keys, cols)


class EmbedProgress:
    """The embed bar: rows done of the input, with captions/s and tokens/s computed so far."""

    def __init__(self, total: int | None, enabled: bool):
        self.bar = Bar("embed", total, enabled)
        self.t0 = time.perf_counter()
        self.rows = 0
        self.tokens = 0

    def advance(self, rows: int, computed_rows: int = 0, tokens: int = 0) -> None:
        self.rows += computed_rows
        self.tokens += tokens
        dt = max(time.perf_counter() - self.t0, 1e-9)
        speed = f"{self.rows / dt:,.1f} captions/s  {self.tokens / dt:,.0f} tokens/s"
        self.bar.update(advance=rows, info=speed)

    def close(self) -> None:
        self.bar.close()


@dataclass
class EmbedPlan:
    """Everything both execution paths share: the validated inputs and the opened cache."""

    cfg: EmbedConfig
    recipe: Recipe
    source: CaptionSource
    cache: Cache
    schema: pa.Schema
    duplicates: dict[str, int]
    shard_rows: int
    total: int | None  # input rows to cover (None: unknown until read)
    model_path: Path  # the model's local folder (weights and tokenizer)

    def todo(self, summary: EmbedSummary, bar: EmbedProgress) -> Iterator[tuple[int, CaptionBatch]]:
        """(index, rows) of each shard still to embed; finished ones are counted and passed."""
        for shard in _shards(self.source, self.recipe.columns, self.shard_rows, self.cfg.limit):
            index = shard.start // self.shard_rows
            end = shard.start + len(shard.keys)
            entry = self.cache.manifest.entry(index)
            if entry is not None and (entry.input_start, entry.input_end) == (shard.start, end):
                summary.shards_reused += 1
                summary.rows_reused += entry.rows
                bar.advance(len(shard.keys))
                continue
            yield index, shard


def plan_embed(cfg: EmbedConfig) -> EmbedPlan:
    """Validate ``cfg`` against its input and model, and create (or reopen) the cache."""
    if cfg.on_duplicate not in ON_DUPLICATE:
        raise InputError(f"--on-duplicate must be one of {ON_DUPLICATE}")
    if cfg.limit is not None and cfg.limit < 1:
        raise InputError("--limit must be >= 1")
    if cfg.shard_rows is not None and not 1 <= cfg.shard_rows <= 10_000_000:
        raise InputError("--shard-rows must be in 1..10000000")
    if cfg.engines < 1:
        raise InputError("--engines must be >= 1")
    recipe = resolve_recipe(cfg)
    source = CaptionSource(Path(cfg.captions), cfg.input_format, cfg.key_column)
    found = available_columns(source)
    needed = [cfg.key_column, *recipe.columns]
    missing = [c for c in needed if c not in found]
    if missing:
        raise InputError(
            f"column(s) {missing} not found in {cfg.captions}; columns found: {', '.join(found)}. "
            "Map recipe columns with --column RECIPE_COLUMN=INPUT_COLUMN and the key with --key-column"
        )
    duplicates = find_duplicates(source, cfg.limit)
    if duplicates and cfg.on_duplicate == "error":
        shown = ", ".join(repr(k) for k in list(duplicates)[:5])
        raise InputError(
            f"{len(duplicates)} duplicate key(s) in {cfg.captions}, e.g. {shown}; "
            "fix the input or pass --on-duplicate keep-first"
        )

    if recipe.pooling in PFORMER_POOLINGS:  # the "model" is a P-Former predictor
        from embed.pformer_engine import pformer_recipe

        recipe, info = pformer_recipe(recipe, cfg.model)
    else:
        info = inspect_model(cfg.model)
        recipe = replace(
            recipe,
            model=str(info.path) if Path(cfg.model).expanduser().exists() else cfg.model,
            model_fingerprint=model_fingerprint(info.path),
        )
    text_columns = recipe.columns if cfg.store_text else []
    layout = layout_metadata(recipe.vector_names, info.hidden_size, recipe.dtype, text_columns)
    shard_rows = cfg.shard_rows
    if shard_rows is None:
        existing = Cache.existing_manifest(cfg.out, cfg.out_filesystem)
        shard_rows = (
            existing.shard_rows
            if existing is not None
            else auto_shard_rows(len(recipe.vector_names), info.hidden_size, recipe.dtype)
        )
    input_info = {
        "path": str(Path(cfg.captions).resolve()),
        "format": resolve_format(source.path, source.format),
    }
    schema = shard_schema(
        recipe.vector_names, info.hidden_size, recipe.dtype, text_columns, recipe.columns
    )
    total = count_rows(source)
    if cfg.limit is not None:
        total = cfg.limit if total is None else min(total, cfg.limit)
    # Last: this takes the cache's writer lock, which the caller releases (run_embed).
    cache = Cache.create(
        cfg.out, recipe.to_dict(), layout, shard_rows, input_info, cfg.out_filesystem,
        writer=f"facetclip embed {cfg.captions} --out {cfg.out}",
    )  # fmt: skip
    if recipe.pooling in PFORMER_POOLINGS:
        from embed.pformer_engine import write_cache_head

        write_cache_head(cache, recipe, Path(info.path))
    return EmbedPlan(
        cfg, recipe, source, cache, schema, duplicates, shard_rows, total, Path(info.path)
    )


def run_embed(
    cfg: EmbedConfig, progress: bool = True, engine: Engine | None = None
) -> EmbedSummary:
    """Embed ``cfg.captions`` into the cache ``cfg.out`` (creating or resuming it).

    ``cfg.engines > 1`` or a ``cfg.ray_address`` runs that many engine actors on Ray
    (``engine`` must then be None); otherwise everything runs in this process."""
    t0 = time.perf_counter()
    plan = plan_embed(cfg)
    try:
        summary = _run_plan(plan, progress, engine)
    finally:
        plan.cache.unlock()  # the writer lock plan_embed took: held for the whole run
    summary.seconds = time.perf_counter() - t0
    return summary


def _run_plan(plan: EmbedPlan, progress: bool, engine: Engine | None) -> EmbedSummary:
    cfg = plan.cfg
    if cfg.engines > 1 or cfg.ray_address:
        if engine is not None:
            raise ValueError("an engine object cannot be shared by several Ray actors")
        from embed.distributed import run_distributed

        return run_distributed(plan, progress)

    from transformers import AutoTokenizer

    recipe = plan.recipe
    tokenizer = PromptTokenizer(AutoTokenizer.from_pretrained(plan.model_path), recipe)
    summary = EmbedSummary(out=plan.cache.root)
    bar = EmbedProgress(plan.total, progress)
    embedder = None
    own_engine = engine is None
    try:
        for index, shard in plan.todo(summary, bar):
            if engine is None:  # loaded only when there is work: a finished cache never loads it
                engine = make_engine(cfg.engine, engine_config(cfg, recipe))
                summary.engine = describe_engine(cfg, recipe)
            summary.engine = summary.engine or getattr(engine, "name", type(engine).__name__)
            embedder = embedder or ShardEmbedder(
                recipe, tokenizer, engine, plan.schema, plan.duplicates, cfg.batch_rows
            )
            staged, stats = embedder.stage(plan.cache, index, shard, bar.advance)
            plan.cache.commit_shard(staged)
            summary.add(stats)
            _maybe_fault(summary.shards_written)
    finally:
        bar.close()
        if own_engine and engine is not None and hasattr(engine, "close"):
            engine.close()  # frees the GPU (and vLLM's truncated-weights copy)
    return summary


def describe_engine(cfg: EmbedConfig, recipe: Recipe) -> str:
    """What ``--engine`` ran and why, e.g. "hf (auto: the hf engine on the CPU ...)"."""
    kind, why = pick_engine(cfg.engine, cfg.device, recipe.pooling)
    return kind if cfg.engine != "auto" else f"{kind} ({why})"


def _maybe_fault(shards_written: int) -> None:
    """Fault injection for crash tests: FACETCLIP_KILL_AFTER_SHARDS=N makes the process
    SIGKILL itself right after its N-th shard landed in the manifest."""
    n = os.environ.get("FACETCLIP_KILL_AFTER_SHARDS")
    if n and shards_written >= int(n):
        os.kill(os.getpid(), signal.SIGKILL)


def engine_config(cfg: EmbedConfig, recipe: Recipe) -> EngineConfig:
    """The engine settings of a run (``auto`` compute dtype resolved on this machine)."""
    dtype = cfg.compute_dtype
    if dtype == "auto":
        import torch

        dtype = "bfloat16" if torch.cuda.is_available() and cfg.device != "cpu" else "float32"
    return EngineConfig(
        model=cfg.model,
        pooling=recipe.pooling,
        layer=recipe.layer,
        final_norm=recipe.final_norm,
        dtype=dtype,
        device=cfg.device,
        token_budget=cfg.token_budget,
    )


def skip_reason(
    row: int, key: str, texts: list, columns: list[str], duplicates: dict[str, int]
) -> str | None:
    """Why input row ``row`` is not embedded, or None to embed it."""
    if key is None or key == "":
        return "missing key"
    if key in duplicates and duplicates[key] != row:
        return "duplicate key"
    for c, t in zip(columns, texts, strict=True):
        if t is None:
            return f"null caption in {c}"
        if not t.strip():
            return f"empty caption in {c}"
    return None


@dataclass
class ShardEmbedder:
    """Embeds one shard's rows and stages the shard's files (or refuses to, on NaN/Inf).

    Shared by the in-process path and the Ray engine actors: the caller commits what
    ``stage`` returns (``Cache.commit_shard``)."""

    recipe: Recipe
    tokenizer: PromptTokenizer
    engine: Engine
    schema: pa.Schema
    duplicates: dict[str, int]
    batch_rows: int = 256

    def stage(
        self,
        cache: Cache,
        index: int,
        shard: CaptionBatch,
        advance: Callable[..., None] | None = None,
    ) -> tuple[StagedShard, ShardStats]:
        """Embed shard ``index`` and write it under temporary names in ``cache``."""
        table, skipped, stats = self.embed(index, shard, advance)
        staged = cache.stage_shard(
            index, table, skipped, shard.start, shard.start + len(shard.keys)
        )
        return staged, stats

    def embed(
        self, index: int, shard: CaptionBatch, advance: Callable[..., None] | None = None
    ) -> tuple[pa.Table, pa.Table, ShardStats]:
        """(rows table, skipped-rows table, counts) of one shard. ``advance(rows,
        computed_rows=, tokens=)`` is called after each engine batch (a progress bar)."""
        advance = advance or (lambda *a, **k: None)
        recipe, engine = self.recipe, self.engine
        stats = ShardStats()
        # The column each prompt group reads, in group order (a column may feed several groups).
        group_cols = [g.column for g in recipe.groups]
        kept, skipped = [], {"key": [], "input_row": [], "reason": []}
        for i, key in enumerate(shard.keys):
            row = shard.start + i
            texts = [shard.columns[c][i] for c in recipe.columns]
            reason = skip_reason(row, key, texts, recipe.columns, self.duplicates)
            if reason is None:
                kept.append(i)
            else:
                skipped["key"].append(key)
                skipped["input_row"].append(row)
                skipped["reason"].append(reason)
                stats.skipped[reason] += 1
        n_vec = len(recipe.vector_names)
        dim = engine.hidden_size
        vectors = np.zeros((len(kept), n_vec, dim), np.float32)
        tokens = np.zeros((len(kept), len(recipe.columns)), np.int32)
        truncated = np.zeros(len(kept), bool)
        col_index = {c: j for j, c in enumerate(recipe.columns)}
        for s in range(0, len(kept), self.batch_rows):
            rows = kept[s : s + self.batch_rows]
            encoded = self.tokenizer.encode(
                [[shard.columns[c][i] for c in group_cols] for i in rows]
            )
            items = [it for e in encoded for it in e.items]
            out = engine.embed(items)
            if out.shape != (len(rows) * n_vec, dim):
                raise EmbedError(
                    f"engine returned {out.shape}, expected {(len(rows) * n_vec, dim)}"
                )
            # Items are in row-then-group order and each yields its vectors in facet order,
            # which is exactly recipe.vector_names order within a row.
            vectors[s : s + len(rows)] = out.reshape(len(rows), n_vec, dim)
            for r, e in enumerate(encoded):
                truncated[s + r] = e.truncated
                for g, count in zip(group_cols, e.caption_tokens, strict=True):
                    tokens[s + r, col_index[g]] = count
            n_tokens = sum(it.packed_length for it in items)
            stats.tokens += n_tokens
            advance(len(rows), computed_rows=len(rows), tokens=n_tokens)
        advance(len(shard.keys) - len(kept))

        bad = ~np.isfinite(vectors).all(axis=(1, 2))
        if bad.any():
            keys = [shard.keys[kept[i]] for i in np.flatnonzero(bad)[:10]]
            raise EmbedError(
                f"NaN/Inf in the vectors of {int(bad.sum())} caption(s) of shard {index} (keys {keys}); "
                "the shard was not written. Try --compute-dtype float32, or check the model weights."
            )
        if recipe.normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=2, keepdims=True), 1e-12)

        arrays = {"key": pa.array([shard.keys[i] for i in kept], pa.string())}
        for c in self.schema.names:
            if c in shard.columns:
                arrays[c] = pa.array([shard.columns[c][i] for i in kept], pa.string())
        for j, name in enumerate(recipe.vector_names):
            for suffix, arr in encode_vectors(vectors[:, j], recipe.dtype).items():
                arrays[name + suffix] = arr
        for c, j in col_index.items():
            arrays[TOKENS_PREFIX + c] = pa.array(tokens[:, j], pa.int32())
        arrays["truncated"] = pa.array(truncated)
        table = pa.Table.from_arrays([arrays[f.name] for f in self.schema], schema=self.schema)
        stats.rows = len(kept)
        stats.truncated = int(truncated.sum())
        return table, pa.table(skipped, schema=SKIPPED_SCHEMA), stats


def render_embed(s: EmbedSummary):
    """What `facetclip embed` prints: a rich table of the run."""
    from rich.table import Table

    t = Table(title=f"embed -> {s.out}", show_header=False)
    t.add_row("engine", s.engine or "none loaded (nothing to embed)")
    t.add_row("rows embedded", f"{s.rows:,}")
    t.add_row("rows from earlier runs", f"{s.rows_reused:,} ({s.shards_reused} shards)")
    t.add_row("shards written", str(s.shards_written))
    t.add_row("skipped", ", ".join(f"{r}: {c}" for r, c in s.skipped.items()) or "0")
    t.add_row("truncated", f"{s.truncated:,}")
    t.add_row("tokens computed", f"{s.tokens:,}")
    if s.engine_failures:
        t.add_row("engine actors replaced", f"{s.engine_failures} (their shards recomputed)")
    t.add_row(
        "wall time",
        f"{s.seconds:.1f} s ({s.captions_per_s:,.1f} captions/s, {s.tokens_per_s:,.0f} tokens/s)",
    )
    return t
