"""Heads only vs end to end, in miniature: how much of a trained model is its tower?

On the demo's synthetic data, two frozen backbones each go through `embed-images` once (the
pooled feature and a 2 x 2 token grid): the demo's own tower after end-to-end training, and
the same architecture randomly initialised. On each, only heads train against the demo's
caption cache — FLAME's token-mlp over the grid tokens with no text head (the demo's own
heads), and SAIL's glu on both sides — with the demo's loss, steps and learning rate. Every
run is evaluated like the demo's (held-out retrieval and zero-shot, each beside its chance
level), the frozen tower running once per eval image inside the export.

    report = run_heads_only(demo_train_config, e2e_run=out / "runs/flame", out=out / "heads_only")
    markdown = heads_only_markdown(report)     # a REPORT.md section

The demo calls these two after its own flame run (``run_heads_only`` needs that run: its tower
is a backbone and its eval reports are the end-to-end row).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from store.errors import InputError

# (report name, task, data folder under the dataset's eval/): the demo's first three evals
HEADS_EVALS = (
    ("retrieval", "retrieval", "retrieval"),
    ("zeroshot_shape", "zeroshot", "zeroshot_shape"),
    ("zeroshot_color_shape", "zeroshot", "zeroshot_color_shape"),
)
# image head -> text head: FLAME's pair (the demo's) and SAIL's
HEADS = {"token-mlp": "none", "glu": "glu"}
GRID = 2  # resnet10t at 64 px ends in a 2 x 2 map: the grid is every token the demo's head saw
COLUMNS = (
    ("retrieval", "i2t_R@1"),
    ("retrieval", "t2i_R@1"),
    ("zeroshot_shape", "top1"),
    ("zeroshot_color_shape", "top1"),
)


@dataclass
class HeadsOnlyRow:
    backbone: str  # "trained" (the end-to-end run's tower) | "random" | "end to end"
    image_head: str
    text_head: str
    metrics: dict[str, dict]  # eval name -> metric -> value
    chance: dict[str, dict]
    run: Path | None = None
    train_seconds: float | None = None
    samples_per_s: float | None = None  # training throughput, last logged interval


@dataclass
class HeadsOnlyReport:
    rows: list[HeadsOnlyRow] = field(default_factory=list)
    bytes_per_image: dict[str, float] = field(default_factory=dict)  # backbone -> cache bytes
    embed_seconds: dict[str, float] = field(default_factory=dict)
    images_per_s: dict[str, float] = field(default_factory=dict)  # embed-images throughput


def _eval_row(run: Path, data: Path, evals, progress: bool) -> tuple[dict, dict]:
    from eval.evaluation import EvalConfig, evaluate

    metrics, chance = {}, {}
    for name, task, folder in evals:
        r = evaluate(EvalConfig(run=run, task=task, data=data / "eval" / folder, name=name,
                                plots=False))  # fmt: skip
        metrics[name], chance[name] = r.metrics, r.chance
    return metrics, chance


def _saved_evals(run: Path, evals) -> tuple[dict, dict]:
    """The end-to-end run's eval reports, as `facetclip eval` wrote them (RUN/eval/NAME.json)."""
    metrics, chance = {}, {}
    for name, _, _ in evals:
        path = run / "eval" / f"{name}.json"
        if not path.is_file():
            raise InputError(
                f"{path} is missing: evaluate the end-to-end run first (`facetclip eval`)"
            )
        d = json.loads(path.read_text())
        metrics[name], chance[name] = d["metrics"], d["chance"]
    return metrics, chance


