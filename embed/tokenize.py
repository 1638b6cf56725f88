"""Token ids for every engine, built in one place: the tokenizer's own ids of the whole prompt.

The rule (README, "How stage one computes a facet embedding"): for every facet k,

    context + facet_k == [BOS] + tokenizer(prefix + caption + suffix + facet_k)

with ``add_special_tokens=False``, where ``caption`` is the cleaned caption, cut at a token
boundary when it has more than ``max_caption_tokens`` tokens. These are the ids the LLM saw in
training and the ids FLAME's code feeds it. Tokenising the pieces apart is not the same: a
byte-level BPE whose pre-tokenizer glues punctuation together (GPT-2, SmolLM2, Llama-3,
Tekken) makes one token of the caption's final ``.`` and the suffix's opening ``"``, which
piecewise ids split in two (measured on SmolLM2's tokenizer: every context of the FLAME
recipes differed).

How the ids are built, per prompt group:

- The context ``prefix + caption + suffix`` is tokenised as one string with offsets. The
  caption's span is every token holding at least one caption character (a token straddling a
  template boundary counts as the caption's); truncation cuts the caption text at the end of
  its ``max_caption_tokens``-th token and tokenises the whole string again.
- The context must end where every facet can begin without a merge across the boundary, so
  that one context serves all K facets (packing in the hf engine, the prefix cache in vLLM).
  ``split_suffix`` checks this once per recipe on the suffix's own tokens: if a facet's first
  token would merge with the suffix's last one, the suffix's unstable tail moves into every
  facet (``suffix = kept + tail``, facet_k's text becomes ``tail + facet_k``). The built-in
  recipes split cleanly (their suffix ends in ``,`` and every facet starts with a space), so
  nothing moves for them.

Engines receive these ids and never re-tokenise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from embed.packing import PromptIds
from embed.prompts import Recipe, clean_caption
from store.errors import InputError


@dataclass(frozen=True)
class EncodedCaption:
    """All prompt groups of one row: the items to embed and per-column token counts."""

    items: tuple[PromptIds, ...]
    caption_tokens: tuple[int, ...]  # per group, before truncation
    truncated: bool


def _tokenize(tokenizer, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) of each text, without special tokens; one batched call."""
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    return [
        (list(ids), [tuple(o) for o in offsets])
        for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]


