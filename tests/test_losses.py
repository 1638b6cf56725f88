"""Losses against hand-written loop references, facet selection, and global negatives across two
DDP workers against one process on the concatenated batch."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from store.errors import InputError
from train.losses import (
    LOSSES,
    clip_loss,
    compute_loss,
    mean_facet,
    mp_sigmoid_loss,
    sample_facets,
    select_facets,
    siglip_loss,
    validate_loss_config,
)

SCALE, BIAS = 7.5, -3.0


def _unit(rng, *shape):
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _neg_log_sigmoid(z: float) -> float:
    return math.log1p(math.exp(-z))  # −log σ(z), fine for the |z| < 15 used here


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_mp_sigmoid_matches_loop_reference():
    rng = np.random.default_rng(0)
    n, s, d = 3, 2, 4
    img, txt = _unit(rng, n, d), _unit(rng, n, s, d)
    total = 0.0
    for i in range(n):  # image
        for j in range(n):  # caption
            for k in range(s):  # facet of caption j
                z = SCALE * sum(img[i, c] * txt[j, k, c] for c in range(d)) + BIAS
                total += _neg_log_sigmoid(z if i == j else -z)
    ref = total / (n * s)
    got = mp_sigmoid_loss(_t(img), _t(txt), _t(SCALE), _t(BIAS))["loss"]
    assert got.item() == pytest.approx(ref, rel=1e-12)


def test_clip_matches_loop_reference():
    rng = np.random.default_rng(1)
    n, d = 4, 3
    img, txt = _unit(rng, n, d), _unit(rng, n, d)
    logit = [[SCALE * float(np.dot(img[i], txt[j])) for j in range(n)] for i in range(n)]
    i2t = sum(
        math.log(sum(math.exp(logit[i][j]) for j in range(n))) - logit[i][i] for i in range(n)
    )
    t2i = sum(
        math.log(sum(math.exp(logit[i][j]) for i in range(n))) - logit[j][j] for j in range(n)
    )
    got = clip_loss(_t(img), _t(txt), _t(SCALE))
    assert got["loss_i2t"].item() == pytest.approx(i2t / n, rel=1e-12)
    assert got["loss_t2i"].item() == pytest.approx(t2i / n, rel=1e-12)
    assert got["loss"].item() == pytest.approx((i2t + t2i) / (2 * n), rel=1e-12)


def test_siglip_matches_loop_reference_and_mp_sigmoid_with_one_facet():
    rng = np.random.default_rng(2)
    n, d = 4, 3
    img, txt = _unit(rng, n, d), _unit(rng, n, d)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = SCALE * float(np.dot(img[i], txt[j])) + BIAS
            total += _neg_log_sigmoid(z if i == j else -z)
    got = siglip_loss(_t(img), _t(txt), _t(SCALE), _t(BIAS))["loss"]
    assert got.item() == pytest.approx(total / n, rel=1e-12)
    one = mp_sigmoid_loss(_t(img), _t(txt)[:, None], _t(SCALE), _t(BIAS))["loss"]
    assert one.item() == pytest.approx(total / n, rel=1e-12)


def test_sigmoid_losses_are_finite_at_extreme_logits():
    img = F.normalize(torch.randn(4, 8), dim=-1)
    txt = -img[:, None].repeat(1, 2, 1)  # positives anti-aligned: logit −100 − 10
    loss = mp_sigmoid_loss(img, txt, torch.tensor(100.0), torch.tensor(-10.0))["loss"]
    assert torch.isfinite(loss) and loss.item() > 100


def test_sample_facets_draws_distinct_facets_of_each_row():
    n, k, d = 5, 7, 3
    vectors = torch.arange(n * k, dtype=torch.float32)[:, None].repeat(1, d).reshape(n, k, d)
    got = sample_facets(vectors, 4, torch.Generator().manual_seed(0))
    assert got.shape == (n, 4, d)
    for i in range(n):
        ids = got[i, :, 0].long().tolist()
        assert len(set(ids)) == 4 and all(i * k <= x < (i + 1) * k for x in ids)
    again = sample_facets(vectors, 4, torch.Generator().manual_seed(0))
    assert torch.equal(got, again)  # the generator alone decides the draw
    seen = set()
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        seen.update(sample_facets(vectors, 1, gen)[0, :, 0].long().tolist())
    assert seen == set(range(k))  # every facet gets its turn


def test_select_facets_shapes_and_mean():
    v = torch.randn(3, 5, 4)
    assert select_facets(v, "mp-sigmoid", "sample", 2).shape == (3, 2, 4)
    assert select_facets(v, "clip", "sample", 6).shape == (3, 4)
    torch.testing.assert_close(select_facets(v, "siglip", "mean"), v.mean(dim=1))
    torch.testing.assert_close(mean_facet(v), v.mean(dim=1))


def test_validate_loss_config():
    validate_loss_config("mp-sigmoid", 6, 11)
    validate_loss_config("clip", 6, 1, "mean")  # S only matters to mp-sigmoid
    with pytest.raises(InputError, match="holds 7"):
        validate_loss_config("mp-sigmoid", 8, 7)
    with pytest.raises(InputError, match="siglip"):
        validate_loss_config("mp-sigmoid", 1, 7, "mean")
    with pytest.raises(InputError, match="'mp-sigmoid'"):
        validate_loss_config("mp_sigmoid", 6, 11)
    with pytest.raises(InputError, match="facet_mode"):
        validate_loss_config("clip", 1, 1, "first")


def test_compute_loss_in_one_process_is_the_plain_loss():
    img, txt = F.normalize(torch.randn(4, 3), dim=-1), F.normalize(torch.randn(4, 2, 3), dim=-1)
    s, b = torch.tensor(10.0), torch.tensor(-10.0)
    got = compute_loss("mp-sigmoid", img, txt, s, b)["loss"]
    torch.testing.assert_close(got, mp_sigmoid_loss(img, txt, s, b)["loss"])


# --- two workers ------------------------------------------------------------------------------

WORLD, N_GLOBAL, S = 2, 6, 3


class _TinyPair(nn.Module):
    """A shared-weight linear 'tower' per side, shaped like FacetCLIP.forward's output."""

    def __init__(self, loss: str):
        super().__init__()
        self.img = nn.Linear(6, 4)
        self.txt = nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = None if loss == "clip" else nn.Parameter(torch.tensor(-2.0))

    def forward(self, images, texts):
        return {
            "image_features": F.normalize(self.img(images), dim=-1),
            "text_features": F.normalize(self.txt(texts), dim=-1),
            "logit_scale": self.logit_scale.exp(),
            "logit_bias": self.logit_bias,
        }


