"""Speed benchmarks, run by ``make bench`` (``python -m tests.bench [--quick] [--only NAME]``).

A benchmark is a module with ``run(quick: bool) -> Report`` (or a list of them, printed in
order); adding one is one line in
``BENCHMARKS``. Benchmarks report against their targets (PASS / MISS); they never fail the
build, because timings on a shared machine are evidence, not a verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# name -> module; each module defines ``run(quick: bool) -> Report``. Imported only when run.
BENCHMARKS: dict[str, str] = {
    "embed": "tests.bench.embed_bench",  # stage one: facet packing vs K separate sequences
    "reader": "tests.bench.reader_bench",  # the cache read into float32 batches vs .npy files
    "train": "tests.bench.train_bench",  # a step with cached vectors vs the LM online; decode rate
    "precision": "tests.bench.precision_bench",  # the demo's step: float32 vs channels-last vs bf16
    "optimizer": "tests.bench.optimizer_bench",  # the demo's step: per-tensor AdamW vs fused
    "heads": "tests.bench.heads_bench",  # heads only from two caches vs the demo's end-to-end step
    "tune": "tests.bench.tune_bench",  # CC tuning's caption-retrieval accuracy, base vs tuned
    "verify": "tests.bench.verify_bench",  # verify on a big cache vs sha256 + a plain read
    "memory": "tests.bench.memory_bench",  # peak memory of train's process tree, 1 and 2 at once
    "vllm": "tests.bench.vllm_bench",  # stage one on CPU: hf engine vs vLLM, cold and warm cache
}


@dataclass(frozen=True)
class Target:
    """A number a benchmark should reach, e.g. ``Target("speedup / ideal", 0.93, 0.8)``."""

    name: str
    value: float
    threshold: float
    higher_is_better: bool = True
    digits: int = 3  # decimals printed

    @property
    def met(self) -> bool:
        return (
            self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold
        )

    def line(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        verdict = "PASS" if self.met else "MISS"
        return f"[{verdict}] {self.name}: {self.value:.{self.digits}f} (target {op} {self.threshold:g})"


@dataclass
class Report:
    """What a benchmark prints: a title, a table (header row first), targets and notes."""

    title: str
    table: list[list[str]]
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        widths = [max(len(row[i]) for row in self.table) for i in range(len(self.table[0]))]
        lines = [f"== {self.title}"]
        for row in self.table:
            cells = [row[0].ljust(widths[0])] + [
                c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
            ]
            lines.append("  " + "  ".join(cells).rstrip())
        lines += [f"  {n}" for n in self.notes]
        lines += [f"  {t.line()}" for t in self.targets]
        if self.targets:
            n_met = sum(t.met for t in self.targets)
            verdict = "met" if n_met == len(self.targets) else "missed"
            lines.append(f"  target {verdict} ({n_met} of {len(self.targets)} PASS)")
        return "\n".join(lines)
