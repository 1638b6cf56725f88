"""Starting or joining Ray: the one place both stages (and sweeps) do it, and the one place
that says what a Ray failure means.

``import ray`` happens inside the functions: importing store/ never needs Ray.

Memory of a local Ray (one machine, possibly shared with other jobs and other runs): the
object store is capped (``object_store_bytes``: Ray's default takes 30% of the machine's
memory per Ray instance, so two runs would claim 60% between them), and of the workers that
sit idle only as many are kept as there are logical CPUs beyond the work's own
(``idle_workers``; Ray's default keeps one per logical CPU, each holding the libraries its
last task imported). The memory monitor stays on: when the machine's memory use passes its
threshold it kills a worker, and ``ray_failure_cause`` says so in one line with the setting
to change.
"""

from __future__ import annotations

import logging
import os
import re

# A local Ray's object store: enough for Ray Data's blocks of decoded images in flight (it
# spills to disk past this), small beside the machine.
OBJECT_STORE_FRACTION = 0.05
OBJECT_STORE_MIN = 256 << 20
OBJECT_STORE_MAX = 2 << 30

# The settings named in an out-of-memory message (environment variables Ray reads at start).
MEMORY_THRESHOLD_ENV = "RAY_memory_usage_threshold"
MEMORY_MONITOR_ENV = "RAY_memory_monitor_refresh_ms"

# How often Ray Train's controller polls its workers (Ray's default: 2 s). A fit ends only at
# polls after its workers return: on 2 cores every fit of a local Ray (the demo's six, every
# test's) ended 4.8 s after its workers did, 0.3-0.6 s with 0.2 s. A local Ray has a handful
# of workers, so polling them often costs nothing; a joined cluster keeps Ray's default (a
# poll is one call per worker), and a value the user set is kept everywhere.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
LOCAL_TRAIN_POLL_S = "0.2"


def object_store_bytes(total_memory: int | None = None) -> int:
    """The object store a local Ray gets: 5% of the machine's memory, within 256 MB..2 GB."""
    if total_memory is None:
        total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(max(total_memory * OBJECT_STORE_FRACTION, OBJECT_STORE_MIN), OBJECT_STORE_MAX))


def init_ray(address: str | None, cpus_needed: int, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address``, or start a local Ray; True when this call started
    (or joined) it, False when Ray was already initialised in this process.

    A local Ray gets more logical CPUs than the work needs (at least 4; ``num_cpus`` when
    given), whatever the core count: on a 2-core machine Ray Data's tasks and the driver's own
    would otherwise queue behind the actors or training workers that hold every CPU. Its
    memory is bounded as the module docstring says.
    """
    import ray

    if ray.is_initialized():
        return False
    # Ray 2.60 announces on every local start that it turned token authentication on (its
    # secure default, which stays on); the line is noise on a user's terminal.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=True,
                 logging_level="WARNING")  # fmt: skip
    else:
        # Read by Ray Train from this process's environment when a trainer starts (its
        # controller and workers get the driver's value), so setting it here is enough.
        os.environ.setdefault(TRAIN_POLL_ENV, LOCAL_TRAIN_POLL_S)
        cpus = num_cpus or max(4, cpus_needed + 2)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level="WARNING",
                 object_store_memory=object_store_bytes(),
                 _system_config={"num_workers_soft_limit": idle_workers(cpus, cpus_needed)})  # fmt: skip
    return True


def idle_workers(cpus: int, cpus_needed: int) -> int:
    """How many idle Ray workers a local Ray keeps (beyond them, one idle for a second exits):
    one per logical CPU that the work's own workers leave free, which is how many of Ray Data's
    tasks run at once. Training starts a short Ray Data pipeline every epoch; had its task
    workers exited in between (the limit was 0), each epoch began by starting Python processes
    that import the task's libraries again: measured on 2 cores (demo flame run, 150 steps,
    2 training workers), 0 kept: 150-155 images/s, 82-83 s; 2 kept: 183-192, 73-74 s, with
    the same losses; 4 kept was no faster than 2."""
    return max(1, cpus - cpus_needed)


# --- what a Ray failure means -----------------------------------------------------------------

_OOM = re.compile(r"running low on memory|NODE_OUT_OF_MEMORY|OutOfMemoryError")
_USAGE = re.compile(
    r"was ([\d.]+\s*[KMGT]?B) / ([\d.]+\s*[KMGT]?B) \(([\d.]+)\), which exceeds the memory "
    r"usage threshold of ([\d.]+)"
)


def _exceptions(e: BaseException) -> list[BaseException]:
    """``e`` and every exception it carries (causes, contexts, Ray's wrapped causes, Ray
    Train's per-worker failures), outermost first."""
    seen, out, todo = set(), [], [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen or not isinstance(x, BaseException):
            continue
        seen.add(id(x))
        out.append(x)
        todo += list(getattr(x, "worker_failures", {}).values())
        todo += [getattr(x, "controller_failure", None), getattr(x, "cause", None)]
        todo += [x.__cause__, x.__context__]
    return out


def _first_line(x: BaseException) -> str:
    for line in str(x).splitlines():
        line = line.strip()
        if line and not line.startswith(("ray::", "Traceback", "File ")):
            return line
    return ""


def ray_failure_cause(e: BaseException) -> str:
    """One line for an exception from a Ray run (``trainer.fit()``, a Tune run, an actor):
    a kill by Ray's memory monitor, said plainly with the setting to change; a user error
    raised in a worker, its own message; otherwise the type and first line of the innermost
    cause (never Ray's whole text)."""
    from store.errors import FacetclipError

    chain = _exceptions(e)
    text = "\n".join(f"{type(x).__name__}: {x}" for x in chain)
    if _OOM.search(text):
        usage = _USAGE.search(text)
        seen = (
            f" (this machine's memory in use was {usage[1]} of {usage[2]}, {usage[3]}; the "
            f"threshold is {usage[4]}, and other jobs' memory counts too)"
            if usage
            else ""
        )
        return (
            f"Ray's memory monitor killed a worker because the machine was low on memory{seen}. "
            "Free memory (other runs on this machine), or make the run smaller (fewer "
            "run.workers, a smaller batch_size or data.image_size); or raise Ray's threshold "
            f"with {MEMORY_THRESHOLD_ENV}=0.98 (or turn the monitor off with "
            f"{MEMORY_MONITOR_ENV}=0, leaving it to the kernel)"
        )
    for x in reversed(chain):
        if isinstance(x, FacetclipError):
            return str(x)
    for x in reversed(chain):
        line = _first_line(x)
        if line:
            return f"{type(x).__name__}: {line}"
    return type(e).__name__
