"""The precision benchmark in its quick form: it runs, and its three arithmetics compute the
same loss from the same weights and data (channels-last is a layout, not other math; bf16
within its rounding), so its speed comparison compares like with like. No timing is asserted."""

from __future__ import annotations

from tests.bench.precision_bench import MODES, run


def test_precision_bench_quick():
    rep = run(quick=True)
    header, *rows = rep.table
    assert header[1:] == list(MODES)
    first = {row[0]: [float(v) for v in row[1:]] for row in rows}["first loss"]
    f32, cl, bf16 = first
    assert abs(cl - f32) <= 1e-4 * abs(f32)
    assert abs(bf16 - f32) <= 0.02 * abs(f32)
    names = [t.name for t in rep.targets]
    assert names[0] == "channels-last speed / float32"
    assert len(names) in (1, 2)  # the bf16 target only where the CPU computes bf16
    assert "PASS" in rep.format() or "MISS" in rep.format()
