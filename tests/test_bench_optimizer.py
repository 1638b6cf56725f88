"""The optimizer benchmark in its quick form: it runs, and both optimizers start from the same
weights and data and end at the same loss (bf16 rounding apart), so its speed comparison
compares like with like. No timing is asserted."""

from __future__ import annotations

from tests.bench.optimizer_bench import MODES, run


def test_optimizer_bench_quick():
    rep = run(quick=True)
    header, *rows = rep.table
    assert header[1:] == list(MODES)
    loss = {row[0]: [float(v) for v in row[1:]] for row in rows}["loss after the last step"]
    per_tensor, fused = loss
    assert abs(fused - per_tensor) <= 0.02 * abs(per_tensor)
    assert [t.name for t in rep.targets] == ["fused step speed / per-tensor"]
    assert "PASS" in rep.format() or "MISS" in rep.format()
