"""`facetclip train`: the Ray Train loop. Only the vision tower and small heads train; the LLM
is never loaded — its vectors come from the cache.

Driver: validate everything that can be validated without Ray (config, cache, loss vs facets,
timm name, the image/cache key join), write RUN/config.toml, start (or join) Ray, run a
``TorchTrainer`` over a Ray Data pipeline, show a progress bar, then plot the metrics and export
RUN/model/. Workers: the training step below, top to bottom.

Heads only (``image_cache`` instead of ``images``): the tower is not run. Each worker reads
its slice of the join of the text cache and the image cache itself (train.cache_pairs: no
images to decode, so no Ray Data), the image head reads the cached features, and the export
puts the image cache's frozen tower back in front of the trained heads.

Recovery: every worker (re)starts from RUN/checkpoints' newest complete checkpoint, so Ray's
failure handling (``run.max_failures``) and ``facetclip train --resume RUN`` are the same path.
Within an epoch the data order is a pure function of the seed, so a resumed run replays the
batches it had consumed and continues with exactly the batch an uninterrupted run would see.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from store.errors import FacetclipError, InputError
from store.runs import (
    METRICS_FILE,
    NAN_FILE,
    MetricsLog,
    fit_workers,
    latest_checkpoint,
    load_checkpoint,
    plot_metrics,
    read_metrics,
    save_checkpoint,
)
from train.config import TrainConfig
from train.losses import PROMPT_LOSSES

CONFIG_FILE = "config.toml"
FAULT_MARKER = ".fault_injected"


class TrainError(FacetclipError):
    """Training stopped for a reason the user can act on (NaN loss, failed workers)."""


@dataclass
class TrainResult:
    run: Path
    steps: int
    final_loss: float | None
    seconds: float
    images_per_s: float
    checkpoint: Path | None
    model_dir: Path | None


# --- the driver ---------------------------------------------------------------------------------


def prepare_run(
    cfg: TrainConfig, resume: bool = False, overwrite: bool = False
) -> tuple[TrainConfig, dict]:
    """Every check that needs no Ray; returns the config to run and the facts workers need."""

    run = Path(cfg.out)
    if resume:
        if not (run / CONFIG_FILE).is_file():
            raise InputError(f"{run} is not a run directory (no {CONFIG_FILE}); nothing to resume")
        cfg = TrainConfig.from_toml(run / CONFIG_FILE)
        cfg.out = str(run)
        keep_saved_behaviour(cfg, (run / CONFIG_FILE).read_text())
    elif run.exists() and not run.is_dir():
        raise InputError(f"--out {run} is a file, not a folder; choose another --out")
    elif run.exists() and any(run.iterdir()):
        if latest_checkpoint(run) is not None and not overwrite:
            raise InputError(
                f"{run} already holds a run; continue it with --resume {run}, or pass --overwrite"
            )
        if not overwrite:
            raise InputError(
                f"{run} exists and is not empty; choose another --out or pass --overwrite"
            )
    layout = check_config(cfg)
    if cfg.image_cache:  # heads only: the join of two caches (InputError when no key is shared)
        from train.cache_pairs import plan_pairs

        plan = plan_pairs(cfg.cache, cfg.image_cache, cfg.facets, image_vectors(cfg))
        reads = 1.0
    else:
        from train.data import plan_join

        plan = plan_join(_data_config(cfg, train=True))  # InputError when nothing joins
        reads = plan.image_reads_per_row

    facts = {
        "text_dim": layout["dim"],
        "image_dim": plan.image_dim if cfg.image_cache else None,
        "join": _as_dict(plan.stats),
        "text_mean": None,
        "prompt_mean": None,
        "prompt_scale": None,
        "plan": plan,
        "prompt_form": layout.get("prompt_form"),
        "caption_ids": None,
    }
    if cfg.loss in PROMPT_LOSSES:
        from train.prompt_step import caption_ids, prompt_statistics

        facts.update(prompt_statistics(cfg, facts["prompt_form"]))
        if cfg.loss == "caption-lm":  # tokenised once, here: a missing caption fails before Ray
            facts["caption_ids"] = caption_ids(cfg, plan.table.column("key").to_pylist())
    if cfg.model.center_text and facts["text_mean"] is None:
        facts["text_mean"] = text_mean(cfg.cache, cfg.facets).tolist()
    run.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:
        import shutil

        for name in (
            "checkpoints",
            "tb",
            "plots",
            "model",
            METRICS_FILE,
            NAN_FILE,
            FAULT_MARKER,
            "ray",
        ):
            p = run / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    (run / CONFIG_FILE).write_text(cfg.to_toml())
    (run / "data_stats.json").write_text(
        json.dumps({**facts["join"], "image_reads_per_row": reads}, indent=1)
    )
    (run / NAN_FILE).unlink(missing_ok=True)
    return cfg, facts


def keep_saved_behaviour(cfg: TrainConfig, saved_toml: str) -> None:
    """A resumed run keeps the loss it began with when an option was added since with a
    default that changes it: a prompt run saved before ``prompt.standardize`` existed trained
    on BLIText's raw MSE (its checkpoints also lack the head's ``out_mean``, which then loads
    as 0, as it trained)."""
    import tomllib

    if cfg.loss in PROMPT_LOSSES and "standardize" not in tomllib.loads(saved_toml).get(
        "prompt", {}
    ):
        cfg.prompt.standardize = False


def check_config(cfg: TrainConfig) -> dict:
    """The checks that need the cache's layout only (config, facets, loss, tower and heads);
    fills ``cfg.facets`` and returns the layout. A sweep runs them for every trial up front."""
    from store.cache import Cache
    from train.losses import validate_loss_config
    from train.model import build_model

    cfg.validate()
    layout = Cache.open(cfg.cache).manifest.layout
    facets = cfg.facets or list(layout["vector_names"])
    unknown = [f for f in facets if f not in layout["vector_names"]]
    if unknown:
        raise InputError(
            f"facets {unknown} are not in the cache {cfg.cache}; it has {layout['vector_names']}"
        )
    cfg.facets = facets
    validate_loss_config(cfg.loss, cfg.num_facets, len(facets), cfg.facet_mode)
    if cfg.loss in PROMPT_LOSSES:  # the model is as wide as the LLM's prompts, N from the cache
        from train.prompt_step import check_prompt_config

        p = check_prompt_config(cfg, layout)
        layout = {**layout, "dim": p.width, "prompt_form": p.form}
    if cfg.image_cache:
        # unknown head, token-mlp without cached tokens: fail here, not in a worker
        build_model(cfg.model, layout["dim"], image_dim=use_image_cache(cfg))
    else:  # unknown timm name, bad head: fail here, not in a worker
        build_model(cfg.model, layout["dim"])
    return layout


def use_image_cache(cfg: TrainConfig) -> int:
    """A heads-only run takes its tower from the image cache: the cache's recipe sets
    ``model.tower`` (and its kwargs), the transform's image size, and for a patch-token head the
    token grid. Returns the width of the cached features."""
    from train.image_cache import open_image_cache, recipe_transform
    from train.model import PATCH_TOKEN_HEADS

    cache = open_image_cache(cfg.image_cache)
    recipe = cache.recipe
    cfg.model.tower, cfg.model.tower_kwargs = recipe["model"], dict(recipe.get("tower_kwargs", {}))
    cfg.model.pretrained_path = None  # the frozen weights are the cache's backbone file
    cfg.model.grad_checkpointing = False
    cfg.data.image_size = recipe_transform(recipe).image_size
    if cfg.model.image_head in PATCH_TOKEN_HEADS:
        if not recipe.get("grid"):
            who, alternative = (
                (f"loss {cfg.loss}'s prompt head", "") if cfg.model.image_head == "prompt"
                else ("image head token-mlp", ", or use image_head linear, mlp or glu")
            )  # fmt: skip
            raise InputError(
                f"{who} reads patch tokens, but {cfg.image_cache} holds the pooled feature "
                f"only; embed the images with --grid G (e.g. 2){alternative}"
            )
        cfg.model.token_grid = int(recipe["grid"])
    return int(cache.manifest.layout["dim"])


def image_vectors(cfg: TrainConfig) -> list[str]:
    """The image-cache vectors a heads-only run reads: the grid tokens for the patch-token
    heads (token-mlp, prompt), else the pooled feature."""
    from train.image_cache import POOLED, grid_names
    from train.model import PATCH_TOKEN_HEADS

    if cfg.model.image_head in PATCH_TOKEN_HEADS:
        return grid_names(cfg.model.token_grid)
    return [POOLED]


def text_mean(cache: str | Path, facets: list[str]) -> np.ndarray:
    """[D]: what ``center_text`` subtracts from every cached vector, in training and at
    inference alike (it becomes the model's ``text_mean`` buffer): the mean over the cache's
    rows and the trained facets.

    One shared offset, not each facet's own mean: subtracting per-facet means was tried and,
    on the synthetic data, lowered held-out text->image R@1 from 3-4x chance to chance.
    """
    from store.reader import vector_means

    return vector_means(cache, facets).mean(axis=0)


def _as_dict(obj) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) else dict(obj)


def _data_config(cfg: TrainConfig, train: bool):
    from train.data import DataConfig

    return DataConfig(
        images=Path(cfg.images), cache=cfg.cache, facets=cfg.facets or None,
        image_size=cfg.data.image_size, crop_scale=tuple(cfg.data.crop_scale), seed=cfg.seed,
        image_format=cfg.data.image_format, train=train,
    )  # fmt: skip


def init_ray(cfg: TrainConfig, num_cpus: int | None = None) -> None:
    """Join ``run.ray_address``, or start a local Ray with more logical CPUs than the workers
    take, so Ray Data's decode tasks are not starved behind the training workers (a sweep
    passes ``num_cpus`` for its concurrent runs). Inside a Ray task (a Tune trial) Ray is up."""
    from store.cluster import init_ray as join_or_start

    join_or_start(cfg.run.ray_address, cfg.run.workers * cfg.run.cpus_per_worker, num_cpus)


def train(
    cfg: TrainConfig, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> TrainResult:
    """Run (or resume) a training run; returns when it is done and exported."""
    import ray

    t0 = time.perf_counter()
    cfg, facts = prepare_run(cfg, resume=resume, overwrite=overwrite)
    run = Path(cfg.out).resolve()
    init_ray(cfg)
    # The join plan goes to the object store once; every worker builds its own slice of each
    # epoch from it (train.data: a rank's rows and their order are a function of seed, epoch).
    facts["plan"] = ray.put(facts["plan"])
    facts["caption_ids"] = ray.put(facts["caption_ids"])
    info = fit_workers(
        worker_loop, {"config": cfg.to_dict(), "run": str(run), **facts}, run, cfg.run,
        cfg.steps, progress=progress, failed=lambda cause: TrainError(
            f"training failed after {cfg.run.max_failures} restart(s): {cause}. "
            f"Then continue with: facetclip train --resume {run}"),
    )  # fmt: skip
    if info is not None:
        if info.get("valid_images") == 0:  # not the optimiser: no image could be read at all
            raise TrainError(
                f"no image of the batch at step {info['step']} could be read or decoded (missing "
                f"files, corrupt bytes), so the loss is undefined; check --images {cfg.images}, "
                f"then --resume {run}"
            )
        raise TrainError(
            f"loss became {info['loss']} at step {info['step']}; training stopped. The last good checkpoint "
            f"is {info['last_checkpoint']}. Try a lower optim.lr, more optim.warmup_steps, optim.grad_clip, "
            f"or run.amp = false; then --resume {run}."
        )
    from train.export import export_model

    plot_metrics(run / METRICS_FILE, run / "plots")
    ckpt = latest_checkpoint(run)
    model_dir = export_model(run, ckpt) if ckpt else None
    rows = read_metrics(run / METRICS_FILE)
    last = rows[-1] if rows else {}
    return TrainResult(
        run=run, steps=int(last.get("step", 0)), final_loss=last.get("loss"),
        seconds=time.perf_counter() - t0, images_per_s=float(last.get("images_per_s", 0.0)),
        checkpoint=ckpt, model_dir=model_dir,
    )  # fmt: skip


# --- the worker ---------------------------------------------------------------------------------


def worker_loop(loop_cfg: dict) -> None:
    """One Ray Train worker. Reads top to bottom: build, resume, then the training step."""
    import ray.train
    import ray.train.torch
    import torch

    from store.precision import use_bf16_autocast
    from train.losses import compute_loss, select_facets
    from train.model import build_model, lr_at, make_optimizer

    cfg = TrainConfig.from_dict(loop_cfg["config"])
    run = Path(loop_cfg["run"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.run.cpus_per_worker))
    device = ray.train.torch.get_device()

    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    model = build_model(cfg.model, loop_cfg["text_dim"], image_dim=loop_cfg["image_dim"])
    if loop_cfg["text_mean"] is not None:
        # center_text's offset lives in the model (a buffer saved with the weights), so the
        # export applies exactly what the loss saw here.
        model.set_text_mean(torch.tensor(loop_cfg["text_mean"]))
    if loop_cfg.get("prompt_scale") is not None:  # saved with the weights, as above
        model.set_prompt_targets(loop_cfg["prompt_mean"], loop_cfg["prompt_scale"])
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    ckpt = latest_checkpoint(run)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model)
    # Channels-last: oneDNN convolves it 1.17x faster on CPU (resnet10t, README "Precision on
    # CPU"), and it is PyTorch's advice for convnets under AMP on GPU. Only 4-D tensors change
    # layout (a ViT's patch embedding is its one); the math is the same.
    pixels = model.tower is not None
    if pixels:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # to the device; DDP when world > 1
    raw = getattr(model, "module", model)
    optimizer = make_optimizer(raw, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay, device)
    if ckpt is not None:
        load_checkpoint(ckpt, raw, optimizer, device=device)
    amp = use_bf16_autocast(cfg.run.amp, device)  # GPU, or a CPU with bf16 arithmetic
    # The prompt losses' step (train.prompt_step): targets from the cache, or the frozen LLM.
    prompt_step = None
    if cfg.loss in PROMPT_LOSSES:
        from train.prompt_step import PromptStep

        prompt_step = PromptStep(cfg, loop_cfg, device)
    warmup = min(cfg.optim.warmup_steps, cfg.steps // 2)

    log = MetricsLog(run, enabled=rank == 0, after_step=state["step"])
    plan = ray.get(loop_cfg["plan"])
    per_worker = cfg.batch_size // world
    step, epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"]
    t_last, images_since = time.perf_counter(), 0
    invalid_total = state.get("invalid_images", 0)
    while step < cfg.steps:
        consumed = skip  # batches of this epoch already trained on (a resumed run)
        for images, vectors, keys, n_invalid in epoch_batches(cfg, plan, epoch, rank, world, skip):
            consumed += 1
            invalid_total += n_invalid  # undecodable images: counted, never fatal
            images = images.to(device)  # pixels, or cached features (heads only)
            if pixels:
                images = images.contiguous(memory_format=torch.channels_last)
            vectors = vectors.to(device)

            # 1. learning rate: warm-up then cosine
            lr = lr_at(step, cfg.steps, warmup, cfg.optim.lr, cfg.optim.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if prompt_step is not None:  # 2-3. prompts: cached targets, or the LLM in the loop
                losses = prompt_step(model, images, vectors, keys, amp)
            else:
                # 2. which facets pair with each image this step: a function of (seed, step, rank)
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)
                text_in = select_facets(vectors, cfg.loss, cfg.facet_mode, cfg.num_facets, gen)
                # 3. forward through DDP, loss over the global batch (all workers' features)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                    out = model(images, text_in)
                losses = compute_loss(cfg.loss, **out)
            loss = losses["loss"]
            # 4. a NaN/Inf loss stops the run on every worker (the loss is global, so all agree)
            if not torch.isfinite(loss):
                if rank == 0:
                    last = latest_checkpoint(run)
                    (run / NAN_FILE).write_text(
                        json.dumps(
                            {"step": step, "loss": float(loss), "last_checkpoint": str(last),
                             "valid_images": int(images.shape[0])}
                        )
                    )  # fmt: skip
                return
            # 5. backward, clip, step
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            step += 1
            images_since += per_worker * world

            # 6. metrics, checkpoints, fault injection
            if step % cfg.run.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                metrics = {
                    "step": step, "epoch": epoch, "lr": lr,
                    **{k: float(v) for k, v in losses.items()},
                    "logit_scale": float(raw.logit_scale_value()),
                    "logit_bias": float(raw.logit_bias) if raw.logit_bias is not None else None,
                    "images_per_s": images_since / max(now - t_last, 1e-9),
                    "invalid_images": invalid_total * world,
                    **{f"skipped_{k}": v for k, v in loop_cfg["join"].items() if k not in ("image_keys", "cache_keys", "text_keys", "joined")},
                }  # fmt: skip
                t_last, images_since = now, 0
                log.write(metrics)
            if rank == 0 and (step % cfg.run.checkpoint_every == 0 or step == cfg.steps):
                state = {"step": step, "epoch": epoch, "batch_in_epoch": consumed, "invalid_images": invalid_total,
                         "text_dim": loop_cfg["text_dim"], "config": cfg.to_dict()}  # fmt: skip
                save_checkpoint(run, raw, optimizer, state)
            _maybe_fault(cfg, run, step, rank, world)
            if step >= cfg.steps:
                break
        if consumed == 0:
            raise TrainError(
                f"the training data yielded no batch of {per_worker} rows per worker; lower batch_size"
            )
        if step < cfg.steps:
            epoch, skip = epoch + 1, 0
    log.close()


def epoch_batches(cfg: TrainConfig, plan, epoch: int, rank: int, world: int, skip: int):
    """This rank's batches of one epoch after its first ``skip``: (images, text vectors
    [B, K, D], keys, images dropped as undecodable). Images are pixels [B, 3, S, S] from the Ray Data
    pipeline, or for a heads-only run cached features ([B, P] pooled, [B, G², C] tokens) read
    here by train.cache_pairs. Either way every rank gets an equal, disjoint slice of the epoch,
    so all take the same steps."""
    import torch

    per_worker = cfg.batch_size // world
    if cfg.image_cache:
        from train.cache_pairs import iter_pair_batches
        from train.model import PATCH_TOKEN_HEADS

        tokens = cfg.model.image_head in PATCH_TOKEN_HEADS
        for text, image, keys in iter_pair_batches(plan, per_worker, cfg.seed, epoch, rank, world,
                                                   start_batch=skip):  # fmt: skip
            image = torch.from_numpy(image)
            yield image if tokens else image[:, 0], torch.from_numpy(text), keys, 0
        return

    from train.data import build_dataset, torch_collate
    from train.transforms import drop_invalid

    dataset = build_dataset(_data_config(cfg, train=True), epoch=epoch, rank=rank,
                            world_size=world, plan=plan)  # fmt: skip
    batches = dataset.iter_torch_batches(
        batch_size=per_worker, drop_last=True, collate_fn=torch_collate(),
        # rows of one cache row group arrive together: mix a few batches, reproducibly
        local_shuffle_buffer_size=4 * per_worker, local_shuffle_seed=cfg.seed * 7919 + epoch,
    )  # fmt: skip
    for consumed, batch in enumerate(batches, start=1):
        if consumed <= skip:  # resuming inside an epoch: replay the consumed batches
            continue
        batch, n_invalid = drop_invalid(batch)
        yield batch["image"], batch["text"], batch.get("key"), n_invalid


def _maybe_fault(cfg: TrainConfig, run: Path, step: int, rank: int, world: int) -> None:
    """Fault injection (tests): at run.fault_step the last worker SIGKILLs itself, once per run."""
    if cfg.run.fault_step is None or step != cfg.run.fault_step or rank != world - 1:
        return
    marker = run / FAULT_MARKER
    if marker.exists():
        return
    marker.write_text(str(step))
    os.kill(os.getpid(), signal.SIGKILL)


def render_train(r: TrainResult):
    """What `facetclip train` prints: a rich table of the finished run."""
    from rich.table import Table

    t = Table(title=f"train -> {r.run}", show_header=False)
    t.add_row("steps", str(r.steps))
    t.add_row("final loss", f"{r.final_loss:.4f}" if r.final_loss is not None else "-")
    t.add_row("images/s (last interval)", f"{r.images_per_s:,.0f}")
    t.add_row("wall time", f"{r.seconds:.0f} s")
    t.add_row("checkpoint", str(r.checkpoint))
    t.add_row("exported model", str(r.model_dir))
    return t
