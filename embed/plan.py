"""`facetclip plan`: what stage one will cost on a real dataset, before running it.

Tokens are counted with the model's real tokenizer on a sample of the captions, built by the
same ``PromptTokenizer`` the engines receive their ids from, so the count is the engines' own:

- **packed** (what the engines compute): per prompt group, the context ``BOS + prefix +
  caption + suffix`` once plus every facet, ``C + sum_k f_k``. This is ``PromptIds.packed_length``,
  the count ``facetclip embed`` reports as "tokens computed".
- **naive** (K separate passes, no packing or prefix cache): ``sum_k (C + f_k)``.

The sample's counts are scaled by ``rows / sampled rows`` to the whole input. Cost model
(written out in the README, "Planning a real dataset"):

    FLOPs = 2 · P · T  +  4 · n_layers · (n_heads · head_dim) · A

- ``P``: the matmul weights one token passes through in the decoder layers actually run
  (a recipe's ``layer`` truncates the model, as the engines do). The embedding lookup is
  not a matmul and the LM head is never run (the engines pool hidden states), so neither
  counts; norms, biases and activations are < 0.1 % and left out.
- ``T``: tokens (packed or naive).
- ``A``: attended (query, key) pairs, causal, with facet k seeing the context and itself:
  ``C(C+1)/2 + sum_k [f_k · C + f_k(f_k+1)/2]`` per group (naive: ``sum_k L_k(L_k+1)/2``,
  ``L_k = C + f_k``). Each pair costs one q·k and one weighted v: 2 · 2 · head_dim FLOPs per
  head. This is the useful work; an engine with a dense mask (the hf engine) does more.

GPU-hours = FLOPs / (peak bf16 dense FLOP/s · MFU) / 3600; wall time divides by the GPUs.
Cache size per row = vectors · bytes per vector (float32 4·D, float16 2·D, int8 D + 4 for the
float32 scale) + key + caption texts (uncompressed: an upper bound, they are zstd-compressed)
+ 4 bytes of token count per caption column + the truncated flag.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from embed.engine import check_layer, inspect_model
from embed.packing import PromptIds
from embed.pipeline import recipe_with_overrides, skip_reason
from embed.prompts import DTYPES, PFORMER_POOLINGS, Recipe
from embed.tokenize import EncodedCaption, PromptTokenizer
from store.errors import InputError
from store.tables import CaptionSource, available_columns, count_rows, iter_caption_batches

# Peak dense bf16 tensor-core FLOP/s (SXM parts; the 2x "with sparsity" figures do not apply).
GPU_PEAK_BF16: dict[str, float] = {"h100": 989e12, "h200": 989e12, "a100": 312e12}
# An assumption, not a measurement: prefill-only work at large batch usually reaches 40-60 %
# of peak; 0.4 leaves room for tokenisation, pooling and writing shards.
DEFAULT_MFU = 0.4
DEFAULT_SAMPLE = 10_000


# --- token counts (pure) ----------------------------------------------------------------------


def packed_tokens(item: PromptIds) -> int:
    """Tokens an engine computes for one item: the context once, then every facet."""
    return item.packed_length


def naive_tokens(item: PromptIds) -> int:
    """Tokens of K separate standalone passes ``context + facet_k`` (mean pooling: one pass)."""
    if not item.facets:
        return len(item.context)
    return sum(len(item.context) + len(f) for f in item.facets)


def _triangle(n: int) -> int:
    return n * (n + 1) // 2


def packed_attention_pairs(item: PromptIds) -> int:
    """(query, key) pairs of the facet-decoupled mask: causal in the context; facet k's token
    sees the whole context and its own facet's earlier tokens."""
    c = len(item.context)
    return _triangle(c) + sum(len(f) * c + _triangle(len(f)) for f in item.facets)


def naive_attention_pairs(item: PromptIds) -> int:
    if not item.facets:
        return _triangle(len(item.context))
    return sum(_triangle(len(item.context) + len(f)) for f in item.facets)


