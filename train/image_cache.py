"""`facetclip embed-images`: a frozen timm tower runs once over an image dataset and its
features go into a cache of stage one's format (store.cache), so that `facetclip train
--image-cache` trains the heads alone (SAIL, ShareLock, LiT; papers.md §5).

```
ICACHE/
  recipe.toml            kind = "image": the tower (model), its weights' fingerprint, the
                         transform (resolution, resize, mean/std), pooling, grid, dtype
  manifest.json          as stage one: one entry per finished shard, image rows [start, end)
  backbone.safetensors   the tower's weights that made the features: the export of a heads-only
                         run puts this tower back in front of the trained heads
  shards/part-*.parquet  key, pooled [P] (+ grid_R_C [C] with --grid G), truncated (false)
  skipped/part-*.parquet images left out: duplicate key, missing key, unreadable image
```

What a row holds is what the image heads read, computed by ``train.model.tower_outputs``, the
function ``encode_image`` itself runs: ``pooled``, the tower's pre-logits feature (the input of
the linear / mlp / glu heads), and with ``--grid G`` the patch tokens average-pooled to a G x G
map (``grid_R_C``, the tokens of a token-mlp or prompt head with ``token_grid = G``). Features are stored
raw, not normalised. Every image goes through the evaluation transform
(``train.transforms.eval_transform``: centre square, bicubic resize, mean/std) exactly as
`facetclip eval` feeds an exported model, so a heads-only model sees at inference the features
it trained on (up to their float16 storage).

Exactly once, as `embed`: shard i holds image rows [i * shard_rows, (i + 1) * shard_rows) of the
dataset's scan (store.images; its order is stable), staged under temporary names and committed
by one writer; a rerun recognises finished shards by their row range and computes only the
rest. ``engines > 1`` hands shards to Ray actors (store.shard_actors), each with its own copy of
the tower, loaded from the cache's backbone.safetensors.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from store.cache import SKIPPED_SCHEMA, Cache, StagedShard
from store.errors import CacheError, FacetclipError, InputError
from store.format import (
    VECTOR_DTYPES,
    auto_shard_rows,
    encode_vectors,
    layout_metadata,
    shard_schema,
)
from store.images import IMAGE_FORMATS, read_image_bytes, scan_images
from store.progress import Bar
from store.shard_actors import kill_after_shards
from train.transforms import CLIP_MEAN, CLIP_STD, ImageTransform

KIND = "image"
BACKBONE_FILE = "backbone.safetensors"
POOLED = "pooled"
RESIZE = "center-square-bicubic"  # train.transforms.eval_transform
READ_ROWS = 1024  # image bytes read at a time (a Parquet image row group is read per call)


class ImageEmbedError(FacetclipError):
    """The tower produced something that must not be written (NaN/Inf features)."""


@dataclass
class ImageCacheConfig:
    """What `facetclip embed-images` runs.

    images:       any dataset store.images reads (img2dataset webdataset / Parquet / files, or
                  a key + image path table).
    out:          the image cache (created, or resumed): a folder or a pyarrow.fs URI.
    tower:        a timm model name; with ``from_run`` it may be left out (the run's own).
    weights / from_run / random_init: where the frozen weights come from, exactly one of: a
                  local timm state dict (.safetensors/.pth), a facetclip run (its
                  model/tower.safetensors and config), or a seeded random initialisation.
    image_size:   input side; default: the run's, else the timm model's pretrained input size.
    grid:         also store the patch tokens pooled to grid x grid (0: the pooled feature only).
    tower_kwargs: extra timm.create_model arguments (e.g. {"img_size": 64} for a ViT).
    """

    images: Path
    out: Path | str
    tower: str | None = None
    weights: Path | None = None
    from_run: Path | None = None
    random_init: bool = False
    seed: int = 0
    tower_kwargs: dict = field(default_factory=dict)
    image_size: int | None = None
    grid: int = 0
    dtype: str = "float16"
    shard_rows: int | None = None
    batch_size: int = 64
    limit: int | None = None
    image_format: str = "auto"
    key_column: str = "key"
    image_column: str = "image"
    device: str = "auto"
    engines: int = 1
    ray_address: str | None = None
    max_engine_failures: int = 3


@dataclass
class ShardStats:
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)


@dataclass
class ImageEmbedSummary:
    out: Path | str
    rows: int = 0  # images embedded by this run
    rows_reused: int = 0  # in shards finished by an earlier run
    skipped: Counter = field(default_factory=Counter)
    failed_images: int = 0  # img2dataset failures (absent from the scan)
    shards_written: int = 0
    shards_reused: int = 0
    engines: int = 1
    engine_failures: int = 0
    seconds: float = 0.0
    shard_bytes: int = 0  # the whole cache's shards
    total_rows: int = 0  # the whole cache's rows

    def add(self, stats: ShardStats) -> None:
        self.rows += stats.rows
        self.skipped.update(stats.skipped)
        self.shards_written += 1

    @property
    def images_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    @property
    def bytes_per_image(self) -> float:
        return self.shard_bytes / self.total_rows if self.total_rows else 0.0


def grid_names(grid: int) -> list[str]:
    """The vector names of a grid's tokens, row by row: grid_0_0, grid_0_1, ..."""
    return [f"grid_{r}_{c}" for r in range(grid) for c in range(grid)]


def is_image_cache(recipe: dict) -> bool:
    return recipe.get("kind") == KIND


def transform_record(t: ImageTransform) -> dict:
    """The transform as the recipe records it (what eval must match)."""
    return {"image_size": t.image_size, "resize": RESIZE, "mean": list(t.mean), "std": list(t.std)}


def recipe_transform(recipe: dict) -> ImageTransform:
    """An image cache's evaluation transform, from its recipe."""
    t = recipe["transform"]
    return ImageTransform(image_size=int(t["image_size"]), train=False, mean=tuple(t["mean"]),
                          std=tuple(t["std"]))  # fmt: skip


def open_image_cache(path: str | Path) -> Cache:
    """The cache at ``path``, which must be an image cache (CacheError naming the fix)."""
    cache = Cache.open(path)
    if not is_image_cache(cache.recipe):
        raise CacheError(
            f"{path} is a caption cache (made by `facetclip embed`), not an image cache; make "
            "one with `facetclip embed-images IMAGES --tower NAME --out ICACHE`"
        )
    return cache


def load_backbone(cache: Cache, into=None):
    """The frozen tower of an image cache (eval mode), its weights checked against the
    recipe's fingerprint; ``into``: load them into this tower (of the recipe's model) instead
    of a new one."""
    from safetensors.torch import load as load_tensors

    from train.model import ModelConfig, create_tower, weights_fingerprint

    recipe = cache.recipe
    data = cache.read_file(BACKBONE_FILE)
    if data is None:
        raise CacheError(
            f"{cache.root} has no {BACKBONE_FILE}; rerun the `facetclip embed-images` command "
            "that made it (it writes the backbone first)"
        )
    tower = into
    if tower is None:
        kwargs = dict(recipe.get("tower_kwargs", {}))
        tower = create_tower(ModelConfig(tower=recipe["model"], tower_kwargs=kwargs))
    tower.load_state_dict(load_tensors(data))
    if weights_fingerprint(tower) != recipe["model_fingerprint"]:
        raise CacheError(
            f"{cache.root}/{BACKBONE_FILE} is not the tower whose features the cache holds "
            "(its fingerprint differs from recipe.toml's); restore it or embed the images again"
        )
    return tower.eval()


def check_cache_fits(recipe: dict, meta: dict, where: str) -> None:
    """InputError, one line, unless the image cache (``recipe``) holds exactly the features the
    exported model (``meta``, its config.json) computes from an image: the same tower weights,
    the same transform, and for a token-mlp head the same grid."""
    backbone = meta.get("backbone") or {}
    if recipe.get("model_fingerprint") != backbone.get("fingerprint"):
        raise InputError(
            f"{where} holds features of {recipe.get('model')} weights {recipe.get('model_fingerprint', '?')[:19]}…, "
            f"not of this model's tower ({backbone.get('tower', '?')} "
            f"{str(backbone.get('fingerprint', '?'))[:19]}…); embed the eval images with "
            "`facetclip embed-images --from-run RUN`, or drop --image-cache"
        )
    t = recipe.get("transform", {})
    want = {"image_size": meta["image_size"], "resize": RESIZE,
            "mean": list(meta["image_mean"]), "std": list(meta["image_std"])}  # fmt: skip
    got = {k: t.get(k) for k in want}
    if (
        not np.allclose(got["mean"] or [0] * 3, want["mean"])
        or not np.allclose(got["std"] or [0] * 3, want["std"])
        or (got["image_size"], got["resize"]) != (want["image_size"], want["resize"])
    ):
        raise InputError(
            f"{where} was made with another transform ({got['image_size']} px, {got['resize']}, "
            f"mean {got['mean']}, std {got['std']}) than this model's eval transform "
            f"({want['image_size']} px, {want['resize']}, mean {want['mean']}, std {want['std']}); "
            "embed the eval images again with `facetclip embed-images --from-run RUN`"
        )
    model = meta["model"]
    if model["image_head"] == "token-mlp" and int(recipe.get("grid", 0)) != int(
        model.get("token_grid", 0)
    ):
        raise InputError(
            f"{where} holds a {recipe.get('grid', 0)}x{recipe.get('grid', 0)} token grid; this "
            f"model's token-mlp reads {model.get('token_grid', 0)}x{model.get('token_grid', 0)} "
            "(0: every token); embed the eval images with the model's --grid"
        )


def cached_features(cache: Cache, keys: list[str], token_grid: int | None) -> np.ndarray:
    """Image-cache features of ``keys`` in that order: [n, P] pooled (``token_grid`` None) or
    [n, G², C] grid tokens; CacheError naming the keys the cache lacks."""
    from store.reader import KeyIndex

    names = [POOLED] if token_grid is None else grid_names(token_grid)
    vectors = KeyIndex.load(cache).vectors(keys, names)
    stacked = np.stack([vectors[n] for n in names], axis=1)
    return stacked[:, 0] if token_grid is None else stacked


# --- the tower and its recipe ------------------------------------------------------------------


def _source_tower(cfg: ImageCacheConfig):
    """(tower with its frozen weights, its timm name, where the weights came from, transform
    defaults (size, mean, std), timm kwargs)."""
    import torch
    from safetensors.torch import load_file

    from train.model import ModelConfig, create_tower

    given = [cfg.weights is not None, cfg.from_run is not None, cfg.random_init]
    if sum(given) != 1:
        raise InputError(
            "give exactly one of --weights PATH (a local timm state dict), --from-run RUN (a "
            "trained facetclip tower) or --random-init (a random baseline); nothing is downloaded"
        )
    if cfg.from_run is not None:
        from train.export import load_meta, model_dir

        folder = model_dir(cfg.from_run)
        meta = load_meta(folder)
        name = meta["model"]["tower"]
        if cfg.tower and cfg.tower != name:
            raise InputError(
                f"--tower {cfg.tower} differs from the run's tower {name}; drop --tower"
            )
        tower = create_tower(ModelConfig(tower=name, tower_kwargs=dict(meta["model"]["tower_kwargs"])))  # fmt: skip
        if not (folder / "tower.safetensors").is_file():
            raise InputError(f"{folder} has no tower.safetensors; export the run again")
        tower.load_state_dict(load_file(folder / "tower.safetensors"))
        defaults = (meta["image_size"], meta["image_mean"], meta["image_std"])
        kwargs = dict(meta["model"]["tower_kwargs"])
        return tower, name, f"run:{folder.resolve()}", defaults, kwargs
    if not cfg.tower:
        raise InputError("--tower NAME is required (a timm model name, e.g. resnet50)")
    torch.manual_seed(cfg.seed)  # --random-init: the same seed gives the same tower
    weights = str(cfg.weights) if cfg.weights is not None else None
    tower = create_tower(ModelConfig(tower=cfg.tower, tower_kwargs=dict(cfg.tower_kwargs),
                                     pretrained_path=weights))  # fmt: skip
    pcfg = getattr(tower, "pretrained_cfg", {}) or {}
    defaults = (
        int(pcfg.get("input_size", (3, 224, 224))[-1]),
        pcfg.get("mean", CLIP_MEAN),
        pcfg.get("std", CLIP_STD),
    )
    source = f"file:{Path(weights).resolve()}" if weights else f"random:seed={cfg.seed}"
    return tower, cfg.tower, source, defaults, dict(cfg.tower_kwargs)


def _probe(tower, name: str, size: int, grid: int) -> tuple[int, int | None]:
    """(pooled width, token width) from one forward pass of a blank image; InputError when the
    tower cannot take ``size`` px images."""
    import torch

    from train.model import tower_outputs

    try:
        with torch.no_grad():
            pooled, tokens = tower_outputs(tower, torch.zeros(1, 3, size, size), grid)
    except InputError:
        raise
    except (RuntimeError, AssertionError, ValueError) as e:
        raise InputError(
            f"timm model {name} cannot run on {size} px images ({str(e).splitlines()[0][:200]}); "
            "pass --image-size, or tower kwargs (e.g. img_size for a ViT)"
        ) from None
    return pooled.shape[-1], None if tokens is None else tokens.shape[-1]


@dataclass
class ImageShard:
    """One shard's image rows: locators (store.images) + ``dup`` (a later copy of a key)."""

    start: int
    rows: pa.Table


@dataclass
class ImagePlan:
    cfg: ImageCacheConfig
    cache: Cache
    tower: Any  # the frozen tower (this process's copy)
    transform: ImageTransform
    names: list[str]
    schema: pa.Schema
    rows: pa.Table  # every image row of the scan (+ dup), in order
    image_format: str
    sources: list[str]
    bytes_column: str | None
    shard_rows: int
    failed_images: int

    def todo(self, summary: ImageEmbedSummary, bar: Bar) -> Iterator[tuple[int, ImageShard]]:
        """(index, rows) of each shard still to embed; finished ones are counted and passed."""
        n = self.rows.num_rows
        for index in range(math.ceil(n / self.shard_rows)):
            start = index * self.shard_rows
            end = min(n, start + self.shard_rows)
            entry = self.cache.manifest.entry(index)
            if entry is not None and (entry.input_start, entry.input_end) == (start, end):
                summary.shards_reused += 1
                summary.rows_reused += entry.rows
                bar.update(advance=end - start)
                continue
            yield index, ImageShard(start, self.rows.slice(start, end - start))


def _duplicates(keys: pa.ChunkedArray) -> pa.Array:
    """True for every row whose key occurred in an earlier row (the first copy is kept)."""
    n = len(keys)
    if pc.count_distinct(keys).as_py() == n:
        return pa.array(np.zeros(n, bool))
    t = pa.table({"key": keys, "_i": pa.array(np.arange(n))})
    first = t.group_by("key", use_threads=False).aggregate([("_i", "min")]).column("_i_min")
    dup = np.ones(n, bool)
    dup[first.to_numpy()] = False
    return pa.array(dup)


def plan_embed_images(cfg: ImageCacheConfig) -> ImagePlan:
    """Validate ``cfg``, load the tower, and create (or reopen) the image cache."""
    if cfg.dtype not in VECTOR_DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(VECTOR_DTYPES)}")
    if cfg.image_format not in IMAGE_FORMATS:
        raise InputError(f"--image-format must be one of {', '.join(IMAGE_FORMATS)}")
    for name, value, lo in (("--engines", cfg.engines, 1), ("--batch-size", cfg.batch_size, 1),
                            ("--grid", cfg.grid, 0)):  # fmt: skip
        if value < lo:
            raise InputError(f"{name} must be >= {lo}")
    if cfg.limit is not None and cfg.limit < 1:
        raise InputError("--limit must be >= 1")
    if cfg.shard_rows is not None and not 1 <= cfg.shard_rows <= 10_000_000:
        raise InputError("--shard-rows must be in 1..10000000")

    scan = scan_images(Path(cfg.images), cfg.image_format, cfg.key_column, cfg.image_column)
    rows = scan.rows if cfg.limit is None else scan.rows.slice(0, cfg.limit)
    if rows.num_rows == 0:
        raise InputError(f"no images in {cfg.images} ({scan.image_format}); nothing to embed")
    rows = rows.append_column("dup", _duplicates(rows.column("key")))

    tower, name, source, (size, mean, std), kwargs = _source_tower(cfg)
    tower.eval()
    transform = ImageTransform(image_size=cfg.image_size or int(size), train=False,
                               mean=tuple(mean), std=tuple(std))  # fmt: skip
    pooled_dim, token_dim = _probe(tower, name, transform.image_size, cfg.grid)
    if token_dim is not None and token_dim != pooled_dim:
        raise InputError(
            f"{name}'s pooled feature is {pooled_dim} wide but its patch tokens {token_dim}; one "
            "cache holds one width: drop --grid (or cache the grid in a second image cache)"
        )
    from train.model import weights_fingerprint

    recipe = {
        "kind": KIND,
        "name": f"image-{name}",
        "model": name,
        "model_fingerprint": weights_fingerprint(tower),
        "tower_kwargs": kwargs,
        "pooling": "pre_logits",
        "grid": cfg.grid,
        "dtype": cfg.dtype,
        "normalize": False,
        "transform": transform_record(transform),
    }
    names = [POOLED, *grid_names(cfg.grid)]
    layout = layout_metadata(names, pooled_dim, cfg.dtype, [])
    shard_rows = cfg.shard_rows
    if shard_rows is None:
        existing = Cache.existing_manifest(cfg.out)
        shard_rows = (existing.shard_rows if existing is not None
                      else auto_shard_rows(len(names), pooled_dim, cfg.dtype))  # fmt: skip
    input_info = {"path": str(Path(cfg.images).resolve()), "format": scan.image_format,
                  "weights": source}  # fmt: skip
    cache = Cache.create(cfg.out, recipe, layout, shard_rows, input_info)
    if cache.read_file(BACKBONE_FILE) is None:  # first run (or one killed before this line)
        from safetensors.torch import save

        state = {k: v.detach().cpu().contiguous() for k, v in tower.state_dict().items()}
        cache.write_file(
            BACKBONE_FILE, save(state, metadata={"facetclip.recipe": json.dumps(recipe)})
        )
    return ImagePlan(
        cfg=cfg, cache=cache, tower=tower, transform=transform, names=names,
        schema=shard_schema(names, pooled_dim, cfg.dtype, [], []), rows=rows,
        image_format=scan.image_format, sources=scan.sources, bytes_column=scan.bytes_column,
        shard_rows=shard_rows, failed_images=scan.failed,
    )  # fmt: skip


