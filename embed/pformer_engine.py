"""`facetclip embed --recipe pformer --model PF`: a P-Former predictor as a stage-one engine.

The embed pipeline stays as it is (shards by input range, resumable, Ray actors): for the
``pformer`` and ``pformer-code`` recipes, the "model" is a predictor made by
``facetclip pformer``, the tokenizer is the predictor's encoder tokenizer, and this engine
answers the one engine call, ``embed(items) -> [sum n_vectors, D]``:

- ``pformer``: N rows per item (its N prompt vectors, prompt order), D = the LLM's width;
- ``pformer-code``: one row per item (the pooled code), D = the encoder's width d; the head
  that expands codes into prompts is written once into the cache (store.prompts).

Every item's caption ids are the caption span of its context (``PromptTokenizer`` with no
prefix or suffix), so the engine sees exactly the ids ``facetclip pformer`` trained on
(``embed.pformer_model.caption_token_ids``). Items are encoded in fixed-size chunks in input
order with padding masked, so a rerun computes the same vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from embed.engine import EngineConfig, ModelInfo
from embed.packing import PromptIds
from embed.prompts import Recipe
from store.errors import InputError

BATCH = 256  # captions per encoder pass


def pformer_recipe(recipe: Recipe, model: str) -> tuple[Recipe, ModelInfo]:
    """``recipe`` completed from the predictor at ``model`` (its fingerprint, N, clean-up and
    truncation: the predictor's own, whatever the recipe said) and the stored vectors' shape."""
    from embed.pformer_model import PredictorConfig, predictor_dir, predictor_fingerprint
    from embed.pformer_model import predictor_info as read_info

    path = predictor_dir(model)
    info = read_info(path)
    cfg = PredictorConfig.from_dict(info["config"])
    recipe = replace(
        recipe,
        model=str(path.resolve()) if Path(model).expanduser().exists() else model,
        model_fingerprint=predictor_fingerprint(path),
        prompts=cfg.n_prompts,
        cleanup=cfg.cleanup,
        max_caption_tokens=cfg.max_caption_tokens,
    )
    dim = cfg.llm_width if recipe.pooling == "pformer" else cfg.width
    return recipe, ModelInfo(path, dim, cfg.layers, "pformer")


def write_cache_head(cache, recipe: Recipe, model_path: Path) -> None:
    """A ``pformer-code`` cache keeps the head that expands its codes (once, on creation)."""
    if recipe.pooling != "pformer-code":
        return
    from embed.pformer_model import load_predictor
    from store.prompts import write_head

    head = load_predictor(model_path).model.head_state()
    write_head(cache, {k: v.numpy() for k, v in head.items()})


class PFormerEngine:
    """The engine of the ``pformer`` recipes: caption ids -> prompt vectors (or codes)."""

    name = "pformer"

    def __init__(self, cfg: EngineConfig):
        import torch

        from embed.pformer_model import load_predictor

        if cfg.dtype != "float32" and not str(cfg.device).startswith("cuda"):
            cfg = replace(cfg, dtype="float32")
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cfg = cfg
        self.predictor = load_predictor(cfg.model, device=device)
        self.predictor.model.to(getattr(torch, cfg.dtype))
        self.form = cfg.pooling
        pcfg = self.predictor.cfg
        self.hidden_size = pcfg.llm_width if self.form == "pformer" else pcfg.width

    def embed(self, items: Sequence[PromptIds]) -> np.ndarray:
        import torch

        ids = [list(it.context[it.caption_span[0] : it.caption_span[1]]) for it in items]
        if not ids:
            return np.zeros((0, self.hidden_size), np.float32)
        model = self.predictor.model
        out = []
        with torch.no_grad():
            for s in range(0, len(ids), BATCH):
                enc, mask = model.encoder_batch(ids[s : s + BATCH])
                code = model.encode(enc, mask)
                vec = code if self.form == "pformer-code" else model.expand(code)
                out.append(vec.float().reshape(-1, self.hidden_size).cpu().numpy())
        return np.concatenate(out)

    def close(self) -> None:
        self.predictor = None


# --- sizes and cost (facetclip plan) ---------------------------------------------------------


def prompt_cache_bytes(n_prompts: int, llm_width: int, width: int, dtype: str = "float16") -> dict:
    """Bytes of the vectors of one row in each form, and of the compact form's head (once,
    float32): ``pformer`` N·D values, ``pformer-code`` d values."""
    from embed.plan import vector_bytes

    head = 4 * (width * n_prompts * width + n_prompts * width + width * width + width
                + width * llm_width + llm_width)  # fmt: skip
    return {
        f"pformer: {n_prompts} prompts x {llm_width}, {dtype}": n_prompts
        * vector_bytes(dtype, llm_width),
        f"pformer-code: code x {width}, {dtype}": vector_bytes(dtype, width),
        "pformer-code: head, float32, once per cache": head,
    }


def plan_pformer(cfg, recipe: Recipe, source):
    """``facetclip plan`` for a pformer recipe: tokens counted with the predictor's own
    tokenizer, FLOPs of its encoder (bidirectional: every caption token sees every other) and
    head, and the cache size of the chosen form; ``prompt_forms`` gives both forms per row."""
    from transformers import AutoTokenizer

    from embed.pformer_model import PredictorConfig
    from embed.pformer_model import predictor_info as read_info
    from embed.plan import (
        DTYPES,
        GPU_PEAK_BF16,
        Plan,
        _total_rows,
        cache_bytes,
        check_gpus,
        count_sample,
        forward_flops,
        gpu_hours,
    )
    from embed.tokenize import PromptTokenizer

    recipe, info = pformer_recipe(recipe, cfg.model)
    pcfg = PredictorConfig.from_dict(read_info(info.path)["config"])
    check_gpus(cfg.gpu, cfg.gpus, cfg.mfu)
    tokenizer = PromptTokenizer(AutoTokenizer.from_pretrained(info.path), recipe)
    sample, exhausted = count_sample(source, recipe, tokenizer, cfg.sample)
    if sample.rows == 0:
        raise InputError(f"{cfg.captions} has no rows")
    rows, rows_from = _total_rows(cfg, source, sample, exhausted)
    total = sample if rows == sample.rows else sample.scaled(rows / sample.rows)
    d, n = pcfg.width, pcfg.n_prompts
    if pcfg.encoder == "own":
        per_token = pcfg.layers * (4 * d * d + 2 * d * pcfg.ffn)  # q, k, v, o + the MLP
    else:  # an HF encoder: its parameters less the embeddings, as an estimate
        per_token = 12 * d * d * int(pcfg.encoder_config.get("num_hidden_layers", 12))
    head = d * n * d + n * d * d + (n * d * pcfg.llm_width if recipe.pooling == "pformer" else 0)
    # Bidirectional attention: twice the causal pairs count_sample reports, less the diagonal.
    pairs = 2 * total.packed_pairs - total.packed
    flops = (
        forward_flops(total.packed, pairs, per_token, pcfg.layers, d) + 2.0 * head * total.embedded
    )
    n_vec = len(recipe.vector_names)
    text = total.text_bytes if cfg.store_text else 0
    sizes = {
        dt: cache_bytes(dt, info.hidden_size, n_vec, total.embedded, total.key_bytes, text, 1)
        for dt in DTYPES
    }
    return Plan(
        captions=str(cfg.captions), model=cfg.model, recipe=recipe.name, rows=rows,
        rows_from=rows_from, sample=sample, total=total, vectors_per_row=n_vec,
        dim=info.hidden_size, layers_run=pcfg.layers, params_total=per_token + head,
        params_per_token=per_token, params_from="predictor.json", attention_width=d,
        flops=flops, flops_naive=flops, gpu=cfg.gpu, gpus=cfg.gpus, mfu=cfg.mfu,
        peak_flops=GPU_PEAK_BF16[cfg.gpu], gpu_hours=gpu_hours(flops, cfg.gpu, cfg.mfu),
        gpu_hours_naive=gpu_hours(flops, cfg.gpu, cfg.mfu), cache_bytes=sizes,
        prompt_forms=prompt_cache_bytes(n, pcfg.llm_width, d),
    )  # fmt: skip
