"""`facetclip eval RUN`: zero-shot classification and image<->text retrieval of a trained tower;
captioning through the frozen LLM for a prompt run (``eval.captioning``).

Text goes through the run's own recipe and LLM (the cache's ``recipe.toml`` names the model),
exactly as the training vectors did, then through the trained text head:

- zero-shot: class names x templates in the single raw prompt (FLAME's protocol, ``query =
  "raw"``, the default) or through every trained facet, averaged (``query = "facets"``), then
  averaged over templates;
- retrieval: each caption's facet vectors averaged (FLAME's multi-facet query, ``query =
  "facets"``, the default), or the raw prompt (``query = "raw"``).

Text embeddings are cached under RUN/eval/text/ keyed by recipe and texts, so a second eval
of the same data is instant (``facetclip embed`` resumes a finished cache without loading the
model). Reports: RUN/eval/<name>.json, <name>.md, and PNGs, each figure beside its chance level.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from embed.prompts import (
    CONTEXT_SUFFIX,
    PFORMER_POOLINGS,
    RAW_FACETS,
    SHORT_PREFIX,
    PromptGroup,
    Recipe,
)
from store.errors import InputError

TASKS = ("zeroshot", "retrieval", "captioning")
QUERIES = ("facets", "raw")
# FLAME's protocol: zero-shot classes through the single raw prompt, retrieval captions through
# every facet (their vectors averaged); EvalConfig.query = None takes these.
DEFAULT_QUERY = {"zeroshot": "raw", "retrieval": "facets"}
# Class-name templates, kept few: each is one more prompt through the LLM per class.
TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image showing a {}.",
    "a drawing of a {}.",
)


@dataclass
class EvalConfig:
    run: Path
    task: str
    data: Path
    layout: str | None = None  # default: imagefolder (zeroshot) / table (retrieval)
    name: str | None = None  # report name (default: the data folder's name)
    # Text prompts: "facets" (the mean of the trained facets' vectors) or "raw" (the single raw
    # prompt). None: the task's default (DEFAULT_QUERY, FLAME's: raw for zero-shot, facets for
    # retrieval).
    query: str | None = None
    templates: tuple[str, ...] = TEMPLATES
    caption_column: str = "long_caption"
    image_column: str = "image"
    split: str = "test"
    limit: int | None = None
    engine: str = "auto"
    batch_size: int = 64
    plots: bool = True
    # captioning (eval.captioning): the LLM (default: the run's), labels (default: synth's
    # labels.parquet beside or above data), beam width, generation budget
    llm: str | None = None
    labels: Path | None = None
    beams: int = 1
    max_new_tokens: int = 48
    # Features of the eval images from an image cache (embed-images of the eval split, keys =
    # image file names up to the first dot) instead of running the tower on each image.
    image_cache: Path | None = None


@dataclass
class EvalReport:
    name: str
    task: str
    metrics: dict
    chance: dict
    counts: dict
    files: list[Path] = field(default_factory=list)
    # (image features, text features): a retrieval eval's images and captions (for the
    # retrieved-images grid), a zero-shot eval's images and class vectors
    features: tuple | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = asdict(replace(self, features=None))
        d.pop("features")
        d["files"] = [str(f) for f in self.files]
        return d


# --- text through the run's recipe and LLM -------------------------------------------------------


def run_recipe(run: Path) -> Recipe:
    """The recipe the run's training vectors were made with: saved with the exported model
    (train.export), so eval needs neither the cache nor the run's config."""
    from train.export import load_meta

    recipe = load_meta(run).get("recipe")
    if not recipe:
        raise InputError(
            f"the exported model of {run} records no recipe (its cache had none when it was "
            "exported); export it again from a run whose cache is readable"
        )
    return Recipe.from_dict(recipe)