def run_heads_only(
    base,
    e2e_run: Path,
    out: Path,
    data: Path | None = None,
    evals=HEADS_EVALS,
    heads: dict[str, str] | None = None,
    progress: bool = False,
) -> HeadsOnlyReport:
    """Heads-only runs on the end-to-end run's frozen tower and on a random one (see the
    module docstring). ``base``: the end-to-end run's TrainConfig (images, cache, tower,
    image size, loss, steps, optimiser); ``data``: the synthetic dataset (default: the folder
    holding ``base.images``), whose eval/ splits are evaluated."""
    from train.image_cache import ImageCacheConfig, run_embed_images
    from train.loop import train

    heads = heads or HEADS
    out, e2e_run = Path(out), Path(e2e_run)
    images = Path(base.images)
    data = Path(data) if data is not None else images.parent
    report = HeadsOnlyReport()
    metrics, chance = _saved_evals(e2e_run, evals)
    report.rows.append(HeadsOnlyRow("end to end", base.model.image_head, base.model.text_head,
                                    metrics, chance, e2e_run))  # fmt: skip

    backbones = {
        "trained": ImageCacheConfig(images=images, out=out / "icache" / "trained",
                                    from_run=e2e_run, grid=GRID),
        "random": ImageCacheConfig(images=images, out=out / "icache" / "random",
                                   tower=base.model.tower, tower_kwargs=dict(base.model.tower_kwargs),
                                   random_init=True, seed=base.seed,
                                   image_size=base.data.image_size, grid=GRID),
    }  # fmt: skip
    for backbone, icfg in backbones.items():
        s = run_embed_images(icfg, progress=progress)
        report.bytes_per_image[backbone] = s.bytes_per_image
        report.embed_seconds[backbone] = s.seconds
        report.images_per_s[backbone] = s.images_per_s
        for image_head, text_head in heads.items():
            cfg = copy.deepcopy(base)
            cfg.images, cfg.image_cache = "", str(icfg.out)
            cfg.model.image_head, cfg.model.text_head = image_head, text_head
            cfg.out = str(out / "runs" / f"{backbone}-{image_head}")
            t0 = time.perf_counter()
            result = train(cfg, overwrite=True, progress=progress)
            seconds = time.perf_counter() - t0
            metrics, chance = _eval_row(result.run, data, evals, progress)
            report.rows.append(HeadsOnlyRow(backbone, image_head, text_head, metrics, chance,
                                            result.run, seconds, result.images_per_s))  # fmt: skip
    return report


def heads_only_markdown(report: HeadsOnlyReport) -> str:
    """The REPORT.md section: every row's held-out figures beside chance, and the caches' size."""
    if not report.rows:
        return ""
    label = {"end to end": "tower + heads trained end to end", "trained": "frozen: that trained tower",
             "random": "frozen: a random tower"}  # fmt: skip
    head = " | ".join(f"{name} {metric}" for name, metric in COLUMNS)
    lines = [
        "## Heads only: frozen towers from image caches",
        "",
        "Only the heads train, on features `embed-images` cached once; the same data, caption "
        "cache, loss and steps as the end-to-end run.",
        "",
        f"| backbone | image head | text head | {head} | train wall s |",
        "|---|---|---|" + "---|" * len(COLUMNS) + "---|",
    ]
    for r in report.rows:
        cells = [f"{r.metrics.get(n, {}).get(m, float('nan')):.3f}" for n, m in COLUMNS]
        wall = f"{r.train_seconds:.0f}" if r.train_seconds is not None else "-"
        lines.append(f"| {label.get(r.backbone, r.backbone)} | {r.image_head} | {r.text_head} | "
                     f"{' | '.join(cells)} | {wall} |")  # fmt: skip
    first = report.rows[0]
    chance = [f"{first.chance.get(n, {}).get(m, float('nan')):.3f}" for n, m in COLUMNS]
    lines.append(f"| chance | | | {' | '.join(chance)} | |")
    if report.bytes_per_image:
        lines += ["", "Image caches (pooled feature + a 2 x 2 token grid, float16): " + ", ".join(
            f"{b}: {v:,.0f} bytes per image, embedded at {report.images_per_s[b]:,.0f} images/s"
            for b, v in report.bytes_per_image.items())]  # fmt: skip
    return "\n".join(lines) + "\n"
