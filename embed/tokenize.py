"""Token ids for every engine, built in one place.

``BOS + tokens(prefix) + tokens(caption)[:max_caption_tokens] + tokens(suffix)`` is the
context; each facet is tokenised on its own. The pieces are tokenised separately (not as one
string) so that (a) the context ids are byte-identical for all K facets of a caption, which
packing and vLLM's prefix cache both rely on, (b) truncation cuts caption tokens only, and
(c) mean pooling knows exactly which positions are the caption's own tokens.
Engines receive these ids and never re-tokenise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from embed.packing import PromptIds
from embed.prompts import Recipe, clean_caption


@dataclass(frozen=True)
class EncodedCaption:
    """All prompt groups of one row: the items to embed and per-column token counts."""

    items: tuple[PromptIds, ...]
    caption_tokens: tuple[int, ...]  # per group, before truncation
    truncated: bool


class PromptTokenizer:
    """Turns caption texts into ``PromptIds`` for a recipe, with one tokenizer call per group."""

    def __init__(self, tokenizer, recipe: Recipe):
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
            facets = (
                tuple(self._ids(t) for t in g.facets.values()) if recipe.pooling == "last" else ()
            )
            self._groups.append((self._ids(g.prefix), self._ids(g.suffix), facets))

    def _ids(self, text: str) -> tuple[int, ...]:
        if not text:
            return ()
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _batch_ids(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def encode(self, rows: Sequence[Sequence[str]]) -> list[EncodedCaption]:
        """``rows[i][g]`` is row i's caption text for group g (already non-empty)."""
        per_group = []
        limit = self.recipe.max_caption_tokens
        for g, (prefix, suffix, facets) in enumerate(self._groups):
            texts = [clean_caption(r[g], self.recipe.cleanup) for r in rows]
            encoded = []
            for ids in self._batch_ids(texts):
                start = len(self.bos) + len(prefix)
                kept = tuple(ids[:limit])  # truncation keeps the beginning
                context = self.bos + prefix + kept + suffix
                encoded.append((PromptIds(context, facets, (start, start + len(kept))), len(ids)))
            per_group.append(encoded)
        out = []
        for i in range(len(rows)):
            items = tuple(per_group[g][i][0] for g in range(len(self._groups)))
            counts = tuple(per_group[g][i][1] for g in range(len(self._groups)))
            out.append(EncodedCaption(items, counts, any(c > limit for c in counts)))
        return out