def text_recipe(recipe: Recipe, trained_facets: list[str], query: str) -> tuple[Recipe, list[str]]:
    """A one-group recipe over column ``text`` and the vector names to average.

    ``facets``: the run's prompt group holding the most trained facets (FLAME: the 7 long
    ones), averaged. ``raw``: the single raw prompt. A mean-pooled recipe has one vector.
    """
    base = replace(recipe, name=f"{recipe.name}-eval-{query}", dtype="float32")
    if recipe.pooling in PFORMER_POOLINGS:
        # A prompt run's text side is the caption's P-Former prompts, averaged (what its
        # contrastive term paired the images with); the full form, so no head is needed.
        r = replace(base, pooling="pformer", groups=(PromptGroup(column="text"),))
        return r, r.vector_names
    if recipe.pooling == "mean":
        group = PromptGroup(column="text", mean_name=recipe.groups[0].mean_name)
        return replace(base, groups=(group,)), group.vector_names("mean")
    if query == "raw":
        group = PromptGroup(
            column="text", prefix=SHORT_PREFIX, suffix=CONTEXT_SUFFIX, facets=dict(RAW_FACETS)
        )
        return replace(base, groups=(group,)), list(RAW_FACETS)
    best = max(recipe.groups, key=lambda g: len(set(g.facets) & set(trained_facets)))
    names = [n for n in best.facets if n in trained_facets] or list(best.facets)
    group = PromptGroup(
        column="text",
        prefix=best.prefix,
        suffix=best.suffix,
        facets={n: best.facets[n] for n in names},
    )
    return replace(base, groups=(group,)), names


def embed_texts(
    run: Path, texts: list[str], recipe: Recipe, names: list[str], engine: str = "auto"
) -> np.ndarray:
    """[len(texts), D] float32: the mean over ``names`` of each text's vectors, cached."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from embed.pipeline import EmbedConfig, run_embed
    from store.reader import KeyIndex

    digest = hashlib.sha256((recipe.to_toml() + "\0".join(texts)).encode()).hexdigest()[:16]
    root = Path(run) / "eval" / "text" / digest
    root.mkdir(parents=True, exist_ok=True)
    captions = root / "texts.parquet"
    keys = [f"t{i:08d}" for i in range(len(texts))]
    if not captions.is_file():
        pq.write_table(pa.table({"key": keys, "text": texts}), captions)
    recipe_file = root / "recipe.toml"
    recipe_file.write_text(replace(recipe, model="", model_fingerprint="").to_toml())
    cfg = EmbedConfig(
        captions=captions,
        model=recipe.model,
        out=root / "cache",
        recipe=str(recipe_file),
        engine=engine,
    )
    run_embed(cfg, progress=False)
    vectors = KeyIndex.load(root / "cache").vectors(keys, names)
    return np.mean([vectors[n] for n in names], axis=0)


# --- images ----------------------------------------------------------------------------------------


def encode_images(model, paths: list[Path], batch_size: int, image_cache=None) -> np.ndarray:
    """[n, D]: the model's image embeddings of ``paths``, through its frozen or trained tower,
    or from ``image_cache``'s features of the same images (checked to be what the tower gives)."""
    if image_cache is not None:
        return model.encode_features(_cache_features(model, paths, image_cache))
    from PIL import Image

    out = []
    for i in range(0, len(paths), batch_size):
        images = []
        for p in paths[i : i + batch_size]:
            try:
                with Image.open(p) as im:
                    images.append(im.convert("RGB"))
            except OSError as e:
                raise InputError(f"cannot read image {p}: {e}") from None
        out.append(model.encode_image(images))
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def _cache_features(model, paths: list[Path], image_cache) -> np.ndarray:
    from store.images import file_key
    from train.image_cache import cached_features, check_cache_fits, open_image_cache

    m = model.meta["model"]
    if m["image_head"] == "prompt":
        raise InputError(
            "a prompt run's retrieval and zero-shot embed the images through its own tower "
            "(the pooled prompts); drop --image-cache"
        )
    cache = open_image_cache(image_cache)
    check_cache_fits(cache.recipe, model.meta, str(image_cache))
    grid = int(m.get("token_grid", 0)) if m["image_head"] == "token-mlp" else None
    return cached_features(cache, [file_key(p) for p in paths], grid)


# --- the two tasks ---------------------------------------------------------------------------------


