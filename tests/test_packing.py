"""The packing math, checked against masks and positions written out by hand."""

import torch

from embed.packing import (
    PromptIds,
    caption_mean_weights,
    facet_allowed,
    last_token_index,
    pack_batch,
    token_budget_batches,
)


def test_mask_and_positions_by_hand():
    # context of 3 tokens, facets of 2 and 1 tokens; a second, shorter item is padded.
    a = PromptIds(context=(1, 10, 11), facets=((20, 21), (30,)), caption_span=(1, 2))
    b = PromptIds(context=(1, 12), facets=((40,),), caption_span=(1, 2))
    packed = pack_batch([a, b], pad_id=0)
    assert packed["input_ids"].tolist() == [[1, 10, 11, 20, 21, 30], [1, 12, 40, 0, 0, 0]]
    assert packed["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 1, -1, -1, -1]]
    # positions restart after the context for every facet
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 0, 0, 0]]

    allowed = facet_allowed(packed["segment_ids"]).int().tolist()
    assert allowed[0] == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],  # facet 1 sees the context and itself
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 1],  # facet 2 never sees facet 1
    ]
    assert allowed[1] == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],  # padding rows see only themselves (no NaN), and
        [0, 0, 0, 0, 1, 0],  # no real token ever sees a padding key
        [0, 0, 0, 0, 0, 1],
    ]
    rows, cols = last_token_index([a, b])
    assert rows.tolist() == [0, 0, 1] and cols.tolist() == [4, 5, 2]


def test_mean_weights_cover_caption_only():
    a = PromptIds(context=(1, 5, 6, 7, 9), facets=(), caption_span=(1, 4))
    w = caption_mean_weights([a], 6)
    assert torch.allclose(w, torch.tensor([[0, 1 / 3, 1 / 3, 1 / 3, 0, 0]]))


def test_token_budget_batches_respect_budget_and_cover_all():
    lengths = [5, 50, 7, 300, 48, 6, 51, 1000]
    batches = token_budget_batches(lengths, token_budget=120)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) == 1 or longest * len(b) <= 120
    # similar lengths end up together (length bucketing)
    assert any(set(b) == {0, 2, 5} for b in batches)
