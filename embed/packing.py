"""Pure functions for facet-decoupled packing: segment ids, position ids, attention masks.

One *item* is one prompt group of one caption: a shared context ``BOS + prefix + caption +
suffix`` followed by K facet prompts. Packed into one row of length L = C + sum(f_k):

    tokens    [ BOS prefix caption suffix | facet_1 | facet_2 | ... | facet_K | pad ... ]
    segment     0   0 ...            0    |  1 ...  |  2 ...  |     |  K ...  | -1 ...
    position    0   1 ...          C-1    |  C ...  |  C ...  |     |  C ...  |  0 ...

Query i may attend key j iff j <= i (causal), key j is real (segment != -1), and j is in the
context or in i's own facet. Positions restart at C for every facet. Together this makes the
hidden state at the last token of facet k equal to that of the standalone sequence
``context + facet_k`` (the definition in DESIGN.md), while the context is computed once.
Padding keys are never visible to a real query, so an item's vectors never depend on its
batch-mates (a defect of FLAME's public code).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

PAD_SEGMENT = -1


@dataclass(frozen=True)
class PromptIds:
    """Token ids of one prompt group for one caption, built once by our tokenizer code."""

    context: tuple[int, ...]  # BOS + prefix + caption + suffix
    facets: tuple[tuple[int, ...], ...]  # one id sequence per facet; empty for mean pooling
    caption_span: tuple[int, int]  # [start, end) of the caption's own tokens in `context`

    @property
    def packed_length(self) -> int:
        return len(self.context) + sum(len(f) for f in self.facets)

    @property
    def n_vectors(self) -> int:
        return max(1, len(self.facets))

    def standalone(self, k: int) -> list[int]:
        """The standalone sequence whose last hidden state defines facet k's embedding."""
        return list(self.context) + list(self.facets[k])


def pack_item(item: PromptIds) -> tuple[list[int], list[int], list[int]]:
    """ids, segment ids and position ids of one item, unpadded."""
    c = len(item.context)
    ids = list(item.context)
    seg = [0] * c
    pos = list(range(c))
    for k, f in enumerate(item.facets, start=1):
        ids += f
        seg += [k] * len(f)
        pos += range(c, c + len(f))  # restart after the context for every facet
    return ids, seg, pos


def pack_batch(items: Sequence[PromptIds], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``segment_ids``, ``position_ids`` of shape [B, L]."""
    packed = [pack_item(it) for it in items]
    length = max(len(p[0]) for p in packed)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    seg = torch.full((len(items), length), PAD_SEGMENT, dtype=torch.long)
    pos = torch.zeros((len(items), length), dtype=torch.long)
    for b, (i, s, p) in enumerate(packed):
        n = len(i)
        ids[b, :n] = torch.tensor(i)
        seg[b, :n] = torch.tensor(s)
        pos[b, :n] = torch.tensor(p)
    return {"input_ids": ids, "segment_ids": seg, "position_ids": pos}


def facet_allowed(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, L, L] mask, True where query i may attend key j (see module docstring).

    Padding queries attend only to themselves: their rows are discarded, but a row with no
    visible key would make softmax produce NaN.
    """
    length = segment_ids.shape[-1]
    idx = torch.arange(length, device=segment_ids.device)
    causal = idx[None, :] <= idx[:, None]  # [L, L]: key j <= query i
    q = segment_ids[:, :, None]
    k = segment_ids[:, None, :]
    allowed = causal & ((k == 0) | (k == q)) & (k != PAD_SEGMENT) & (q != PAD_SEGMENT)
    return allowed | torch.eye(length, dtype=torch.bool, device=segment_ids.device)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, L, L] additive mask (0 where allowed, the dtype's minimum elsewhere), the form
    every transformers attention implementation (eager and sdpa) accepts as a custom mask."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def last_token_index(items: Sequence[PromptIds]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) indices of every facet's last token, in item then facet order."""
    rows, cols = [], []
    for b, it in enumerate(items):
        end = len(it.context)
        for f in it.facets:
            end += len(f)
            rows.append(b)
            cols.append(end - 1)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


def caption_mean_weights(items: Sequence[PromptIds], length: int) -> torch.Tensor:
    """[B, L] weights that average each item's caption tokens (mean pooling, LLM2CLIP)."""
    w = torch.zeros((len(items), length))
    for b, it in enumerate(items):
        s, e = it.caption_span
        if e > s:
            w[b, s:e] = 1.0 / (e - s)
    return w


def token_budget_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group item indices into batches of similar length whose padded size
    (batch size x longest item) stays within ``token_budget``.

    Items are sorted by length (length bucketing), so padding is small; an item longer than
    the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if current and new_longest * (len(current) + 1) > token_budget:
            batches.append(current)
            current, new_longest = [], lengths[i]
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    return batches
