"""P-Former prompt vectors read back from a cache, in either of its two forms (papers.md §3).

- **pformer**: every row stores its caption's N prompt vectors, one ``FLOAT[D]`` column each
  (``prompt_00`` … ``prompt_31``), D the LLM's width.
- **pformer-code** (compact): every row stores the predictor's pooled code (one ``code``
  column, the encoder's width d), and the cache keeps the small head that expands a code into
  the N prompts once, in ``CACHE/pformer_head.safetensors``:

      prompts = llm_proj(tanh(pooler(reshape(cls_proj(code), [N, d]))))

  With d = 768 (BERT) and D = 2560 (OPT-2.7B) a row shrinks from 32 x 2560 to 768 values.

``iter_prompts`` yields ``[rows, N, D]`` float32 from either form, so a consumer (stage two's
prompt alignment, captioning) never needs to know which one it reads. The expansion is plain
numpy: stage two runs where neither the LLM nor embed/ is installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from store.cache import Cache, atomic_write_bytes
from store.errors import CacheError

HEAD_FILE = "pformer_head.safetensors"
# The head's tensors, as PromptPredictor names them (embed.pformer_model), weight [out, in].
HEAD_TENSORS = (
    "cls_proj.weight",
    "cls_proj.bias",
    "pooler.0.weight",
    "pooler.0.bias",
    "llm_proj.weight",
    "llm_proj.bias",
)


def expand_codes(codes: np.ndarray, head: dict[str, np.ndarray]) -> np.ndarray:
    """[n, d] pooled codes -> [n, N, D] prompt vectors (float32), with the head's weights."""
    codes = np.asarray(codes, np.float32)
    d = codes.shape[1]
    w = {k: np.asarray(head[k], np.float32) for k in HEAD_TENSORS}
    n_prompts = w["cls_proj.weight"].shape[0] // d
    h = (codes @ w["cls_proj.weight"].T + w["cls_proj.bias"]).reshape(len(codes), n_prompts, d)
    h = np.tanh(h @ w["pooler.0.weight"].T + w["pooler.0.bias"])
    return h @ w["llm_proj.weight"].T + w["llm_proj.bias"]


def write_head(cache: Cache, head: dict[str, np.ndarray]) -> None:
    """Store the head in a local cache (atomically). A resumed cache keeps its head: the recipe
    holds the predictor's fingerprint, so another predictor cannot reach this point."""
    from safetensors.numpy import save

    if cache.fs is not None:
        raise CacheError("a pformer-code cache must be a local folder (its head file is local)")
    path = Path(cache.root) / HEAD_FILE
    if not path.is_file():
        tensors = {k: np.ascontiguousarray(head[k], np.float32) for k in HEAD_TENSORS}
        atomic_write_bytes(path, save(tensors))


def read_head(cache: Cache) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = Path(cache.root) / HEAD_FILE
    if not path.is_file():
        raise CacheError(
            f"{cache.root} is a pformer-code cache without its head ({HEAD_FILE}); "
            "re-run the same `facetclip embed` command to restore it"
        )
    head = load_file(str(path))
    missing = [k for k in HEAD_TENSORS if k not in head]
    if missing:
        raise CacheError(f"{path} lacks tensors {missing}; re-run `facetclip embed` to restore it")
    return head


def prompt_form(cache: Cache) -> str:
    """``pformer`` or ``pformer-code``; CacheError for a cache of any other recipe."""
    pooling = cache.recipe.get("pooling")
    if pooling not in ("pformer", "pformer-code"):
        raise CacheError(
            f"{cache.root} holds {cache.recipe.get('name')!r} vectors, not P-Former prompts; "
            "make one with `facetclip embed CAPTIONS --model PF --recipe pformer`"
        )
    return pooling


def iter_prompts(
    cache: str | Path | Cache, batch_rows: int = 1024
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(keys, [rows, N, D] float32 prompts) in cache order, from either form."""
    from store.reader import iter_batches

    cache = cache if isinstance(cache, Cache) else Cache.open(cache)
    form = prompt_form(cache)
    names = list(cache.manifest.layout["vector_names"])
    head = read_head(cache) if form == "pformer-code" else None
    for keys, vecs in iter_batches(cache, names, batch_rows=batch_rows):
        if head is not None:
            yield keys, expand_codes(vecs["code"], head)
        else:
            yield keys, np.stack([vecs[n] for n in names], axis=1)


def prompt_shape(cache: str | Path | Cache) -> tuple[int, int]:
    """(N, D): the prompts per row and their width (the LLM's), in either form."""
    cache = cache if isinstance(cache, Cache) else Cache.open(cache)
    layout = cache.manifest.layout
    if prompt_form(cache) == "pformer":
        return len(layout["vector_names"]), int(layout["dim"])
    head = read_head(cache)
    d = int(layout["dim"])
    return head["cls_proj.weight"].shape[0] // d, int(head["llm_proj.weight"].shape[0])


def rows_to_prompts(vectors: np.ndarray, head: dict[str, np.ndarray] | None) -> np.ndarray:
    """A batch of a prompt cache's rows as read by stage two, [n, K, dim] in the cache's vector
    order, as prompts [n, N, D]: the rows themselves (``pformer``: K = N prompt columns), or
    their one ``code`` column expanded with the cache's ``head`` (``pformer-code``)."""
    if head is None:
        return np.asarray(vectors, np.float32)
    return expand_codes(np.asarray(vectors)[:, 0], head)


def prompt_stats(cache: str | Path | Cache, batch_rows: int = 1024) -> tuple[np.ndarray, float]:
    """One pass over a prompt cache, in either form, for what a run against it needs:

    - each prompt slot's mean over the rows, [N, D] float32 (``train.prompt_head`` outputs
      deviations from it; its mean over the slots is what ``center_text`` subtracts);
    - the prompts' spread: the root mean square, over every element, of each prompt slot's
      deviation from that slot's mean (the scale a regression onto these prompts must
      resolve; ``train.prompt_head`` outputs in its units).

    Sums and sums of squares per slot in float64, so memory stays one batch and one [N, D]."""
    total = squares = None
    count = 0
    for _, prompts in iter_prompts(cache, batch_rows):
        p = prompts.astype(np.float64)
        s, q = p.sum(axis=0), (p * p).sum(axis=0)
        total, squares = (s, q) if total is None else (total + s, squares + q)
        count += len(p)
    if total is None:
        raise CacheError(f"{cache} holds no rows")
    slot_mean = total / count  # [N, D]; every slot has `count` rows, so their mean is the mean
    variance = np.maximum(squares / count - slot_mean**2, 0.0)
    return slot_mean.astype(np.float32), float(np.sqrt(variance.mean()))
