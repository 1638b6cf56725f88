"""Retrieval and zero-shot metrics against brute force written with plain loops."""

from __future__ import annotations

import numpy as np
import pytest

from eval.evaluation import chance_any_in_top_k
from eval.metrics import retrieval_recall, zero_shot_accuracy


def brute_force(images, texts, text_image, k):
    """Stable descending sort, one query at a time."""
    sim = images @ texts.T
    i2t = []
    for i in range(len(images)):
        order = sorted(range(len(texts)), key=lambda t: (-sim[i, t], t))[:k]
        i2t.append(any(text_image[t] == i for t in order))
    t2i = []
    for t in range(len(texts)):
        order = sorted(range(len(images)), key=lambda i: (-sim[i, t], i))[:k]
        t2i.append(text_image[t] in order)
    return float(np.mean(i2t)), float(np.mean(t2i))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_equals_brute_force_with_ties_and_several_captions(seed):
    rng = np.random.default_rng(seed)
    n_img, per = 12, 3
    # Features rounded to one decimal make many exact ties in the similarity matrix.
    images = np.round(rng.standard_normal((n_img, 4)), 1)
    text_image = np.repeat(np.arange(n_img), per)
    rng.shuffle(text_image)
    texts = np.round(images[text_image] + rng.standard_normal((len(text_image), 4)), 1)
    texts[::5] = texts[0]  # identical captions tie exactly
    got = retrieval_recall(images, texts, text_image, ks=(1, 2, 5, 10))
    for k in (1, 2, 5, 10):
        i2t, t2i = brute_force(images, texts, text_image, k)
        assert got[f"i2t_R@{k}"] == pytest.approx(i2t)
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i)


def test_ties_never_flatter():
    images = np.ones((3, 2))
    texts = np.ones((3, 2))  # every score equal: only the stable order decides
    r = retrieval_recall(images, texts, [0, 1, 2], ks=(1,))
    assert r["i2t_R@1"] == pytest.approx(1 / 3) and r["t2i_R@1"] == pytest.approx(1 / 3)


def test_zero_shot_by_hand():
    classes = np.array([[1.0, 0.0], [0.0, 1.0], [0.7071, 0.7071]])
    images = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.8], [1.0, 0.0]])
    labels = [0, 2, 1, 1]
    # nearest classes: image0 -> 0 (right), image1 -> 1 then 2 (wrong at top-1, right at top-2),
    # image2 -> 2 then 1 (wrong, then right), image3 -> 0 then 2 then 1 (wrong, wrong)
    m = zero_shot_accuracy(images, classes, labels, ks=(1, 2))
    assert m["top1"] == pytest.approx(1 / 4)
    assert m["top2"] == pytest.approx(3 / 4)
    assert m["per_class_top1"] == {0: 1.0, 1: 0.0, 2: 0.0}


def test_chance_levels():
    assert chance_any_in_top_k(100, 1, 1) == pytest.approx(0.01)
    assert chance_any_in_top_k(100, 1, 10) == pytest.approx(0.10)
    # 5 captions per image among 500: any of 5 in a random top 1 is 1 %
    assert chance_any_in_top_k(500, 5, 1) == pytest.approx(0.01)
    assert chance_any_in_top_k(10, 10, 1) == 1.0
