"""`facetclip demo`: the pipeline on synthetic data, on this machine, with nothing downloaded.

Today: synth -> tiny-llm (briefly pre-trained) -> embed (recipe flame) -> a look inside the
cache. Training and evaluation join as stage two and eval land.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from store.errors import InputError


@dataclass
class DemoConfig:
    out: Path
    n: int = 2000
    seed: int = 0
    llm_steps: int | None = None  # None: tiny-llm's default pre-training
    recipe: str = "flame"
    overwrite: bool = False


@dataclass
class DemoReport:
    out: Path
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def run_demo(cfg: DemoConfig, console: Console | None = None) -> DemoReport:
    from embed.pipeline import EmbedConfig, run_embed
    from embed.tiny_llm import TinyLLMConfig, build_tiny_llm
    from eval.synth import SynthConfig, write_synth

    console = console or Console()
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise InputError(f"{out} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    report = DemoReport(out)
    data, model, cache = out / "data", out / "model", out / "cache" / cfg.recipe

    def step(name: str, fn):
        console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        result = fn()
        report.seconds[name] = time.perf_counter() - t0
        return result

    step(
        "1/3 synth: synthetic long-caption dataset",
        lambda: write_synth(data, SynthConfig(n=cfg.n, seed=cfg.seed)),
    )
    report.paths["dataset"] = data
    llm_cfg = (
        TinyLLMConfig(seed=cfg.seed)
        if cfg.llm_steps is None
        else TinyLLMConfig(steps=cfg.llm_steps, seed=cfg.seed)
    )
    llm = step(
        "2/3 tiny-llm: pre-train a small LM on the synthetic language",
        lambda: build_tiny_llm(model, llm_cfg),
    )
    if llm.initial_loss is not None:
        console.print(f"pre-training loss {llm.initial_loss:.3f} -> {llm.final_loss:.3f}")
    report.paths["model"] = model
    summary = step(
        f"3/3 embed: recipe {cfg.recipe} -> cache",
        lambda: run_embed(
            EmbedConfig(
                captions=data / "captions.parquet", model=str(model), out=cache, recipe=cfg.recipe
            )
        ),
    )
    console.print(
        f"{summary.rows:,} captions embedded, {summary.captions_per_s:,.1f} captions/s, "
        f"{summary.tokens_per_s:,.0f} tokens/s"
    )
    report.paths["cache"] = cache

    console.rule("[bold]outputs")
    for name, p in report.paths.items():
        console.print(f"{name:>8}: {p}")
    console.print(
        "time: " + ", ".join(f"{k.split(':')[0]} {v:.0f} s" for k, v in report.seconds.items())
    )
    return report
