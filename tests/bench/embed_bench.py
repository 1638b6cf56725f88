"""Stage one's speed: the hf engine's facet packing against K separate sequences.

For recipe ``flame-long`` (7 facets) on synthetic long captions, with an untrained small Llama
(hidden 256, 4 layers; only speed matters, so ``steps=0``) in float32 on CPU:

- **packed**: ``HFEngine.embed`` on the ``PromptTokenizer`` items: one row per caption, the
  context once and all 7 facets behind the block mask (``embed.packing``).
- **naive**: what a user does without facet packing, and the strongest honest baseline: each
  standalone sequence ``context + facet_k`` is its own row, rows batched by the same token
  budget with the same length bucketing (``token_budget_batches``), right padding and a plain
  2-D padding mask (transformers adds the causal part), on the engine's very own ``model``.

Both run in one process after a warm-up, alternating chunk by chunk (a chunk = the captions
of one of the engine's batches), so a busy machine slows both alike; the median of the
repeats counts.
Both must give the same vectors (min cosine >= 0.9999), so the race is apples to apples.

Token counts, per method: *real* tokens carry data (sum of row lengths); *computed* tokens are
what the forward passes process (sum over batches of rows x longest row, padding included).

    ideal ratio     = naive computed tokens / packed computed tokens
    speedup         = naive median seconds / packed median seconds
    speedup / ideal = packed computed tokens/s / naive computed tokens/s   (target >= 0.8)
    padding eff.    = packed real tokens / packed computed tokens          (target >= 0.9)

``speedup / ideal`` below 1 means a packed row costs more per token than a plain one: a
longer attention span, the dense [B, 1, L, L] float mask, or batch building in Python.

Second, side by side: stage one's end-to-end rate with ``--engines 1`` (in process, no Ray,
torch on every core) and ``--engines 2`` (two hf engine actors on a local Ray, one CPU and one
torch thread each), on the same captions and model, alternating which goes first; each run is
a fresh cache, so the time includes reading the input, loading the model into each actor and
writing the shards (Ray itself is started once, before timing). Both caches must be equal.

    ratio = captions/s with 2 engines / captions/s with 1 engine

    python -m tests.bench --only embed [--quick]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from embed.engine import EngineConfig
from embed.hf_engine import HFEngine
from embed.packing import PromptIds, token_budget_batches
from embed.prompts import BUILTIN_RECIPES
from embed.tokenize import PromptTokenizer
from tests.bench import Report, Target

SPEEDUP_TARGET = 0.8  # speedup >= 0.8 x ideal ratio
PADDING_TARGET = 0.9  # packed real / computed tokens
AGREEMENT_TARGET = 0.9999  # min cosine between packed and naive vectors


@dataclass(frozen=True)
class EmbedBenchConfig:
    """One benchmark run. ``model=None`` builds the untrained tiny LM in a temporary folder."""

    n_captions: int = 512
    repeats: int = 3
    warmup_captions: int = 32
    token_budget: int = 16384
    recipe: str = "flame-long"
    seed: int = 1
    model: str | None = None
    hidden_size: int = 256
    num_layers: int = 4
    intermediate_size: int = 768


FULL = EmbedBenchConfig()
QUICK = EmbedBenchConfig(n_captions=128, repeats=3, warmup_captions=16)


@dataclass
class Side:
    """Measurements of one method: seconds per chunk per repeat, token counts of one pass."""

    name: str
    n_rows: int  # sequences (packed: captions; naive: captions x K)
    n_forward: int = 0  # forward passes (batches)
    real_tokens: int = 0
    computed_tokens: int = 0
    chunk_seconds: list[list[float]] = field(default_factory=list)  # [repeat][chunk]

    @property
    def seconds(self) -> list[float]:
        """Seconds of each repeat (all chunks)."""
        return [sum(r) for r in self.chunk_seconds]

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best_seconds(self) -> float:
        """Sum over chunks of each chunk's fastest repeat: the least disturbed estimate."""
        return sum(min(per_chunk) for per_chunk in zip(*self.chunk_seconds, strict=True))

    @property
    def spread(self) -> float:
        """(slowest - fastest repeat) / median: how busy the machine was meanwhile."""
        return (max(self.seconds) - min(self.seconds)) / self.median_seconds

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.computed_tokens


