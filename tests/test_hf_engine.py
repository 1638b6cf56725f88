"""The hf engine against the definition: a plain transformers forward pass of each standalone
sequence ``BOS + prefix + caption + suffix + facet_k`` (DESIGN.md), whose ids are the
tokenizer's own ids of that whole string (README, "How stage one computes a facet
embedding"), built here independently of embed.tokenize."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from embed.engine import EngineConfig
from embed.hf_engine import HFEngine
from embed.prompts import BUILTIN_RECIPES, clean_caption
from embed.tokenize import PromptTokenizer


@pytest.fixture(scope="module")
def captions(synth_data):
    t = pq.read_table(synth_data / "captions.parquet").slice(0, 50).to_pylist()
    # Mixed lengths: alt-text, one sentence, 3-6 sentences, and a few very long ones.
    for i in range(0, 50, 10):
        t[i]["long_caption"] = " ".join([t[i]["long_caption"]] * 3)
    return t


@pytest.fixture(scope="module")
def reference(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model)


def prompt_ids(
    tok, prefix: str, caption: str, suffix: str, limit: int
) -> tuple[list[int], list[int]]:
    """(ids of ``prefix + caption + suffix`` with BOS, positions of the caption's tokens); a
    caption of more than ``limit`` tokens is cut after its limit-th token, then tokenised
    again with its prompt."""
    enc = tok(prefix + caption + suffix, add_special_tokens=False, return_offsets_mapping=True)
    start, end = len(prefix), len(prefix) + len(caption)
    inside = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > start and s < end]
    if len(inside) > limit:
        cut = enc["offset_mapping"][inside[limit - 1]][1] - start
        return prompt_ids(tok, prefix, caption[: min(cut, len(caption) - 1)], suffix, limit)
    return [tok.bos_token_id] + enc["input_ids"], [1 + i for i in inside]


def reference_vectors(reference, recipe, rows, layer):
    """One forward pass per standalone sequence; the chosen layer after the final norm."""
    model, tok = reference
    n_layers = model.config.num_hidden_layers
    out = []
    for row in rows:
        for g in recipe.groups:
            caption = clean_caption(row[g.column], recipe.cleanup)
            limit = recipe.max_caption_tokens
            if recipe.pooling == "last":
                seqs = [prompt_ids(tok, g.prefix, caption, g.suffix + f, limit)[0]
                        for f in g.facets.values()]  # fmt: skip
            else:
                seq, positions = prompt_ids(tok, g.prefix, caption, g.suffix, limit)
                seqs = [seq]
            for seq in seqs:
                with torch.no_grad():
                    hs = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
                    h = hs[layer] if layer != -1 else hs[-1]
                    if layer not in (-1, n_layers):  # hidden_states[-1] is already normed
                        h = model.model.norm(h)
                h = h[0]
                if recipe.pooling == "last":
                    out.append(h[-1].numpy())
                else:
                    out.append(h[positions].mean(0).numpy())
    return np.stack(out)


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize(
    "recipe_name,layer",
    [
        ("flame", -1),
        ("flame", 2),
        ("flame-long", -1),
        ("flame-long", 3),
        ("llm2clip", -1),
        ("llm2clip", 2),
    ],
)
def test_engine_equals_standalone_forward(tiny_model, reference, captions, recipe_name, layer):
    recipe = BUILTIN_RECIPES[recipe_name]
    engine = HFEngine(
        EngineConfig(str(tiny_model), pooling=recipe.pooling, layer=layer, token_budget=4096)
    )
    tok = PromptTokenizer(reference[1], recipe)
    encoded = tok.encode([[row[g.column] for g in recipe.groups] for row in captions])
    got = engine.embed([it for e in encoded for it in e.items])
    want = reference_vectors(reference, recipe, captions, layer)
    assert got.shape == (len(captions) * len(recipe.vector_names), engine.hidden_size)
    assert cosine(got, want).min() >= 0.99999
    # several captions shared forward passes, with little padding
    assert engine.computed_tokens > engine.real_tokens * 0.99


def test_vectors_do_not_depend_on_batch_mates(tiny_model, reference, captions):
    recipe = BUILTIN_RECIPES["flame-long"]
    tok = PromptTokenizer(reference[1], recipe)
    engine = HFEngine(EngineConfig(str(tiny_model), token_budget=1 << 20))
    target = tok.encode([[captions[3]["long_caption"]]])[0].items[0]
    alone = engine.embed([target])
    others = [
        e.items[0] for e in tok.encode([["star."], [captions[0]["long_caption"] * 4], ["a " * 300]])
    ]
    together = engine.embed([others[0], target, others[1], others[2]])
    k = len(recipe.vector_names)
    assert np.abs(together[k : 2 * k] - alone).max() <= 1e-5


def test_truncation_keeps_the_beginning_and_is_flagged(reference):
    from dataclasses import replace

    recipe = replace(BUILTIN_RECIPES["flame-long"], max_caption_tokens=8)
    tok = PromptTokenizer(reference[1], recipe)
    long_text = "a red star above a small blue circle on a calm grey background"
    enc = tok.encode([[long_text], ["star."]])
    assert enc[0].truncated and not enc[1].truncated
    item = enc[0].items[0]
    s, e = item.caption_span
    full = reference[1](clean_caption(long_text), add_special_tokens=False)["input_ids"]
    assert list(item.context[s:e]) == full[:8]
    assert enc[0].caption_tokens[0] == len(full)