@dataclass(frozen=True)
class TokenCounts:
    """Counts over a set of input rows (a sample, or extrapolated to the whole input)."""

    rows: int = 0  # input rows read
    embedded: int = 0  # rows embed would embed (not skipped for a missing key or caption)
    packed: int = 0
    naive: int = 0
    packed_pairs: int = 0
    naive_pairs: int = 0
    truncated: int = 0
    key_bytes: int = 0
    text_bytes: int = 0  # UTF-8 bytes of the caption columns embed stores

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(*(a + b for a, b in zip(_values(self), _values(other), strict=True)))

    def scaled(self, factor: float) -> TokenCounts:
        return TokenCounts(*(round(v * factor) for v in _values(self)))


def _values(c: TokenCounts) -> tuple[int, ...]:
    return tuple(getattr(c, f) for f in TokenCounts.__dataclass_fields__)


def count_encoded(
    encoded: Sequence[EncodedCaption], keys: Sequence[str], texts: Sequence[Sequence[str]]
) -> TokenCounts:
    """Counts of embedded rows: ``encoded[i]`` is row i's ``PromptTokenizer`` output, ``keys[i]``
    its key and ``texts[i]`` the caption texts embed stores for it."""
    items = [it for e in encoded for it in e.items]
    return TokenCounts(
        rows=len(encoded),
        embedded=len(encoded),
        packed=sum(packed_tokens(it) for it in items),
        naive=sum(naive_tokens(it) for it in items),
        packed_pairs=sum(packed_attention_pairs(it) for it in items),
        naive_pairs=sum(naive_attention_pairs(it) for it in items),
        truncated=sum(e.truncated for e in encoded),
        key_bytes=sum(len(k.encode()) for k in keys),
        text_bytes=sum(len(t.encode()) for row in texts for t in row),
    )


def count_sample(
    source: CaptionSource, recipe: Recipe, tokenizer: PromptTokenizer, sample: int
) -> tuple[TokenCounts, bool]:
    """Token counts of the first ``sample`` input rows, skipping exactly the rows embed skips;
    and whether the input ended within the sample."""
    group_cols = [g.column for g in recipe.groups]
    total = TokenCounts()
    read = 0
    # One row past the sample tells whether the input goes on.
    for batch in iter_caption_batches(source, recipe.columns, batch_rows=min(sample + 1, 4096)):
        n = len(batch.keys)
        if read + n > sample:
            n = sample - read
        for s in range(0, n, 256):
            keys, rows, stored = [], [], []
            for i in range(s, min(s + 256, n)):
                texts = [batch.columns[c][i] for c in recipe.columns]
                # No duplicate check here: it needs a pass over every key, and embed refuses
                # duplicates anyway.
                if skip_reason(batch.start + i, batch.keys[i], texts, recipe.columns, {}):
                    total = total + TokenCounts(rows=1)
                    continue
                keys.append(batch.keys[i])
                rows.append([batch.columns[c][i] for c in group_cols])
                stored.append(texts)
            if keys:
                total = total + count_encoded(tokenizer.encode(rows), keys, stored)
        read += n
        if n < len(batch.keys):
            return total, False
    return total, True