@dataclass
class EmbedBenchResult:
    config: EmbedBenchConfig
    threads: int
    n_captions: int
    n_facets: int
    hidden_size: int
    packed: Side
    naive: Side
    min_cosine: float
    packed_vectors: np.ndarray
    naive_vectors: np.ndarray

    @property
    def speedup(self) -> float:
        return self.naive.median_seconds / self.packed.median_seconds

    @property
    def ideal_ratio(self) -> float:
        return self.naive.computed_tokens / self.packed.computed_tokens

    @property
    def speedup_over_ideal(self) -> float:
        return self.speedup / self.ideal_ratio

    @property
    def best_speedup_over_ideal(self) -> float:
        """The same from each chunk's fastest repeat: far from the median one = a busy machine."""
        return self.naive.best_seconds / self.packed.best_seconds / self.ideal_ratio


# --- the two methods ----------------------------------------------------------------------


def standalone_sequences(items: Sequence[PromptIds]) -> list[list[int]]:
    """Every facet's standalone sequence ``context + facet_k``, in item then facet order."""
    return [it.standalone(k) for it in items for k in range(len(it.facets))]


def naive_batches(seqs: Sequence[Sequence[int]], token_budget: int) -> list[list[int]]:
    return token_budget_batches([len(s) for s in seqs], token_budget)


@torch.inference_mode()
def naive_embed(model, seqs: Sequence[Sequence[int]], token_budget: int, pad_id: int) -> np.ndarray:
    """The last hidden state of each sequence, one sequence per row, right-padded batches."""
    out: list[np.ndarray | None] = [None] * len(seqs)
    device = next(model.parameters()).device
    for batch in naive_batches(seqs, token_budget):
        lengths = torch.tensor([len(seqs[i]) for i in batch])
        ids = torch.full((len(batch), int(lengths.max())), pad_id, dtype=torch.long)
        for b, i in enumerate(batch):
            ids[b, : lengths[b]] = torch.tensor(seqs[i])
        # 1 for real tokens, 0 for padding; right padding keeps real positions at 0..n-1.
        attention = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        hidden = model(
            input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False
        ).last_hidden_state
        last = hidden[torch.arange(len(batch), device=device), (lengths - 1).to(device)]
        for b, i in enumerate(batch):
            out[i] = last[b].float().cpu().numpy()
    return np.stack(out)


def batch_counts(lengths: Sequence[int], token_budget: int) -> tuple[int, int, int]:
    """(forward passes, real tokens, computed tokens) of rows of these lengths batched by
    ``token_budget_batches``, as both ``HFEngine.embed`` and ``naive_embed`` batch them."""
    batches = token_budget_batches(lengths, token_budget)
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return len(batches), sum(lengths), computed


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.min())


# --- inputs ---------------------------------------------------------------------------------


def build_model(out: Path, cfg: EmbedBenchConfig) -> Path:
    """The untrained small Llama of the benchmark (random weights, trained tokenizer)."""
    from eval.tiny_llm import TinyLLMConfig, build_tiny_llm

    build_tiny_llm(
        out,
        TinyLLMConfig(
            steps=0,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers,
            intermediate_size=cfg.intermediate_size,
            n_captions=400,  # the tokenizer's corpus; more only slows the build
            seed=cfg.seed,
        ),
        progress=False,
    )
    return out


def encode_captions(tokenizer, recipe_name: str, n: int, seed: int) -> list[PromptIds]:
    """Prompt ids of ``n`` synthetic long captions, as ``facetclip embed`` builds them."""
    from eval.synth import iter_samples

    recipe = BUILTIN_RECIPES[recipe_name]
    assert len(recipe.groups) == 1, "the benchmark embeds one caption column"
    # Samples after the tokenizer's training range, so captions are not its own corpus.
    samples = iter_samples(n, seed=seed, start=100_000)
    encoded = PromptTokenizer(tokenizer, recipe).encode([[s.long_caption] for s in samples])
    return [e.items[0] for e in encoded]


