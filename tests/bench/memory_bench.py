"""Memory of `facetclip train`: the peak of its whole process tree (the CLI, Ray's own
processes, the training workers, Ray Data's task workers and the object store), one run alone
and two runs started together on this machine. A figure, not a verdict: the machine is shared.

Each run is the CLI in a subprocess; a sampler walks its process tree every 0.25 s and sums
two numbers over it: RSS (what `ps` shows; pages shared between processes, such as the object
store and the libraries, are counted once per process, so this overstates) and PSS (each
shared page divided among the processes mapping it, so the sum is the tree's real share of
the machine). Run directly on prepared inputs:

    python -m tests.bench.memory_bench --images D/images --cache CACHE --workdir W [--runs 2]

or through ``make bench`` (``run(quick)``: builds a 2000-sample synthetic set, an untrained
tiny LM and its flame-long cache first).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench import Report

ROOT = Path(__file__).resolve().parents[2]
# The demo's training run, shorter: resnet10t at 64 px, batch 64, 2 Ray workers.
TRAIN_ARGS = ["--steps", "40", "--batch-size", "64", "--workers", "2", "--tower", "resnet10t",
              "--set", "data.image_size=64", "--set", "run.log_every=10", "--no-progress"]  # fmt: skip


@dataclass
class TreeMemory:
    """Peaks over a process tree's life."""

    peak_rss: int = 0
    peak_pss: int = 0
    peak_processes: int = 0
    samples: int = 0
    series: list[tuple[float, int]] = field(default_factory=list)  # (seconds, pss)
    at_peak: list[tuple[str, int]] = field(default_factory=list)  # (process, pss) at peak PSS


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def sample_tree(pid: int, stop: threading.Event, out: TreeMemory, every: float = 0.25) -> None:
    import psutil

    t0 = time.monotonic()
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        rss = pss = 0
        each = []
        for p in procs:
            try:
                rss += p.memory_info().rss
                name = " ".join(p.cmdline()[:3])[-60:] or p.name()
            except psutil.Error:
                continue
            each.append((name, _pss(p.pid)))
            pss += each[-1][1]
        if pss > out.peak_pss:
            out.at_peak = sorted(each, key=lambda x: -x[1])
        out.peak_rss, out.peak_pss = max(out.peak_rss, rss), max(out.peak_pss, pss)
        out.peak_processes = max(out.peak_processes, len(procs))
        out.samples += 1
        out.series.append((time.monotonic() - t0, pss))
        stop.wait(every)


def available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class RunResult:
    out: Path
    rc: int
    seconds: float
    memory: TreeMemory
    stderr_tail: str


def run_trains(
    images: Path, cache: Path, workdir: Path, n: int, extra: list[str], src: Path = ROOT
) -> tuple[list[RunResult], int]:
    """``n`` `facetclip train` runs started together; their results and the lowest
    MemAvailable seen meanwhile. ``src``: the checkout to run (another commit, to compare)."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    procs, t0, ended = [], time.perf_counter(), {}
    for i in range(n):
        out = workdir / f"run{i}"
        err = open(workdir / f"run{i}.stderr", "w")  # noqa: SIM115 - closed below
        cmd = [sys.executable, "-m", "cli", "train", "--images", str(images), "--cache",
               str(cache), "--out", str(out), "--overwrite", *TRAIN_ARGS, *extra]  # fmt: skip
        p = subprocess.Popen(cmd, cwd=src, env=env, stdout=subprocess.DEVNULL, stderr=err)
        mem, stop = TreeMemory(), threading.Event()
        th = threading.Thread(target=sample_tree, args=(p.pid, stop, mem), daemon=True)
        th.start()
        procs.append((p, out, err, mem, stop, th))
    low = available_memory()
    while len(ended) < n:
        low = min(low, available_memory())
        for i, (p, *_) in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.perf_counter() - t0
        time.sleep(0.5)
    results = []
    for i, (p, out, err, mem, stop, th) in enumerate(procs):
        stop.set()
        th.join()
        err.close()
        tail = (workdir / f"{out.name}.stderr").read_text()[-400:]
        results.append(RunResult(out, p.returncode, ended[i], mem, tail))
    return results, low


def report(results_by_case: dict[str, tuple[list[RunResult], int]]) -> Report:
    table = [["case", "run", "exit", "wall s", "peak PSS GB", "peak RSS GB", "processes"]]
    notes = []
    for case, (results, low) in results_by_case.items():
        for i, r in enumerate(results):
            table.append([case, str(i), str(r.rc), f"{r.seconds:.0f}",
                          f"{r.memory.peak_pss / 2**30:.2f}", f"{r.memory.peak_rss / 2**30:.2f}",
                          str(r.memory.peak_processes)])  # fmt: skip
            top = ", ".join(f"{n.split('/')[-1]} {b / 2**20:.0f}" for n, b in r.memory.at_peak[:8])
            notes.append(f"{case} run {i} at its peak (PSS MB): {top}")
            if r.rc != 0:
                notes.append(f"{case} run {i} failed: {r.stderr_tail.strip()[-300:]}")
        notes.append(f"{case}: lowest MemAvailable meanwhile {low / 2**30:.1f} GB")
    return Report("facetclip train: memory of the whole process tree", table, notes=notes)


def run(quick: bool = False) -> Report:
    from embed.pipeline import EmbedConfig, run_embed
    from eval.synth import SynthConfig, write_synth
    from eval.tiny_llm import TinyLLMConfig, build_tiny_llm

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synth(tmp / "data", SynthConfig(n=500 if quick else 2000, image_size=64),
                    progress=False)  # fmt: skip
        build_tiny_llm(tmp / "model", TinyLLMConfig(steps=0, hidden_size=64, num_layers=2),
                       progress=False)  # fmt: skip
        run_embed(EmbedConfig(tmp / "data" / "captions.parquet", str(tmp / "model"),
                              tmp / "cache", recipe="flame-long"), progress=False)  # fmt: skip
        cases = {}
        for n in (1, 2):
            work = tmp / f"x{n}"
            work.mkdir()
            cases[f"{n} at once"] = run_trains(tmp / "data" / "images", tmp / "cache", work, n, [])
        return report(cases)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--src", type=Path, default=ROOT, help="the checkout to run")
    ap.add_argument("extra", nargs="*", help="more train options (after --)")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    results = run_trains(a.images, a.cache, a.workdir, a.runs, a.extra, a.src)
    print(report({f"{a.runs} at once": results}).format())


if __name__ == "__main__":
    main()