# --- one shard -----------------------------------------------------------------------------------


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class ImageEmbedder:
    """Runs the frozen tower over one shard's images and stages the shard's files.

    Shared by the in-process path and the Ray actors: the caller commits what ``stage``
    returns (``Cache.commit_shard``)."""

    tower: Any
    transform: ImageTransform
    grid: int
    names: list[str]
    dtype: str
    schema: pa.Schema
    image_format: str
    sources: list[str]
    bytes_column: str | None
    batch_size: int = 64
    device: str = "auto"

    def __post_init__(self) -> None:
        self._device = _device(self.device)
        self.tower = self.tower.to(self._device).eval()

    def stage(
        self,
        cache: Cache,
        index: int,
        shard: ImageShard,
        advance: Callable[[int], None] | None = None,
    ) -> tuple[StagedShard, ShardStats]:
        table, skipped, stats = self.embed(shard, advance)
        end = shard.start + shard.rows.num_rows
        return cache.stage_shard(index, table, skipped, shard.start, end), stats

    def _decode(self, blob: bytes | None) -> np.ndarray | None:
        from PIL import Image

        from train.transforms import eval_transform

        if blob is None:
            return None
        try:
            with Image.open(io.BytesIO(blob)) as im:
                return eval_transform(im, self.transform)  # what eval does to an image file
        except Exception:  # noqa: BLE001 - decoders raise many types; one bad image is a skip
            return None

    def _features(self, pixels: list[np.ndarray]) -> np.ndarray:
        """[n, V, D] float32: the pooled feature (+ grid tokens) of each image."""
        import torch

        from train.model import tower_outputs

        with torch.inference_mode():
            x = torch.from_numpy(np.stack(pixels)).to(self._device)
            pooled, tokens = tower_outputs(self.tower, x, self.grid)
            parts = [pooled[:, None]] + ([tokens] if tokens is not None else [])
            return torch.cat(parts, dim=1).float().cpu().numpy()

    def embed(
        self, shard: ImageShard, advance: Callable[[int], None] | None = None
    ) -> tuple[pa.Table, pa.Table, ShardStats]:
        """(rows table, skipped-rows table, counts) of one shard; ``advance(n)`` per batch."""
        advance = advance or (lambda n: None)
        rows, stats = shard.rows, ShardStats()
        keys = rows.column("key").to_pylist()
        dup = rows.column("dup").to_numpy(zero_copy_only=False)
        kept: list[int] = []
        chunks: list[np.ndarray] = []
        skipped = {"key": [], "input_row": [], "reason": []}

        def skip(i: int, reason: str) -> None:
            skipped["key"].append(keys[i])
            skipped["input_row"].append(shard.start + i)
            skipped["reason"].append(reason)
            stats.skipped[reason] += 1

        pending: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            if pending:
                chunks.append(self._features([p for _, p in pending]))
                kept.extend(i for i, _ in pending)
                advance(len(pending))
                pending.clear()

        for lo in range(0, len(keys), READ_ROWS):
            part = rows.slice(lo, READ_ROWS)
            blobs = read_image_bytes(part, self.image_format, self.sources, self.bytes_column)
            for j, blob in enumerate(blobs):
                i = lo + j
                if not keys[i]:
                    skip(i, "missing key")
                elif dup[i]:
                    skip(i, "duplicate key")
                elif (pixels := self._decode(blob)) is None:
                    skip(i, "unreadable image")
                else:
                    pending.append((i, pixels))
                    if len(pending) == self.batch_size:
                        flush()
            flush()
        advance(len(skipped["key"]))

        vectors = (
            np.concatenate(chunks) if chunks else np.zeros((0, len(self.names), 1), np.float32)
        )
        bad = ~np.isfinite(vectors).all(axis=(1, 2))
        if bad.any():
            shown = [keys[kept[i]] for i in np.flatnonzero(bad)[:10]]
            raise ImageEmbedError(
                f"NaN/Inf in the features of {int(bad.sum())} image(s) (keys {shown}); the shard "
                "was not written. Check the tower's weights, or run it in float32 on the CPU."
            )
        arrays = {"key": pa.array([keys[i] for i in kept], pa.string())}
        for j, name in enumerate(self.names):
            for suffix, arr in encode_vectors(vectors[:, j], self.dtype).items():
                arrays[name + suffix] = arr
        arrays["truncated"] = pa.array(np.zeros(len(kept), bool))
        table = pa.Table.from_arrays([arrays[f.name] for f in self.schema], schema=self.schema)
        stats.rows = len(kept)
        return table, pa.table(skipped, schema=SKIPPED_SCHEMA), stats