# --- measuring ------------------------------------------------------------------------------


def measure(cfg: EmbedBenchConfig = FULL) -> EmbedBenchResult:
    """Run packed and naive side by side on the same model and captions; see module doc."""
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="facetclip-bench-") as tmp:
        model_path = Path(cfg.model) if cfg.model else build_model(Path(tmp) / "model", cfg)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        engine = HFEngine(
            EngineConfig(
                str(model_path), dtype="float32", device="cpu", token_budget=cfg.token_budget
            )
        )
    items = encode_captions(tokenizer, cfg.recipe, cfg.n_captions, cfg.seed)
    n_facets = len(items[0].facets)
    # Same weights for both: the engine's own (layer-truncated, final-normed) decoder.
    runs = {
        "packed": lambda chunk: engine.embed(chunk),
        "naive": lambda chunk: naive_embed(
            engine.model, standalone_sequences(chunk), cfg.token_budget, engine.pad_id
        ),
    }

    # The two methods alternate chunk by chunk, not run by run, so a busy machine (other
    # jobs come and go within seconds) slows both alike. A chunk is the captions of one of
    # the engine's own batches, so the packed side runs exactly the batches that
    # ``engine.embed(items)`` would; the naive side length-buckets each chunk's 7x as many
    # standalone sequences by the same budget (its padding is counted, see the table).
    chunks = [
        [items[i] for i in batch]
        for batch in token_budget_batches([it.packed_length for it in items], cfg.token_budget)
    ]
    sides = {"packed": Side("packed", len(items)), "naive": Side("naive", len(items) * n_facets)}
    for chunk in chunks:
        for side, lengths in (
            (sides["packed"], [it.packed_length for it in chunk]),
            (sides["naive"], [len(s) for s in standalone_sequences(chunk)]),
        ):
            n_forward, real, computed = batch_counts(lengths, cfg.token_budget)
            side.n_forward += n_forward
            side.real_tokens += real
            side.computed_tokens += computed

    # Warm-up: first calls pay for allocator growth and kernel selection.
    for run in runs.values():
        run(items[: cfg.warmup_captions])

    real0, computed0 = engine.real_tokens, engine.computed_tokens
    vectors: dict[str, list[np.ndarray]] = {}
    for r in range(cfg.repeats):
        vectors = {name: [] for name in runs}
        for side in sides.values():
            side.chunk_seconds.append([])
        for c, chunk in enumerate(chunks):
            order = ("packed", "naive") if (r + c) % 2 == 0 else ("naive", "packed")
            for name in order:
                t0 = time.perf_counter()
                vectors[name].append(runs[name](chunk))
                sides[name].chunk_seconds[-1].append(time.perf_counter() - t0)
    # The engine's own counters must match the batches counted here.
    assert engine.real_tokens - real0 == cfg.repeats * sides["packed"].real_tokens
    assert engine.computed_tokens - computed0 == cfg.repeats * sides["packed"].computed_tokens

    packed_vectors, naive_vectors = (np.concatenate(vectors[name]) for name in ("packed", "naive"))
    return EmbedBenchResult(
        config=cfg,
        threads=torch.get_num_threads(),
        n_captions=len(items),
        n_facets=n_facets,
        hidden_size=engine.hidden_size,
        packed=sides["packed"],
        naive=sides["naive"],
        min_cosine=min_cosine(packed_vectors, naive_vectors),
        packed_vectors=packed_vectors,
        naive_vectors=naive_vectors,
    )


# --- reporting ------------------------------------------------------------------------------


