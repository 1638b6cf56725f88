"""Captioning through the frozen LLM (papers.md §3, issue 14): a run trained with
``--loss prompt-align`` or ``caption-lm`` turns an image into N soft prompts; the LLM reads
them as ``inputs_embeds`` (then BOS) and generates the caption.

- ``caption_images``: `facetclip caption RUN IMAGES`: every image of a folder, img2dataset
  output or table (``store.images``), or one image file -> RUN/captions/<name>.jsonl, one
  ``{"key", "caption"}`` line per image; greedy or beam search; a progress bar.
- ``captioning_report``: `facetclip eval RUN --task captioning` on held-out synthetic images
  with their labels: (i) the share of generated captions whose first-named shape is the main
  object's true shape (and whose colour word beside it is its true colour), each with chance
  (1 / number of shapes or colours) and an image-blind baseline (the same captions scored
  against another image's truth) beside it; (ii) corpus BLEU-4 against the reference
  captions (truncated to the generation budget), beside BLEU-4 against another image's
  reference.
- ``demo_rows``: the claim in miniature, prompt-align (from the cache) vs caption-lm (LLM in
  the loop) at equal image-text pairs and equal steps: quality and steps/s of each.

Engine: Hugging Face ``generate(inputs_embeds=...)``. vLLM is not offered: its prompt-embeds
input could not be measured here (no vLLM in this environment; its CPU build is another task).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from store.errors import InputError

CAPTIONS_DIR = "captions"
MAX_NEW_TOKENS = 48


# --- metrics (pure) ----------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Lower-case word and punctuation tokens (BLEU's and the shape parser's tokenisation)."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def _singular(word: str, vocabulary: Sequence[str]) -> str | None:
    if word in vocabulary:
        return word
    if word.endswith("s") and word[:-1] in vocabulary:
        return word[:-1]
    return None


def main_mention(
    text: str, shapes: Sequence[str], colours: Sequence[str]
) -> tuple[str | None, str | None]:
    """(shape, colour) a caption gives its first-named object: the first shape word, and the
    colour word nearest to it within its sentence (ties: the one before it). The synthetic
    captions name the main object first (``reference_rates`` measures how often)."""
    tokens = words(text)
    for i, t in enumerate(tokens):
        shape = _singular(t, shapes)
        if shape is None:
            continue
        lo = i
        while lo > 0 and tokens[lo - 1] not in ".!?":
            lo -= 1
        hi = i
        while hi < len(tokens) - 1 and tokens[hi + 1] not in ".!?":
            hi += 1
        found = [(abs(j - i), j > i, tokens[j]) for j in range(lo, hi + 1) if tokens[j] in colours]
        return shape, (min(found)[2] if found else None)
    return None, None


def naming_rates(
    captions: Sequence[str],
    true_shapes: Sequence[str],
    true_colours: Sequence[str],
    shapes: Sequence[str],
    colours: Sequence[str],
) -> dict[str, float]:
    """Shares of captions whose main mention has the true shape, the true colour, and both."""
    n = len(captions)
    if n == 0:
        return {"shape": 0.0, "colour": 0.0, "shape_and_colour": 0.0}
    got = [main_mention(c, shapes, colours) for c in captions]
    shape = [g[0] == s for g, s in zip(got, true_shapes, strict=True)]
    colour = [g[1] == c for g, c in zip(got, true_colours, strict=True)]
    return {"shape": sum(shape) / n, "colour": sum(colour) / n,
            "shape_and_colour": sum(a and b for a, b in zip(shape, colour, strict=True)) / n}  # fmt: skip


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002), one reference per hypothesis, in [0, 1]: the
    geometric mean of the clipped 1- to 4-gram precisions summed over the corpus, times the
    brevity penalty exp(1 - r/c) when the hypotheses' total length c is below the references'
    r. No smoothing: 0 when some order has no match. Tokens: ``words`` (lower case, punctuation
    split off)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    matches, totals = [0] * 4, [0] * 4
    c = r = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, t = words(hyp), words(ref)
        c, r = c + len(h), r + len(t)
        for n in range(1, 5):
            hc, rc = _ngrams(h, n), _ngrams(t, n)
            matches[n - 1] += sum(min(k, rc[g]) for g, k in hc.items())
            totals[n - 1] += max(0, len(h) - n + 1)
    if c == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / 4
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    return brevity * math.exp(log_precision)


# --- the LLM -------------------------------------------------------------------------------------


def run_llm(run: str | Path, llm: str | None = None) -> str:
    """The frozen LLM of a prompt run: ``llm`` if given; a caption-lm run's own
    (``prompt.llm``); a prompt-align run's P-Former predictor's LLM (its cache's recipe)."""
    from train.export import load_meta

    if llm:
        return str(llm)
    meta = load_meta(run)
    own = (meta.get("prompt") or {}).get("llm")
    if own:
        return str(own)
    recipe = meta.get("recipe") or {}
    if recipe.get("pooling") in ("pformer", "pformer-code"):
        from embed.pformer_model import predictor_info

        try:
            return str(predictor_info(recipe["model"])["llm"])
        except InputError:
            pass
    raise InputError(
        f"cannot tell which LLM the prompts of {run} are for; pass --model LLM (the folder of "
        "the causal LM the P-Former predictor or the caption-lm run used)"
    )


def load_llm(path: str, device: str = "cpu"):
    """(frozen causal LM in eval mode, its tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the LLM {path!r} ({e}); give a causal LM folder") from None
    return model.to(device).eval().requires_grad_(False), tok


def generate(llm, tok, prompts, beams: int = 1, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Captions of [B, N, D] prompts: the LLM reads ``[p_1 … p_N, emb(BOS)]`` as
    ``inputs_embeds`` and decodes greedily (``beams`` = 1) or by beam search; every input has
    the same length, so there is no padding."""
    import torch

    with torch.no_grad():
        x = prompts.to(llm.dtype)
        if tok.bos_token_id is not None:
            start = torch.full((len(x), 1), tok.bos_token_id, dtype=torch.long, device=x.device)
            x = torch.cat([x, llm.get_input_embeddings()(start)], dim=1)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = llm.generate(
            inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long,
                                                       device=x.device),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=beams,
            eos_token_id=tok.eos_token_id, pad_token_id=pad,
        )  # fmt: skip
    return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


