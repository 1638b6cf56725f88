"""store.cluster: the local Ray that both stages start keeps the idle workers its data tasks use."""

import os
import time

from store.cluster import idle_workers, init_ray


def test_idle_workers_are_the_logical_cpus_the_work_leaves_free():
    assert idle_workers(4, 2) == 2  # the demo: 2 training workers on 4 logical CPUs
    assert idle_workers(6, 1) == 5
    assert idle_workers(4, 4) == 1  # a sweep that fills every CPU still keeps one


def test_a_task_worker_outlives_an_idle_gap_between_epochs():
    """Training runs a short Ray Data pipeline every epoch; the workers of one epoch's tasks
    must still be there for the next (Ray lets an idle worker beyond its limit go after 1 s,
    and starting one costs seconds on 2 cores)."""
    import ray

    ray.shutdown()
    assert init_ray(None, 2)  # what train.loop.init_ray does for 2 training workers
    try:

        @ray.remote(num_cpus=1)
        def pid() -> int:
            return os.getpid()

        worker = ray.get(pid.remote())
        time.sleep(4)  # idle for longer than Ray's 1 s before it kills a worker beyond the limit
        os.kill(worker, 0)  # signal 0 checks only: ProcessLookupError if Ray let it go
    finally:
        ray.shutdown()