def report(res: EmbedBenchResult) -> Report:
    cfg, p, n = res.config, res.packed, res.naive

    def per_s(count: float, side: Side) -> str:
        return f"{count / side.median_seconds:,.0f}"

    table = [
        ["", "packed", "naive"],
        ["captions/s", per_s(res.n_captions, p), per_s(res.n_captions, n)],
        [
            "vectors/s",
            per_s(res.n_captions * res.n_facets, p),
            per_s(res.n_captions * res.n_facets, n),
        ],
        ["computed tokens/s", per_s(p.computed_tokens, p), per_s(n.computed_tokens, n)],
        ["real tokens/s", per_s(p.real_tokens, p), per_s(n.real_tokens, n)],
        ["median seconds", f"{p.median_seconds:.3f}", f"{n.median_seconds:.3f}"],
        ["best seconds (per chunk)", f"{p.best_seconds:.3f}", f"{n.best_seconds:.3f}"],
        [
            "all seconds",
            " ".join(f"{s:.2f}" for s in p.seconds),
            " ".join(f"{s:.2f}" for s in n.seconds),
        ],
        ["rows (sequences)", f"{p.n_rows:,}", f"{n.n_rows:,}"],
        ["forward passes", f"{p.n_forward:,}", f"{n.n_forward:,}"],
        ["real tokens", f"{p.real_tokens:,}", f"{n.real_tokens:,}"],
        ["computed tokens", f"{p.computed_tokens:,}", f"{n.computed_tokens:,}"],
        ["padding efficiency", f"{p.padding_efficiency:.3f}", f"{n.padding_efficiency:.3f}"],
    ]
    notes = [
        f"speedup (naive s / packed s): {res.speedup:.2f}x",
        f"ideal ratio (naive computed / packed computed tokens): {res.ideal_ratio:.2f}x",
        f"speedup / ideal: {res.speedup_over_ideal:.3f} from medians, "
        f"{res.best_speedup_over_ideal:.3f} from each chunk's fastest repeat; repeat spread packed "
        f"{p.spread:.0%}, naive {n.spread:.0%} (large spread or disagreement: a busy machine, re-run)",
        f"packed vs naive vectors: min cosine {res.min_cosine:.7f} over {len(res.packed_vectors):,} vectors",
    ]
    title = (
        f"embed: {cfg.recipe} on {res.n_captions} synthetic long captions ({res.n_facets} facets), "
        f"untrained Llama {cfg.num_layers} layers x hidden {res.hidden_size}, float32 cpu, "
        f"torch threads {res.threads}, token budget {cfg.token_budget:,}, "
        f"median of {cfg.repeats} (alternating chunk by chunk, after warm-up)"
    )
    targets = [
        Target("speedup / ideal ratio", res.speedup_over_ideal, SPEEDUP_TARGET),
        Target("packed padding efficiency", p.padding_efficiency, PADDING_TARGET),
        Target("packed = naive vectors (min cosine)", res.min_cosine, AGREEMENT_TARGET, digits=7),
    ]
    return Report(title, table, targets, notes)


# --- 1 engine vs 2 engine actors ----------------------------------------------------------------


@dataclass(frozen=True)
class EnginesBenchConfig:
    """``facetclip embed --engines N`` for each N in ``engines``, on the benchmark's model."""

    n_captions: int = 1024
    shard_rows: int = 64
    repeats: int = 2
    engines: tuple[int, ...] = (1, 2)
    model: EmbedBenchConfig = FULL  # model size, recipe and seed (model=None: build it)


ENGINES_FULL = EnginesBenchConfig()
ENGINES_QUICK = EnginesBenchConfig(n_captions=256, shard_rows=32, repeats=1, model=QUICK)


@dataclass
class EnginesBenchResult:
    config: EnginesBenchConfig
    seconds: dict[int, list[float]]  # engines -> wall seconds of each repeat
    caches_equal: bool  # every engine count wrote the same rows and vectors

    def captions_per_s(self, engines: int) -> float:
        return self.config.n_captions / statistics.median(self.seconds[engines])

    @property
    def ratio(self) -> float:
        lo, hi = min(self.config.engines), max(self.config.engines)
        return self.captions_per_s(hi) / self.captions_per_s(lo)