def _embedder(plan_parts: dict, tower) -> ImageEmbedder:
    return ImageEmbedder(tower=tower, **plan_parts)


def _parts(plan: ImagePlan, device: str) -> dict:
    """What an embedder needs besides the tower: small and picklable (Ray actors get it)."""
    return {"transform": plan.transform, "grid": plan.cfg.grid, "names": plan.names,
            "dtype": plan.cfg.dtype, "schema": plan.schema, "image_format": plan.image_format,
            "sources": plan.sources, "bytes_column": plan.bytes_column,
            "batch_size": plan.cfg.batch_size, "device": device}  # fmt: skip


# --- running -------------------------------------------------------------------------------------


class ImageActor:
    """One copy of the tower on a Ray actor (its weights read from the cache's backbone file):
    embeds a shard, stages its files."""

    def __init__(self, parts: dict, cache: Cache, on_gpu: bool, kill_after: int | None = None):
        self.error: FacetclipError | None = None
        self.cache, self.kill_after, self.shards = cache, kill_after, 0
        try:
            import torch

            if not on_gpu:
                torch.set_num_threads(1)  # one actor per logical CPU
            self.embedder = _embedder(parts, load_backbone(cache))
        except FacetclipError as e:  # a user's error: raised again, typed, by stage
            self.error = e

    def stage(self, index: int, shard: ImageShard) -> tuple[StagedShard, ShardStats]:
        from store.shard_actors import kill_actor_after

        if self.error is not None:
            raise self.error
        result = self.embedder.stage(self.cache, index, shard)
        self.shards += 1
        kill_actor_after(self.shards, self.kill_after)
        return result