# --- facetclip caption ---------------------------------------------------------------------------


@dataclass
class CaptionConfig:
    run: Path
    images: Path
    llm: str | None = None  # default: the run's (run_llm)
    out: Path | None = None  # default: RUN/captions/<images name>.jsonl
    beams: int = 1
    max_new_tokens: int = MAX_NEW_TOKENS
    batch_size: int = 32
    limit: int | None = None
    image_format: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        if not 1 <= self.beams <= 32:
            raise InputError(f"--beams must be in 1..32, got {self.beams}")
        if not 1 <= self.max_new_tokens <= 4096:
            raise InputError(f"--max-tokens must be in 1..4096, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass
class CaptionResult:
    out: Path
    captions: int
    skipped: list[tuple[str, str]]  # (key, why) of each image that could not be decoded
    llm: str
    beams: int
    max_new_tokens: int
    seconds: float
    examples: list[dict] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.captions / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"], d["images_per_s"] = str(self.out), self.images_per_s
        return d


def skipped_line(skipped: list[tuple[str, str]]) -> str | None:
    """The one line that reports undecodable images (None when there were none)."""
    if not skipped:
        return None
    key, why = skipped[0]
    more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
    return f"skipped {len(skipped)} unreadable image(s): {key} ({why}){more}"


def render_caption(r: CaptionResult) -> str:
    """What `facetclip caption` prints."""
    lines = [f"caption: {r.captions} captions -> {r.out} ({r.llm}, "
             f"{'greedy' if r.beams == 1 else f'beam search x{r.beams}'}, <= {r.max_new_tokens} "
             f"tokens, {r.seconds:.1f} s, {r.images_per_s:.1f} images/s)"]  # fmt: skip
    lines += [f"  {e['key']}: {e['caption']}" for e in r.examples]
    line = skipped_line(r.skipped)
    if line:
        lines.append(line)
    return "\n".join(lines)


def image_rows(images: Path, image_format: str):
    """(keys, bytes reader) of an image input: one image file, or anything store.images reads."""
    from store.images import is_image, read_image_bytes, scan_images

    images = Path(images)
    if images.is_file() and is_image(images):
        blob = images.read_bytes()
        _, why = decode(blob)
        if why is not None:
            raise InputError(f"{images} is not an image that can be decoded ({why})")
        return [images.name.partition(".")[0]], lambda lo, hi: [blob][lo:hi]
    scan = scan_images(images, image_format)  # InputError for an empty folder, in one line
    rows = scan.rows
    keys = rows.column("key").to_pylist()
    if not keys:
        raise InputError(f"no images in {images} (all {scan.failed} downloads failed)")

    def read(lo: int, hi: int) -> list[bytes | None]:
        return read_image_bytes(rows.slice(lo, hi - lo), scan.image_format, scan.sources,
                                scan.bytes_column)  # fmt: skip

    return keys, read


def decode(blob: bytes | None):
    """A PIL RGB image, or the reason it cannot be decoded."""
    import io

    from PIL import Image

    if blob is None:
        return None, "unreadable file"
    try:
        with Image.open(io.BytesIO(blob)) as im:
            return im.convert("RGB"), None
    except Image.UnidentifiedImageError:
        return None, "not an image format PIL can decode"
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return None, str(e).split("\n")[0][:120] or type(e).__name__


def iter_captions(
    model, llm, tok, keys: list[str], read, cfg: CaptionConfig, skipped: list
) -> Iterator[tuple[str, str]]:
    """(key, caption) of every decodable image, in input order; undecodable ones go to
    ``skipped`` as (key, why)."""
    for lo in range(0, len(keys), cfg.batch_size):
        hi = min(lo + cfg.batch_size, len(keys))
        good, images = [], []
        for key, blob in zip(keys[lo:hi], read(lo, hi), strict=True):
            image, why = decode(blob)
            if image is None:
                skipped.append((key, why))
            else:
                good.append(key)
                images.append(image)
        if images:
            prompts = model.prompt_tokens(images)
            yield from zip(good, generate(llm, tok, prompts, cfg.beams, cfg.max_new_tokens),
                           strict=True)  # fmt: skip


def caption_images(cfg: CaptionConfig) -> CaptionResult:
    """`facetclip caption`: generated captions of every image, written as JSON lines."""
    from store.progress import Bar
    from train.export import load, load_meta

    cfg.validate()
    t0 = time.perf_counter()
    meta = load_meta(cfg.run)  # cheap checks first: the run, then the images, then the models
    if meta["model"].get("image_head") != "prompt":
        raise InputError(
            f"{cfg.run} was trained with --loss {meta.get('loss')}; only runs trained "
            "with --loss prompt-align or caption-lm make prompts for an LLM"
        )
    keys, read = image_rows(cfg.images, cfg.image_format)
    model = load(cfg.run)
    if cfg.limit is not None:
        keys = keys[: cfg.limit]
    llm_path = run_llm(cfg.run, cfg.llm)
    llm, tok = load_llm(llm_path)
    if llm.get_input_embeddings().weight.shape[1] != model.model.text_dim:
        raise InputError(
            f"{cfg.run} makes {model.model.text_dim}-wide prompts but {llm_path} reads "
            f"{llm.get_input_embeddings().weight.shape[1]}-wide embeddings; pass the LLM it "
            "was trained for"
        )
    out = Path(cfg.out) if cfg.out else Path(cfg.run) / CAPTIONS_DIR / f"{_name(cfg.images)}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    skipped: list[tuple[str, str]] = []
    examples, n = [], 0
    with Bar("caption", total=len(keys), enabled=cfg.progress) as bar, open(tmp, "w") as f:
        for key, caption in iter_captions(model, llm, tok, keys, read, cfg, skipped):
            f.write(json.dumps({"key": key, "caption": caption}) + "\n")
            n += 1
            if len(examples) < 3:
                examples.append({"key": key, "caption": caption})
            bar.update(completed=n + len(skipped))
    if n == 0:
        tmp.unlink(missing_ok=True)
        raise InputError(f"no image in {cfg.images} could be decoded; {skipped_line(skipped)}")
    tmp.replace(out)  # a finished file or none: an interrupted run leaves no half JSONL
    return CaptionResult(out, n, skipped, llm_path, cfg.beams, cfg.max_new_tokens,
                         time.perf_counter() - t0, examples)  # fmt: skip


def _name(images: Path) -> str:
    images = Path(images)
    return images.name.partition(".")[0] if images.is_file() else images.name or "images"


# --- facetclip eval --task captioning --------------------------------------------------------------


def find_labels(data: Path, labels: Path | None = None) -> Path:
    """``labels`` or synth's labels.parquet beside or above ``data`` (data/eval/retrieval)."""
    if labels is not None:
        if not Path(labels).is_file():
            raise InputError(f"labels file {labels} not found")
        return Path(labels)
    data = Path(data).resolve()
    for folder in (data, *list(data.parents)[:3]):
        if (folder / "labels.parquet").is_file():
            return folder / "labels.parquet"
    raise InputError(
        f"no labels.parquet in or above {data}; captioning needs each image's true main shape "
        "and colour (facetclip synth writes them): pass --labels"
    )


def truncate_references(tok, captions: Sequence[str], max_tokens: int) -> list[str]:
    """Each reference cut to ``max_tokens`` of the LLM's tokens (the generation budget), so
    BLEU's brevity penalty measures the caption, not the budget."""
    from store.prompting import caption_token_ids

    ids = caption_token_ids(tok, list(captions), "none", max_tokens)[0]
    return [tok.decode(i, skip_special_tokens=True).strip() for i in ids]


def captioning_report(cfg):
    """`facetclip eval RUN --task captioning --data synth/eval/retrieval`: an ``EvalReport``
    (``cfg`` is an ``eval.evaluation.EvalConfig``); the generated captions go to
    RUN/eval/<name>_captions.jsonl."""
    import pyarrow.parquet as pq

    from eval.benchmarks import RetrievalSet, load_benchmark
    from eval.evaluation import EvalReport
    from eval.synth import COLORS, SHAPES
    from train.export import load

    run = Path(cfg.run)
    data = load_benchmark(cfg.layout or "table", cfg.data, split=cfg.split, limit=cfg.limit,
                          caption_column=cfg.caption_column, image_column=cfg.image_column)  # fmt: skip
    if not isinstance(data, RetrievalSet):
        raise InputError("captioning needs image-caption pairs (layout table, as synth writes)")
    labels = pq.read_table(find_labels(cfg.data, cfg.labels),
                           columns=["key", "main_shape", "main_color"]).to_pylist()  # fmt: skip
    truth = {r["key"]: (r["main_shape"], r["main_color"]) for r in labels}
    keys = [p.name.partition(".")[0] for p in data.images]
    missing = [k for k in keys if k not in truth]
    if missing:
        raise InputError(f"labels have no main_shape for images {missing[:3]} (of {len(missing)})")
    references = [data.captions[data.caption_image.index(i)] for i in range(len(keys))]

    model = load(run)
    llm_path = run_llm(run, cfg.llm)
    llm, tok = load_llm(llm_path)
    ccfg = CaptionConfig(run=run, images=Path(cfg.data), llm=llm_path, beams=cfg.beams,
                         max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                         progress=False)  # fmt: skip
    skipped: list = []
    t0 = time.perf_counter()

    def read(lo, hi):
        return [p.read_bytes() if p.is_file() else None for p in data.images[lo:hi]]

    got = dict(iter_captions(model, llm, tok, keys, read, ccfg, skipped))
    seconds = time.perf_counter() - t0
    keep = [i for i, k in enumerate(keys) if k in got]
    captions = [got[keys[i]] for i in keep]
    shapes = [truth[keys[i]][0] for i in keep]
    colours = [truth[keys[i]][1] for i in keep]
    refs = truncate_references(tok, [references[i] for i in keep], cfg.max_new_tokens)
    metrics = summarise(captions, refs, shapes, colours, SHAPES, tuple(COLORS))
    # chance: a uniform guess for the naming rates; for BLEU-4, the image-blind score
    chance = {"shape": 1 / len(SHAPES), "colour": 1 / len(COLORS),
              "shape_and_colour": 1 / (len(SHAPES) * len(COLORS)),
              "bleu4": metrics["bleu4_blind"]}  # fmt: skip
    name = cfg.name or f"{Path(cfg.data).name}_captioning"
    out = run / "eval" / f"{name}_captions.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for i, c, r in zip(keep, captions, refs, strict=True):
            f.write(json.dumps({"key": keys[i], "caption": c, "reference": r,
                                "main_shape": truth[keys[i]][0],
                                "main_color": truth[keys[i]][1]}) + "\n")  # fmt: skip
    counts = {"images": len(captions), "skipped": len(skipped), "llm": llm_path,
              "beams": cfg.beams, "max_new_tokens": cfg.max_new_tokens,
              "seconds": round(seconds, 1)}  # fmt: skip
    report = EvalReport(name, "captioning", metrics, chance, counts)
    report.files.append(out)
    return report


def summarise(
    captions: Sequence[str],
    references: Sequence[str],
    true_shapes: Sequence[str],
    true_colours: Sequence[str],
    shapes: Sequence[str],
    colours: Sequence[str],
) -> dict[str, float]:
    """Every captioning metric of one set of generated captions:

    shape / colour / shape_and_colour: naming rates (``naming_rates``);
    *_blind: the same captions scored against the next image's truth (roll by one): what a
    captioner that ignores the image scores with these captions' own word frequencies;
    bleu4 / bleu4_blind: corpus BLEU-4 against the references / the next image's reference;
    reference_shape / reference_colour: the parser on the (truncated) references themselves,
    the ceiling of the naming rates."""
    rates = naming_rates(captions, true_shapes, true_colours, shapes, colours)
    roll = lambda xs: list(xs[1:]) + list(xs[:1])  # noqa: E731
    blind = naming_rates(captions, roll(true_shapes), roll(true_colours), shapes, colours)
    ceiling = naming_rates(references, true_shapes, true_colours, shapes, colours)
    return {
        **rates,
        **{f"{k}_blind": v for k, v in blind.items()},
        "bleu4": bleu4(captions, references),
        "bleu4_blind": bleu4(captions, roll(references)),
        "reference_shape": ceiling["shape"],
        "reference_colour": ceiling["colour"],
    }


# --- the claim in miniature: prompt-align vs caption-lm ---------------------------------------------


@dataclass
class CompareConfig:
    """prompt-align (targets from the prompt cache, no LLM) vs caption-lm (the frozen LLM in
    the loop) at equal image-text pairs (both join ``images`` to ``prompt_cache``), equal
    steps, batch, seed, tower and optimiser; then captioning on held-out ``eval_data``.

    images: training images (img2dataset output); prompt_cache: `embed --recipe pformer` (or
    pformer-code) of their captions; captions: the same captions table (caption-lm's text);
    llm: the frozen LLM the predictor was trained for; eval_data: held-out image-caption pairs
    (synth's eval/retrieval) with labels.parquet beside or above them (or ``labels``).

    tower_run: BLIP-2's and P-Former's setting, a frozen image encoder: this run's tower
    embeds the training images once (`embed-images --from-run`, patch tokens pooled to a
    ``grid`` x ``grid`` map, in OUT/image-cache) and both losses train the prompt head alone on
    those tokens. None: the tower (``tower``, from scratch) trains end to end with the head.
    """

    out: Path
    images: Path
    prompt_cache: Path
    captions: Path
    llm: str
    eval_data: Path
    labels: Path | None = None
    caption_column: str = "long_caption"
    steps: int = 500
    batch_size: int = 64
    workers: int = 1
    cpus_per_worker: int = 1  # each worker's threads
    seed: int = 0
    tower: str = "resnet10t"  # the demo's tower (eval.demo)
    image_size: int = 64
    lr: float = 3e-3
    embed_dim: int = 256
    beams: int = 1
    max_new_tokens: int = MAX_NEW_TOKENS
    limit: int | None = None
    losses: tuple[str, ...] = ("prompt-align", "caption-lm")
    tower_run: Path | None = None
    grid: int = 2

    @property
    def image_cache(self) -> Path | None:
        """Where the frozen tower's tokens of the training images go (None: end to end)."""
        return Path(self.out) / "image-cache" if self.tower_run is not None else None


def compare_train_config(cfg: CompareConfig, loss: str):
    """The TrainConfig of one side of the comparison: everything but the loss is shared."""
    from train.config import TrainConfig

    frozen = cfg.image_cache is not None
    t = TrainConfig(images="" if frozen else str(cfg.images),
                    image_cache=str(cfg.image_cache) if frozen else "",
                    cache=str(cfg.prompt_cache), out=str(Path(cfg.out) / loss), steps=cfg.steps,
                    batch_size=cfg.batch_size, seed=cfg.seed, loss=loss)  # fmt: skip
    t.model.tower, t.model.text_head, t.model.embed_dim = cfg.tower, "linear", cfg.embed_dim
    t.data.image_size = cfg.image_size
    t.optim.lr, t.optim.warmup_steps, t.optim.weight_decay = cfg.lr, 30, 0.05
    t.run.workers, t.run.log_every, t.run.checkpoint_every = cfg.workers, 25, cfg.steps
    t.run.cpus_per_worker = cfg.cpus_per_worker
    if loss == "caption-lm":
        t.prompt.llm, t.prompt.captions = str(cfg.llm), str(cfg.captions)
        t.prompt.caption_column = cfg.caption_column
    return t


def steps_per_s(run: Path, batch_size: int) -> float:
    """The median training speed over the logged intervals after the first (which holds the
    start-up: Ray Data's first blocks, the LLM load), in optimiser steps per second."""
    from store.runs import METRICS_FILE, read_metrics

    rates = [r["images_per_s"] for r in read_metrics(Path(run) / METRICS_FILE)][1:]
    return float(sorted(rates)[len(rates) // 2]) / batch_size if rates else float("nan")


def demo_rows(cfg: CompareConfig, progress: bool = False) -> list[dict]:
    """Train (or reuse, when RUN/config.toml is exactly this config) both runs, caption the
    held-out images, and return one row per loss: quality beside chance and steps/s."""
    from eval.evaluation import EvalConfig, evaluate
    from store.runs import METRICS_FILE, read_metrics
    from train.loop import CONFIG_FILE, check_config, train

    if cfg.image_cache is not None:  # the frozen tower's tokens, once for both losses
        from train.image_cache import ImageCacheConfig, run_embed_images

        run_embed_images(ImageCacheConfig(images=Path(cfg.images), out=cfg.image_cache,
                                          from_run=Path(cfg.tower_run), grid=cfg.grid),
                         progress=progress)  # fmt: skip
    rows = []
    for loss in cfg.losses:
        t = compare_train_config(cfg, loss)
        run = Path(t.out)
        done = (run / "model" / "config.json").is_file() and (run / CONFIG_FILE).is_file()
        check_config(t)  # fills what train() fills (facets, N), so the saved TOML compares
        t0 = time.perf_counter()
        if not (done and (run / CONFIG_FILE).read_text() == t.to_toml()):
            train(t, overwrite=True, progress=progress)
        t1 = time.perf_counter()
        r = evaluate(EvalConfig(run=run, task="captioning", data=Path(cfg.eval_data),
                                labels=cfg.labels, llm=cfg.llm, beams=cfg.beams,
                                max_new_tokens=cfg.max_new_tokens, limit=cfg.limit,
                                caption_column=cfg.caption_column, plots=False))  # fmt: skip
        last = read_metrics(run / METRICS_FILE)[-1]
        joined = json.loads((run / "data_stats.json").read_text())["joined"]
        rows.append({
            "loss": loss, "llm_in_loop": loss == "caption-lm", "pairs": joined,
            "steps": int(last["step"]), "steps_per_s": steps_per_s(run, cfg.batch_size),
            "images": r.counts["images"],
            **{k: r.metrics[k] for k in ("shape", "shape_blind", "colour", "colour_blind",
                                         "shape_and_colour", "bleu4", "bleu4_blind",
                                         "reference_shape")},
            "shape_chance": r.chance["shape"], "colour_chance": r.chance["colour"],
            "tower": (f"frozen ({Path(cfg.tower_run).name} run's, cached tokens)"
                      if cfg.tower_run is not None else f"{cfg.tower}, trained end to end"),
            "final_loss": float(last["loss"]),
            "train_s": t1 - t0, "eval_s": time.perf_counter() - t1,
            "example": _first_caption(r),
        })  # fmt: skip
    return rows


def _first_caption(report) -> str:
    path = next((f for f in report.files if str(f).endswith("_captions.jsonl")), None)
    if path is None or not Path(path).is_file():
        return ""
    with open(path) as f:
        line = f.readline()
    return json.loads(line)["caption"] if line else ""


def comparison_table(rows: list[dict]) -> str:
    """Markdown of ``demo_rows``: one row per loss, every rate beside its chance."""
    lines = [
        "| loss | LLM in the loop | pairs | steps | steps/s | names true shape (chance, "
        "image-blind) | names true colour (chance, image-blind) | BLEU-4 (image-blind) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['loss']} | {'yes' if r['llm_in_loop'] else 'no'} | {r['pairs']:,} | "
            f"{r['steps']} | {r['steps_per_s']:.2f} | {r['shape']:.3f} ({r['shape_chance']:.3f}, "
            f"{r['shape_blind']:.3f}) | {r['colour']:.3f} ({r['colour_chance']:.3f}, "
            f"{r['colour_blind']:.3f}) | {100 * r['bleu4']:.1f} ({100 * r['bleu4_blind']:.1f}) |"
        )
    if rows:
        tower = f" Tower: {rows[0]['tower']}." if rows[0].get("tower") else ""
        lines.append(f"\n{rows[0]['images']} held-out images; the references name the main shape "
                     f"first in {rows[0]['reference_shape']:.0%} of cases (the rates' ceiling)."
                     f"{tower}")  # fmt: skip
    return "\n".join(lines)