def write_captions(path: Path, n: int, seed: int) -> Path:
    """``n`` synthetic long captions as a Parquet input of ``facetclip embed``."""
    from eval.synth import iter_samples

    samples = list(iter_samples(n, seed=seed, start=100_000))
    pq.write_table(
        pa.table(
            {"key": [s.key for s in samples], "long_caption": [s.long_caption for s in samples]}
        ),
        path,
    )
    return path


def _cache_rows(root: Path) -> pa.Table:
    from store.cache import Cache

    cache = Cache.open(root)
    tables = [pq.read_table(p).replace_schema_metadata(None) for p in cache.shard_paths]
    return pa.concat_tables(tables).sort_by("key")


def measure_engines(cfg: EnginesBenchConfig = ENGINES_FULL) -> EnginesBenchResult:
    """Time ``run_embed`` with each engine count, alternating the order across repeats."""
    import ray

    from embed.pipeline import EmbedConfig, run_embed
    from store.cluster import init_ray

    seconds: dict[int, list[float]] = {n: [] for n in cfg.engines}
    tables: dict[int, pa.Table] = {}
    with tempfile.TemporaryDirectory(prefix="facetclip-bench-") as tmp:
        m = cfg.model
        model = Path(m.model) if m.model else build_model(Path(tmp) / "model", m)
        captions = write_captions(Path(tmp) / "captions.parquet", cfg.n_captions, m.seed)
        started = init_ray(None, max(cfg.engines))  # once: a cluster outlives many runs
        try:
            for r in range(cfg.repeats):
                for n in cfg.engines if r % 2 == 0 else cfg.engines[::-1]:
                    out = Path(tmp) / f"cache-{n}-{r}"
                    summary = run_embed(
                        EmbedConfig(
                            captions,
                            str(model),
                            out,
                            recipe=m.recipe,
                            engine="hf",
                            compute_dtype="float32",
                            device="cpu",
                            shard_rows=cfg.shard_rows,
                            token_budget=m.token_budget,
                            engines=n,
                        ),  # fmt: skip
                        progress=False,
                    )
                    assert summary.rows == cfg.n_captions
                    seconds[n].append(summary.seconds)
                    tables.setdefault(n, _cache_rows(out))
        finally:
            if started:
                ray.shutdown()
    first = tables[cfg.engines[0]]
    return EnginesBenchResult(cfg, seconds, all(t.equals(first) for t in tables.values()))


def report_engines(res: EnginesBenchResult) -> Report:
    cfg = res.config
    header = [""] + [f"{n} engine{'s' if n > 1 else ''}" for n in cfg.engines]
    table = [
        header,
        ["captions/s", *(f"{res.captions_per_s(n):,.1f}" for n in cfg.engines)],
        ["median seconds", *(f"{statistics.median(res.seconds[n]):.2f}" for n in cfg.engines)],
        ["all seconds", *(" ".join(f"{s:.2f}" for s in res.seconds[n]) for n in cfg.engines)],
        ["where", *("in process" if n == 1 else f"{n} Ray actors" for n in cfg.engines)],
    ]
    lo, hi = min(cfg.engines), max(cfg.engines)
    notes = [
        f"ratio ({hi} engines / {lo}): {res.ratio:.2f}x on {os.cpu_count()} cores; "
        f"{lo} engine: torch threads {torch.get_num_threads()}, each actor: 1 thread",
        "times include input, model load per engine and shard writes; Ray started beforehand",
    ]
    title = (
        f"embed --engines: {cfg.model.recipe} on {cfg.n_captions} synthetic long captions, "
        f"shards of {cfg.shard_rows}, untrained Llama {cfg.model.num_layers} layers x hidden "
        f"{cfg.model.hidden_size}, hf float32 cpu, median of {cfg.repeats}"
    )
    targets = [Target("caches equal across engine counts", float(res.caches_equal), 1.0, digits=0)]
    return Report(title, table, targets, notes)


def run(quick: bool = False) -> list[Report]:
    return [
        report(measure(QUICK if quick else FULL)),
        report_engines(measure_engines(ENGINES_QUICK if quick else ENGINES_FULL)),
    ]