def evaluate(cfg: EvalConfig) -> EvalReport:
    from eval.benchmarks import ClassificationSet, RetrievalSet, load_benchmark
    from train.export import load

    if cfg.task not in TASKS:
        raise InputError(f"--task must be one of {', '.join(TASKS)}")
    if cfg.query is not None and cfg.query not in QUERIES:
        raise InputError(f"--query must be one of {', '.join(QUERIES)}")
    cfg = replace(cfg, query=cfg.query or DEFAULT_QUERY.get(cfg.task))
    run = Path(cfg.run)
    if cfg.task == "captioning" and cfg.image_cache:
        raise InputError(
            "--task captioning runs the tower on the images (the prompt head reads its patch "
            "tokens); drop --image-cache"
        )
    if cfg.task == "captioning":
        from eval.captioning import captioning_report

        return write_report(run, captioning_report(cfg), False, None)
    model = load(run)
    recipe = run_recipe(run)
    layout = cfg.layout or ("imagefolder" if cfg.task == "zeroshot" else "table")
    data = load_benchmark(layout, cfg.data, split=cfg.split, limit=cfg.limit,
                          caption_column=cfg.caption_column, image_column=cfg.image_column)  # fmt: skip
    name = cfg.name or Path(cfg.data).name
    if cfg.task == "zeroshot":
        if not isinstance(data, ClassificationSet):
            raise InputError(
                f"layout {layout!r} gives a retrieval set; zero-shot needs class folders (imagefolder)"
            )
        report = _zeroshot(cfg, model, recipe, data, name)
    else:
        if not isinstance(data, RetrievalSet):
            raise InputError(
                f"layout {layout!r} gives a classification set; retrieval needs image-caption pairs"
            )
        report = _retrieval(cfg, model, recipe, data, name)
    return write_report(run, report, cfg.plots, data)


def _zeroshot(cfg: EvalConfig, model, recipe: Recipe, data, name: str) -> EvalReport:
    from eval.metrics import zero_shot_accuracy

    # FLAME classifies with the single raw prompt (the default); a mean-pooled recipe embeds the
    # text itself. "facets" puts each class prompt through the facets, as retrieval does.
    r, names = text_recipe(recipe, model.facets, cfg.query)
    texts = [t.format(c) for c in data.classes for t in cfg.templates]
    vectors = embed_texts(cfg.run, texts, r, names, cfg.engine)
    per_template = model.encode_text(vectors).reshape(len(data.classes), len(cfg.templates), -1)
    classes = per_template.mean(axis=1)  # average over templates, then renormalise
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    images = encode_images(model, data.images, cfg.batch_size, cfg.image_cache)
    m = zero_shot_accuracy(images, classes, data.labels)
    c = len(data.classes)
    chance = {k: min(1.0, int(k[3:]) / c) for k in m if k.startswith("top")}
    m["per_class_top1"] = {data.classes[i]: v for i, v in m["per_class_top1"].items()}
    counts = {"images": len(data.images), "classes": c, "query": cfg.query}
    return EvalReport(name, "zeroshot", m, chance, counts, features=(images, classes))


def _retrieval(cfg: EvalConfig, model, recipe: Recipe, data, name: str) -> EvalReport:
    from eval.metrics import retrieval_recall

    r, names = text_recipe(recipe, model.facets, cfg.query)
    texts = model.encode_text(embed_texts(cfg.run, list(data.captions), r, names, cfg.engine))
    images = encode_images(model, data.images, cfg.batch_size, cfg.image_cache)
    caption_image = np.asarray(data.caption_image)
    ks = (1, 5, 10)
    metrics: dict = retrieval_recall(images, texts, caption_image, ks)
    n_img = len(data.images)
    per_image = round(len(caption_image) / n_img)
    chance = {}
    for k in ks:
        chance[f"t2i_R@{k}"] = min(1.0, k / n_img)
        chance[f"i2t_R@{k}"] = chance_any_in_top_k(len(caption_image), per_image, k)
    if data.caption_language:
        langs = np.asarray(data.caption_language)
        per_lang = {}
        for lang in sorted(set(langs)):
            sel = langs == lang
            used = sorted(set(caption_image[sel]))
            remap = {old: new for new, old in enumerate(used)}
            per_lang[lang] = retrieval_recall(
                images[used], texts[sel], [remap[i] for i in caption_image[sel]], ks
            )
        metrics["per_language"] = per_lang
        metrics["language_mean"] = {
            k: float(np.mean([v[k] for v in per_lang.values()]))
            for k in next(iter(per_lang.values()))
        }
    # curves for the plot
    metrics["i2t_curve"] = [
        retrieval_recall(images, texts, caption_image, (k,))[f"i2t_R@{k}"] for k in range(1, 11)
    ]
    metrics["t2i_curve"] = [
        retrieval_recall(images, texts, caption_image, (k,))[f"t2i_R@{k}"] for k in range(1, 11)
    ]
    counts = {"images": n_img, "captions": len(caption_image), "query": cfg.query}
    report = EvalReport(name, "retrieval", metrics, chance, counts, features=(images, texts))
    return report