# --- the model (pure given a config) ----------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a decoder: a Llama-style layout (GQA attention, gated MLP
    with three matrices; mixture-of-experts counts only the experts a token runs)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    num_experts: int = 1
    experts_per_token: int = 1

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a transformers config (or anything with its attribute names)."""
        config = getattr(config, "text_config", None) or config
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        # Mistral-Nemo's head_dim (128) is not hidden / heads (160): read it when given.
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        return cls(
            hidden_size=hidden,
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=head_dim,
            intermediate_size=int(getattr(config, "intermediate_size", None) or 4 * hidden),
            vocab_size=int(config.vocab_size),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            num_experts=int(getattr(config, "num_local_experts", None) or 1),
            experts_per_token=int(getattr(config, "num_experts_per_tok", None) or 1),
        )

    @property
    def attention_width(self) -> int:
        """n_heads · head_dim: the width of q·k and of the weighted v, per token."""
        return self.num_heads * self.head_dim

    def attention_params(self) -> int:
        h, q, kv = self.hidden_size, self.attention_width, self.num_kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h  # q, k, v (GQA: fewer kv heads), o

    def mlp_params(self, experts: int) -> int:
        router = self.hidden_size * self.num_experts if self.num_experts > 1 else 0
        return experts * 3 * self.hidden_size * self.intermediate_size + router  # gate, up, down

    def active_params_per_layer(self) -> int:
        """Matmul weights one token passes through in one decoder layer."""
        return self.attention_params() + self.mlp_params(self.experts_per_token)

    def total_params(self) -> int:
        """Every parameter of the checkpoint (the size people quote: "12B")."""
        h = self.hidden_size
        layer = self.attention_params() + self.mlp_params(self.num_experts) + 2 * h  # 2 norms
        head = 0 if self.tied_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head


_LAYER_NAME = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def safetensors_layer_params(path: Path, layers: int) -> int | None:
    """Elements of the 2-D (matmul) weights of decoder layers ``0 .. layers-1``, read from
    the safetensors headers in ``path`` (a few KB each; no weights are loaded). None when
    there are no safetensors files or none of their tensors belongs to a numbered layer."""
    files = sorted(Path(path).glob("*.safetensors"))
    total, found = 0, False
    for f in files:
        try:
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
        except (OSError, ValueError):
            return None  # unreadable header: fall back to the config's count
        for name, meta in header.items():
            m = _LAYER_NAME.search(name)
            if name == "__metadata__" or m is None:
                continue
            found = True
            shape = meta["shape"]
            if len(shape) == 2 and int(m.group(1)) < layers:
                total += shape[0] * shape[1]
    return total if found else None


# --- cost (pure) ------------------------------------------------------------------------------


def forward_flops(tokens: int, pairs: int, params: int, layers: int, attention_width: int) -> float:
    """2 FLOPs per weight per token, plus 4 · width FLOPs per attended pair in every layer."""
    return 2.0 * params * tokens + 4.0 * layers * attention_width * pairs


def gpu_hours(flops: float, gpu: str, mfu: float) -> float:
    return flops / (GPU_PEAK_BF16[gpu] * mfu) / 3600.0


def vector_bytes(dtype: str, dim: int) -> int:
    """Bytes of one stored vector (store/format.py): int8 adds a float32 scale column."""
    return {"float32": 4 * dim, "float16": 2 * dim, "int8": dim + 4}[dtype]


def cache_bytes(
    dtype: str,
    dim: int,
    vectors_per_row: int,
    rows: int,
    key_bytes: int,
    text_bytes: int,
    columns: int,
) -> int:
    """Bytes of a cache: ``key_bytes``/``text_bytes`` are totals over its rows."""
    # tokens__<column> is int32; truncated is a bit (counted as a byte).
    per_row = vectors_per_row * vector_bytes(dtype, dim) + 4 * columns + 1
    return rows * per_row + key_bytes + text_bytes


def check_gpus(gpu: str, gpus: int, mfu: float) -> None:
    if gpu not in GPU_PEAK_BF16:
        raise InputError(f"unknown --gpu {gpu!r}; choose one of {', '.join(GPU_PEAK_BF16)}")
    if gpus < 1:
        raise InputError(f"--gpus must be at least 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise InputError(f"--mfu is a fraction of peak in (0, 1], got {mfu}")


# --- the command ------------------------------------------------------------------------------


@dataclass
class PlanConfig:
    captions: Path
    model: str
    recipe: str = "flame"
    gpu: str = "h100"
    gpus: int = 1
    mfu: float = DEFAULT_MFU
    sample: int = DEFAULT_SAMPLE
    rows: int | None = None  # total input rows, when the reader cannot count them
    layer: int | None = None
    input_format: str = "auto"
    key_column: str = "key"
    columns: dict[str, str] = field(default_factory=dict)
    store_text: bool = True


@dataclass(frozen=True)
class Plan:
    captions: str
    model: str
    recipe: str
    rows: int  # input rows
    rows_from: str  # how `rows` is known
    sample: TokenCounts  # measured
    total: TokenCounts  # extrapolated to `rows`
    vectors_per_row: int
    dim: int
    layers_run: int
    params_total: int
    params_per_token: int
    params_from: str
    attention_width: int
    flops: float
    flops_naive: float
    gpu: str
    gpus: int
    mfu: float
    peak_flops: float
    gpu_hours: float
    gpu_hours_naive: float
    cache_bytes: dict[str, int]
    # pformer recipes: bytes per row of both cache forms, and of the head a compact cache
    # keeps once (embed.pformer_engine.prompt_cache_bytes)
    prompt_forms: dict[str, int] = field(default_factory=dict)

    @property
    def wall_hours(self) -> float:
        return self.gpu_hours / self.gpus

    def to_dict(self) -> dict:
        d = asdict(self)
        d["wall_hours"] = self.wall_hours
        return d


def make_plan(cfg: PlanConfig) -> Plan:
    """Count tokens on a sample with the model's tokenizer and estimate the whole run."""
    check_gpus(cfg.gpu, cfg.gpus, cfg.mfu)
    if cfg.sample < 1:
        raise InputError(f"--sample must be at least 1, got {cfg.sample}")
    if cfg.rows is not None and cfg.rows < 1:
        raise InputError(f"--rows must be at least 1, got {cfg.rows}")
    recipe = recipe_with_overrides(cfg.recipe, None, cfg.layer, cfg.columns)
    source = CaptionSource(Path(cfg.captions), cfg.input_format, cfg.key_column)
    found = available_columns(source)
    missing = [c for c in [cfg.key_column, *recipe.columns] if c not in found]
    if missing:
        raise InputError(
            f"column(s) {missing} not found in {cfg.captions}; columns found: {', '.join(found)}. "
            "Map recipe columns with --column RECIPE_COLUMN=INPUT_COLUMN and the key with --key-column"
        )

    if recipe.pooling in PFORMER_POOLINGS:  # the model is a P-Former predictor
        from embed.pformer_engine import plan_pformer

        return plan_pformer(cfg, recipe, source)
    info = inspect_model(cfg.model, weights=False)  # config.json + tokenizer are enough
    from transformers import AutoConfig, AutoTokenizer

    shape = ModelShape.from_config(AutoConfig.from_pretrained(info.path))
    layers = check_layer(recipe.layer, info.num_layers)
    per_token = _params_per_token(info.path, shape, layers)
    try:
        tokenizer = PromptTokenizer(AutoTokenizer.from_pretrained(info.path), recipe)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the tokenizer of {info.path}: {e}") from None

    sample, exhausted = count_sample(source, recipe, tokenizer, cfg.sample)
    if sample.rows == 0:
        raise InputError(f"{cfg.captions} has no rows")
    rows, rows_from = _total_rows(cfg, source, sample, exhausted)
    total = sample if rows == sample.rows else sample.scaled(rows / sample.rows)

    width = shape.attention_width
    flops = forward_flops(total.packed, total.packed_pairs, per_token[0], layers, width)
    naive = forward_flops(total.naive, total.naive_pairs, per_token[0], layers, width)
    n_vec = len(recipe.vector_names)
    text = total.text_bytes if cfg.store_text else 0
    sizes = {
        d: cache_bytes(
            d, info.hidden_size, n_vec, total.embedded, total.key_bytes, text, len(recipe.columns)
        )
        for d in DTYPES
    }
    return Plan(
        captions=str(cfg.captions),
        model=cfg.model,
        recipe=recipe.name,
        rows=rows,
        rows_from=rows_from,
        sample=sample,
        total=total,
        vectors_per_row=n_vec,
        dim=info.hidden_size,
        layers_run=layers,
        params_total=shape.total_params(),
        params_per_token=per_token[0],
        params_from=per_token[1],
        attention_width=width,
        flops=flops,
        flops_naive=naive,
        gpu=cfg.gpu,
        gpus=cfg.gpus,
        mfu=cfg.mfu,
        peak_flops=GPU_PEAK_BF16[cfg.gpu],
        gpu_hours=gpu_hours(flops, cfg.gpu, cfg.mfu),
        gpu_hours_naive=gpu_hours(naive, cfg.gpu, cfg.mfu),
        cache_bytes=sizes,
    )