def _run_actors(plan: ImagePlan, summary: ImageEmbedSummary, bar: Bar) -> None:
    import ray

    from store.cluster import init_ray
    from store.shard_actors import actor_kill_after, check_cluster, run_shard_actors

    cfg = plan.cfg
    todo = plan.todo(summary, bar)
    first = next(todo, None)
    if first is None:
        return
    started = init_ray(cfg.ray_address, cfg.engines)
    try:
        on_gpu = cfg.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
        check_cluster(cfg.engines, "GPU" if on_gpu else "CPU", "tower actor")
        actor_cls = ray.remote(num_gpus=1 if on_gpu else 0, num_cpus=1)(ImageActor)
        parts = _parts(plan, "cuda" if on_gpu else "cpu")
        writer, kill_after = plan.cache.stager(), actor_kill_after()

        def start_actor(aid: int):
            return actor_cls.remote(parts, writer, on_gpu, kill_after if aid == 0 else None)

        def commit(item: tuple[int, ImageShard], result: tuple[StagedShard, ShardStats]) -> None:
            staged, stats = result
            plan.cache.commit_shard(staged)
            summary.add(stats)
            bar.update(advance=item[1].rows.num_rows)

        import itertools

        summary.engine_failures = run_shard_actors(
            start_actor, cfg.engines, itertools.chain([first], todo), commit,
            cfg.max_engine_failures, ImageEmbedError, "tower actor",
        )  # fmt: skip
    finally:
        if started:
            ray.shutdown()
    plan.cache.clean_temporaries()  # files staged by actors that died


