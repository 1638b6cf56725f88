"""Shards of a cache computed by N Ray actors and committed by one driver: the exactly-once
machinery every cache writer shares (``embed --engines N``, ``embed-images --engines N``).

The driver (the calling process) owns the queue of shards still to do (the caller's ``todo``
iterator: finished shards are already left out). It hands one shard to each idle actor; the
actor computes it, writes the shard's files under temporary names in the cache itself
(``Cache.stage_shard``: shards never travel back through the object store) and returns the
small ``StagedShard`` with its counts. The driver alone commits (``commit``: rename +
manifest), so the manifest has one writer and no shard can be recorded twice.

An actor that dies (its process killed, its node lost) loses only its shard in flight: the
driver puts that shard back at the head of the queue, starts a replacement actor, and after
``max_failures`` deaths stops with an error that says what happened (finished shards stay
committed; the same command resumes). Files a dead actor staged are removed by the caller's
``Cache.clean_temporaries`` at the end of the run, or by the next run's ``Cache.create``.

The in-process path (one writer, no Ray) shares the crash-test hook ``kill_after_shards``.
``import ray`` happens inside functions only: importing store/ never needs Ray.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from store.errors import FacetclipError, InputError

# Fault injection for crash tests: the process SIGKILLs itself right after its N-th shard
# landed in the manifest (``kill_after_shards``).
KILL_AFTER_SHARDS_ENV = "FACETCLIP_KILL_AFTER_SHARDS"
# Fault injection for tests: actor 0 (never a replacement) SIGKILLs itself right after staging
# its N-th shard, before handing it back, so that shard is lost in flight.
KILL_ACTOR_ENV = "FACETCLIP_KILL_ACTOR_AFTER_SHARDS"


def kill_after_shards(shards_written: int) -> None:
    """Crash-test hook of a cache writer: SIGKILL this process once ``shards_written``
    reaches ``$FACETCLIP_KILL_AFTER_SHARDS``."""
    n = os.environ.get(KILL_AFTER_SHARDS_ENV)
    if n and shards_written >= int(n):
        os.kill(os.getpid(), signal.SIGKILL)


def actor_kill_after() -> int | None:
    """``$FACETCLIP_KILL_ACTOR_AFTER_SHARDS`` (the first actor's crash-test hook), or None."""
    n = os.environ.get(KILL_ACTOR_ENV)
    return int(n) if n else None


def kill_actor_after(shards: int, kill_after: int | None) -> None:
    """An actor's crash-test hook: SIGKILL itself after staging its ``kill_after``-th shard."""
    if kill_after is not None and shards >= kill_after:
        os.kill(os.getpid(), signal.SIGKILL)


def check_cluster(n: int, unit: str, what: str) -> None:
    """InputError unless the Ray cluster has ``n`` of ``unit`` (CPU or GPU) for the actors."""
    import ray

    have = ray.cluster_resources().get(unit, 0)
    if have < n:
        raise InputError(
            f"--engines {n} needs {n} {unit}s (one per {what}); the Ray cluster has "
            f"{have:g}. Use --engines {max(1, int(have))} or add nodes."
        )


def run_shard_actors(
    start_actor: Callable[[int], Any],
    n: int,
    todo: Iterator[tuple[int, Any]],
    commit: Callable[[tuple[int, Any], Any], None],
    max_failures: int,
    error: type[FacetclipError],
    what: str = "engine actor",
) -> int:
    """Compute every shard of ``todo`` on ``n`` actors; returns how many actors died.

    ``start_actor(actor_id)`` returns a started Ray actor with a method ``stage(index,
    payload)`` that stages the shard and returns ``(StagedShard, stats)``. ``commit(item,
    result)`` runs here, in the driver, once per finished shard (``Cache.commit_shard``,
    counts, progress). A ``FacetclipError`` raised inside an actor is raised again here,
    typed; an actor that fails to start, or more than ``max_failures`` deaths, is ``error``.
    """
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    retry: deque[tuple[int, Any]] = deque()  # shards of dead actors go first

    def next_shard() -> tuple[int, Any] | None:
        return retry.popleft() if retry else next(todo, None)

    ids = itertools.count()
    actors: dict[int, Any] = {}

    def start() -> int:
        aid = next(ids)
        actors[aid] = start_actor(aid)
        return aid

    failures = 0
    try:
        idle = [start() for _ in range(n)]
        running: dict = {}  # ObjectRef -> (actor id, (index, payload))
        while True:
            while idle and (item := next_shard()) is not None:
                aid = idle.pop()
                running[actors[aid].stage.remote(*item)] = (aid, item)
            if not running:
                break
            [ref], _ = ray.wait(list(running), num_returns=1)
            aid, item = running.pop(ref)
            try:
                result = ray.get(ref)
            except RayTaskError as e:  # an exception inside stage: not worth a retry
                if isinstance(e.cause, FacetclipError):
                    raise e.cause from None
                raise
            except RayActorError as e:
                if e.actor_init_failed:
                    raise error(f"an {what} failed to start: {str(e)[-1500:]}") from None
                # The actor is gone with its shard in flight: that shard goes back to the
                # head of the queue and a replacement actor takes the dead one's place.
                failures += 1
                ray.kill(actors.pop(aid))
                retry.appendleft(item)
                if failures > max_failures:
                    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                    raise error(
                        f"{failures} {what}(s) died (limit {max_failures}); the last: "
                        f"{lines[-1][:300] if lines else e}\nThe shards finished so far are "
                        "committed; rerun the same command to resume."
                    ) from None
                idle.append(start())
                continue
            commit(item, result)
            idle.append(aid)
    finally:
        for actor in actors.values():
            ray.kill(actor)
    return failures