def span_of(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """[first, last + 1) of the tokens holding a character of text[start:end]. An empty range
    gives an empty span where it lies: after the tokens that end at or before ``start``."""
    inside = [i for i, (s, e) in enumerate(offsets) if e > start and s < end and e > s]
    if inside and end > start:
        return inside[0], inside[-1] + 1
    before = sum(1 for _, e in offsets if e <= start)
    return before, before


def split_suffix(tokenizer, suffix: str, facets: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """(kept, facet texts): the longest start of ``suffix`` whose tokens are also the first
    tokens of ``suffix + facet_k`` for every k, and each facet prefixed by what is left.

    Then ``tok(kept + tail + f_k) == tok(kept) + tok(tail + f_k)``: a shared context ending
    with ``kept`` is the same for all facets and the concatenation is the tokenizer's own.
    """
    if not facets:
        return suffix, ()
    (whole_ids, whole_off), *per_facet = _tokenize(
        tokenizer, [suffix, *(suffix + f for f in facets)]
    )
    # Token boundaries of the suffix alone, latest first; 0 (an empty kept part) always works.
    cuts = [e for e in (off[1] for off in whole_off) if 0 < e <= len(suffix)]
    for cut in sorted(set(cuts), reverse=True):
        kept_ids = _tokenize(tokenizer, [suffix[:cut]])[0][0]
        if all(ids[: len(kept_ids)] == kept_ids for ids, _ in per_facet):
            tails = [suffix[cut:] + f for f in facets]
            tail_ids = [ids for ids, _ in _tokenize(tokenizer, tails)]
            if all(
                ids[len(kept_ids) :] == t for (ids, _), t in zip(per_facet, tail_ids, strict=True)
            ):
                return suffix[:cut], tuple(tails)
    return "", tuple(suffix + f for f in facets)


@dataclass(frozen=True)
class _Group:
    prefix: str
    suffix: str  # the part of the recipe's suffix that stays in the shared context
    facets: tuple[tuple[int, ...], ...]  # ids of (suffix tail +) each facet


class PromptTokenizer:
    """Turns caption texts into ``PromptIds`` for a recipe, with one tokenizer call per group
    (plus one per truncated caption)."""

    def __init__(self, tokenizer, recipe: Recipe):
        if not getattr(tokenizer, "is_fast", False):
            raise InputError(
                f"the model's tokenizer ({type(tokenizer).__name__}) gives no character offsets; "
                "facetclip needs a fast tokenizer (a tokenizer.json next to the model)"
            )
        self.tokenizer = tokenizer
        self.recipe = recipe
        # Models without a BOS token (e.g. Qwen) start directly with the prefix.
        self.bos: tuple[int, ...] = (
            () if tokenizer.bos_token_id is None else (tokenizer.bos_token_id,)
        )
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self._groups = []
        for g in recipe.groups:
            facets: tuple[tuple[int, ...], ...] = ()
            suffix = g.suffix
            if recipe.pooling == "last":
                suffix, texts = split_suffix(tokenizer, g.suffix, list(g.facets.values()))
                facets = tuple(tuple(ids) for ids, _ in _tokenize(tokenizer, texts))
            self._groups.append(_Group(g.prefix, suffix, facets))

    def _context(self, group: _Group, caption: str) -> tuple[PromptIds, int]:
        """(ids of one context, the caption's token count before truncation)."""
        limit = self.recipe.max_caption_tokens
        start = len(group.prefix)
        ((ids, offsets),) = _tokenize(self.tokenizer, [group.prefix + caption + group.suffix])
        first, last = span_of(offsets, start, start + len(caption))
        n_tokens = last - first
        while last - first > limit:
            # Cut the caption after its limit-th token and tokenise the whole string again
            # (the cut can change how the caption's new end merges with the suffix).
            cut = offsets[first + limit - 1][1] - start
            caption = caption[: max(0, min(cut, len(caption) - 1))]
            ((ids, offsets),) = _tokenize(self.tokenizer, [group.prefix + caption + group.suffix])
            first, last = span_of(offsets, start, start + len(caption))
        bos = len(self.bos)
        return PromptIds(self.bos + tuple(ids), group.facets, (bos + first, bos + last)), n_tokens

    def encode(self, rows: Sequence[Sequence[str]]) -> list[EncodedCaption]:
        """``rows[i][g]`` is row i's caption text for group g (already non-empty)."""
        limit = self.recipe.max_caption_tokens
        per_group = []
        for g, group in enumerate(self._groups):
            captions = [clean_caption(r[g], self.recipe.cleanup) for r in rows]
            start = len(group.prefix)
            encoded = []
            whole = _tokenize(self.tokenizer, [group.prefix + c + group.suffix for c in captions])
            for caption, (ids, offsets) in zip(captions, whole, strict=True):
                first, last = span_of(offsets, start, start + len(caption))
                if last - first > limit:  # rare: truncation tokenises again
                    encoded.append(self._context(group, caption))
                    continue
                bos = len(self.bos)
                span = (bos + first, bos + last)
                encoded.append((PromptIds(self.bos + tuple(ids), group.facets, span), last - first))
            per_group.append(encoded)
        out = []
        for i in range(len(rows)):
            items = tuple(per_group[g][i][0] for g in range(len(self._groups)))
            counts = tuple(per_group[g][i][1] for g in range(len(self._groups)))
            out.append(EncodedCaption(items, counts, any(c > limit for c in counts)))
        return out
