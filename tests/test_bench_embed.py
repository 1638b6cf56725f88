"""The stage-one benchmark in its smallest configuration: it runs, reports every figure the
issue asks for, and its two methods (packing, K separate sequences) give the same vectors,
so its speed comparison is apples to apples. No timing is asserted."""

from __future__ import annotations

import numpy as np

from tests.bench import Report
from tests.bench.embed_bench import EmbedBenchConfig, measure, report


def test_embed_bench_smallest(tiny_model):
    cfg = EmbedBenchConfig(
        n_captions=6, repeats=2, warmup_captions=2, token_budget=1024, model=str(tiny_model)
    )
    res = measure(cfg)

    k = res.n_facets
    assert k == 7  # flame-long
    assert res.packed_vectors.shape == res.naive_vectors.shape == (6 * k, res.hidden_size)
    assert res.min_cosine >= 0.9999
    assert np.allclose(res.packed_vectors, res.naive_vectors, atol=1e-4)

    p, n = res.packed, res.naive
    assert (p.n_rows, n.n_rows) == (6, 6 * k)
    assert len(p.seconds) == len(n.seconds) == 2
    # Packing computes the context once instead of K times, so the naive way computes more.
    assert n.real_tokens > p.real_tokens
    assert p.real_tokens <= p.computed_tokens and n.real_tokens <= n.computed_tokens
    assert res.ideal_ratio == n.computed_tokens / p.computed_tokens > 1
    assert 0 < p.padding_efficiency <= 1

    rep = report(res)
    assert isinstance(rep, Report)
    assert [t.name for t in rep.targets] == [
        "speedup / ideal ratio",
        "packed padding efficiency",
        "packed = naive vectors (min cosine)",
    ]
    text = rep.format()
    for needed in ("captions/s", "computed tokens", "real tokens", "speedup", "ideal ratio"):
        assert needed in text
    assert "PASS" in text or "MISS" in text