def _params_per_token(path: Path, shape: ModelShape, layers: int) -> tuple[int, str]:
    """The exact count from safetensors headers when the weights are there (dense models:
    headers list every expert of a mixture, a token runs only some); else from config.json."""
    if shape.num_experts == 1:
        n = safetensors_layer_params(path, layers)
        if n is not None:
            return n, "safetensors headers"
    return layers * shape.active_params_per_layer(), "config.json"


def _total_rows(
    cfg: PlanConfig, source: CaptionSource, sample: TokenCounts, exhausted: bool
) -> tuple[int, str]:
    if cfg.rows is not None:
        return cfg.rows, "--rows"
    if exhausted:
        return sample.rows, "whole input read"
    n = count_rows(source)
    if n is None:
        raise InputError(
            f"cannot count the rows of {cfg.captions} without reading all of it; "
            "pass --rows N (the number of input rows)"
        )
    return n, "Parquet footers"


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23 M' (SI prefixes; bytes use powers of 1000 too, like disk vendors)."""
    for prefix, scale in (
        ("E", 1e18),
        ("P", 1e15),
        ("T", 1e12),
        ("G", 1e9),
        ("M", 1e6),
        ("k", 1e3),
    ):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}".rstrip()


def _hours(h: float) -> str:
    return f"{h:,.1f}" if h >= 10 else f"{h:.3g}"