def _setup(loss: str):
    torch.manual_seed(0)  # the same weights and global batch in every process
    model = _TinyPair(loss).double()
    images = torch.randn(N_GLOBAL, 6, dtype=torch.float64)
    texts = torch.randn(N_GLOBAL, S, 5, dtype=torch.float64)
    return model, images, texts if loss == "mp-sigmoid" else texts[:, 0]


def _step(model, images, texts, loss):
    out = compute_loss(loss, **model(images, texts))
    out["loss"].backward()
    return out["loss"].item()


def _ddp_worker(rank: int, port: int, out_dir: str):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        results = {}
        # "uneven": rank 0 holds 4 rows, rank 1 holds 2 (a batch that lost undecodable images)
        splits = {"even": [0, 3, 6], "uneven": [0, 4, 6]}
        for loss in LOSSES:
            for split, bounds in splits.items():
                model, images, texts = _setup(loss)
                mine = slice(bounds[rank], bounds[rank + 1])
                value = _step(DDP(model), images[mine], texts[mine], loss)
                grads = {k: p.grad.clone() for k, p in model.named_parameters()}
                results[(loss, split)] = {"loss": value, "grads": grads}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    os._exit(0)  # saved: skip interpreter teardown, where gloo workers can abort (test_tune)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_equal_one_process_on_the_concatenated_batch(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for loss in LOSSES:
        model, images, texts = _setup(loss)
        ref_loss = _step(model, images, texts, loss)
        for split in ("even", "uneven"):
            for r in ranks:
                assert r[(loss, split)]["loss"] == pytest.approx(ref_loss, abs=1e-10), (loss, split)
                for name, p in model.named_parameters():
                    got = r[(loss, split)]["grads"][name]
                    torch.testing.assert_close(got, p.grad, atol=1e-10, rtol=0)
