"""Retrieval and zero-shot metrics: pure functions of features, checked against brute force.

Ranks follow a stable descending sort: a candidate is ranked before the correct one when its
score is higher, or equal with a lower index. Ties therefore never flatter a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _rank_of(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """For each row of ``scores`` [Q, C] and its correct candidate index, the 0-based rank."""
    s = scores[np.arange(len(scores)), correct][:, None]
    idx = np.arange(scores.shape[1])[None, :]
    before = (scores > s) | ((scores == s) & (idx < correct[:, None]))
    return before.sum(axis=1)


def retrieval_recall(
    image_features: np.ndarray,
    text_features: np.ndarray,
    text_image: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image→text and text→image recall@K with several captions per image (COCO style).

    image_features [I, D] and text_features [T, D] are unit vectors; text_image[t] is the
    index of caption t's image. Image→text: an image scores a hit at K when any of its own
    captions ranks within the first K of all T captions. Text→image: a caption's image ranks
    within the first K of all I images.
    """
    text_image = np.asarray(text_image)
    sim = image_features @ text_features.T  # [I, T]
    # image -> text: the best rank among the image's own captions
    per_text = _rank_of(sim[text_image], np.arange(len(text_image)))  # caption t in its image's row
    best = np.full(len(image_features), np.iinfo(np.int64).max)
    np.minimum.at(best, text_image, per_text)
    t2i = _rank_of(sim.T, text_image)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float((best < k).mean())
        out[f"t2i_R@{k}"] = float((t2i < k).mean())
    return out


def zero_shot_accuracy(
    image_features: np.ndarray,
    class_features: np.ndarray,
    labels: Sequence[int],
    ks: Sequence[int] = (1, 5),
) -> dict[str, object]:
    """Top-K accuracy and per-class top-1 accuracy of nearest-class-prompt classification."""
    labels = np.asarray(labels)
    rank = _rank_of(image_features @ class_features.T, labels)
    out: dict[str, object] = {
        f"top{k}": float((rank < k).mean()) for k in ks if k <= class_features.shape[0]
    }
    out["per_class_top1"] = {
        int(c): float((rank[labels == c] == 0).mean()) for c in np.unique(labels)
    }
    return out