def run_embed_images(cfg: ImageCacheConfig, progress: bool = True) -> ImageEmbedSummary:
    """Embed ``cfg.images`` with a frozen tower into the image cache ``cfg.out`` (creating or
    resuming it); ``cfg.engines > 1`` or a ``ray_address`` runs that many Ray actors."""
    t0 = time.perf_counter()
    plan = plan_embed_images(cfg)
    summary = ImageEmbedSummary(out=plan.cache.root, engines=cfg.engines,
                                failed_images=plan.failed_images)  # fmt: skip
    bar = Bar("embed-images", plan.rows.num_rows, progress)
    try:
        if cfg.engines > 1 or cfg.ray_address:
            _run_actors(plan, summary, bar)
        else:
            embedder, done = None, [0]

            def advance(n: int) -> None:
                done[0] += n
                rate = done[0] / max(time.perf_counter() - t0, 1e-9)
                bar.update(advance=n, info=f"{rate:,.0f} images/s")

            for index, shard in plan.todo(summary, bar):
                embedder = embedder or _embedder(_parts(plan, cfg.device), plan.tower)
                staged, stats = embedder.stage(plan.cache, index, shard, advance)
                plan.cache.commit_shard(staged)
                summary.add(stats)
                kill_after_shards(summary.shards_written)  # crash tests only
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - t0
    summary.shard_bytes = sum(s.bytes for s in plan.cache.manifest.shards)
    summary.total_rows = plan.cache.rows
    return summary


def render_embed_images(s: ImageEmbedSummary):
    """What `facetclip embed-images` prints: a rich table of the run."""
    from rich.table import Table

    t = Table(title=f"embed-images -> {s.out}", show_header=False)
    t.add_row("images embedded", f"{s.rows:,}")
    t.add_row("images from earlier runs", f"{s.rows_reused:,} ({s.shards_reused} shards)")
    t.add_row("shards written", str(s.shards_written))
    t.add_row("skipped", ", ".join(f"{r}: {c}" for r, c in s.skipped.items()) or "0")
    t.add_row("failed downloads (img2dataset)", f"{s.failed_images:,}")
    if s.engine_failures:
        t.add_row("tower actors replaced", f"{s.engine_failures} (their shards recomputed)")
    t.add_row("bytes per image", f"{s.bytes_per_image:,.0f} ({s.total_rows:,} images in the cache)")
    t.add_row("wall time", f"{s.seconds:.1f} s ({s.images_per_s:,.1f} images/s)")
    return t