def chance_any_in_top_k(total: int, positives: int, k: int) -> float:
    """P(at least one of ``positives`` among ``total`` candidates lands in a random top k)."""
    miss = 1.0
    for j in range(min(k, total)):
        miss *= max(0, total - positives - j) / (total - j)
    return 1.0 - miss


# --- reports ---------------------------------------------------------------------------------------


def markdown(report: EvalReport) -> str:
    lines = [
        f"### {report.name} ({report.task})",
        "",
        "| metric | value | chance |",
        "|---|---|---|",
    ]
    for k, v in report.metrics.items():
        if isinstance(v, float):
            lines.append(f"| {k} | {v:.3f} | {report.chance.get(k, float('nan')):.3f} |")
    if "language_mean" in report.metrics:
        lines += ["", "| language | i2t R@1 | t2i R@1 |", "|---|---|---|"]
        for lang, m in report.metrics["per_language"].items():
            lines.append(f"| {lang} | {m['i2t_R@1']:.3f} | {m['t2i_R@1']:.3f} |")
    lines += ["", ", ".join(f"{k}: {v}" for k, v in report.counts.items())]
    return "\n".join(lines) + "\n"


def write_report(run: Path, report: EvalReport, plots: bool, data) -> EvalReport:
    out = Path(run) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        report.files += _plots(out, report, data)
    js, md = out / f"{report.name}.json", out / f"{report.name}.md"
    report.files = [js, md, *report.files]
    js.write_text(json.dumps(report.to_dict(), indent=1))
    md.write_text(markdown(report))
    return report


def _plots(out: Path, report: EvalReport, data) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if report.task == "retrieval":
        ks = list(range(1, 11))
        n_img = report.counts["images"]
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        ax.plot(ks, report.metrics["i2t_curve"], marker="o", label="image→text")
        ax.plot(ks, report.metrics["t2i_curve"], marker="o", label="text→image")
        ax.plot(ks, [min(1, k / n_img) for k in ks], "k--", label="chance")
        ax.set_xlabel("K")
        ax.set_ylabel("recall@K")
        ax.set_title(f"{report.name}: recall@K")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        files.append(out / f"{report.name}_recall.png")
        fig.savefig(files[-1])
        plt.close(fig)
        files.append(_grid(out, report, data, plt))
    else:
        per_class = report.metrics["per_class_top1"]
        fig, ax = plt.subplots(figsize=(min(16, max(5, 0.35 * len(per_class))), 3.5), dpi=100)
        ax.bar(range(len(per_class)), list(per_class.values()))
        ax.axhline(report.chance["top1"], color="k", linestyle="--", label="chance")
        ax.set_xticks(range(len(per_class)), list(per_class), rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("top-1 accuracy")
        ax.set_title(f"{report.name}: per-class accuracy (top-1 {report.metrics['top1']:.2f})")
        ax.legend()
        fig.tight_layout()
        files.append(out / f"{report.name}_per_class.png")
        fig.savefig(files[-1])
        plt.close(fig)
    return files


def _grid(out: Path, report: EvalReport, data, plt) -> Path:
    """The top-5 retrieved images for the first few text queries (the true image framed)."""
    import textwrap

    from PIL import Image

    images, texts = report.features
    queries = list(range(min(4, len(texts))))
    fig, axes = plt.subplots(len(queries), 6, figsize=(10, 1.9 * len(queries)), dpi=100, squeeze=False,
                             gridspec_kw={"width_ratios": [2.2, 1, 1, 1, 1, 1]})  # fmt: skip
    for row, q in enumerate(queries):
        order = np.argsort(-(images @ texts[q]), kind="stable")[:5]
        caption = textwrap.fill(textwrap.shorten(data.captions[q], 160, placeholder=" …"), 42)
        axes[row][0].text(0, 0.5, caption, fontsize=6, va="center")
        axes[row][0].axis("off")
        for col, i in enumerate(order, start=1):
            ax = axes[row][col]
            with Image.open(data.images[i]) as im:
                ax.imshow(im.convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
            hit = i == data.caption_image[q]
            for s in ax.spines.values():
                s.set_color("green" if hit else "lightgray")
                s.set_linewidth(3 if hit else 1)
    fig.suptitle(f"{report.name}: top-5 images per caption (green: the true image)", fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.92, bottom=0.03, wspace=0.08)
    path = out / f"{report.name}_retrieved.png"
    fig.savefig(path)
    plt.close(fig)
    return path