def render_plan(p: Plan):
    """What `facetclip plan` prints: a rich table of the estimate."""
    from rich.table import Table

    s, t = p.sample, p.total
    table = Table(title=f"plan: {p.recipe} on {p.captions}", show_header=False)
    table.add_row("input rows", f"{p.rows:,} ({p.rows_from}); sampled {s.rows:,}")
    table.add_row("rows to embed", f"{t.embedded:,} ({t.truncated:,} truncated)")
    table.add_row(
        "model",
        f"{human(p.params_total)} parameters; {p.layers_run} layers run, "
        f"{human(p.params_per_token)} matmul weights per token ({p.params_from})",
    )
    table.add_row("vectors per row", f"{p.vectors_per_row} x {p.dim}")
    per_row = s.packed / max(1, s.embedded)
    naive_row = s.naive / max(1, s.embedded)
    table.add_row("tokens, packed (computed)", f"{human(t.packed)} ({per_row:,.1f} per row)")
    table.add_row(
        "tokens, naive K passes",
        f"{human(t.naive)} ({naive_row:,.1f} per row, {t.naive / max(1, t.packed):.2f}x)",
    )
    table.add_row("FLOPs, packed", f"{p.flops:.3e}")
    table.add_row("FLOPs, naive K passes", f"{p.flops_naive:.3e}")
    table.add_row(
        f"GPU-hours ({p.gpu}, {human(p.peak_flops, 'FLOP/s')} x MFU {p.mfu:g})",
        f"{_hours(p.gpu_hours)} (naive {_hours(p.gpu_hours_naive)})",
    )
    table.add_row(f"wall time on {p.gpus} GPU(s)", f"{_hours(p.wall_hours)} h")
    for dtype, n in p.cache_bytes.items():
        table.add_row(
            f"cache, {dtype}", f"{human(n, 'B')} ({n / max(1, t.embedded):,.0f} B per row)"
        )
    for form, n in p.prompt_forms.items():  # pformer recipes: both cache forms
        table.add_row(form, f"{n:,} B" + ("" if "once" in form else " per row"))
    return table
