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


def test_a_local_ray_has_ray_train_poll_its_workers_often(monkeypatch):
    """Ray Train ends a fit only at its controller's polls of the workers, every 2 s by
    default; a local Ray polls every 0.2 s, and Ray Train hands the driver's value to its
    controller and workers (its own propagation list says so)."""
    import ray
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from store.cluster import LOCAL_TRAIN_POLL_S, TRAIN_POLL_ENV

    monkeypatch.setenv(TRAIN_POLL_ENV, "unset below; restored after the test")
    monkeypatch.delenv(TRAIN_POLL_ENV)
    ray.shutdown()
    assert init_ray(None, 2)
    try:
        assert os.environ[TRAIN_POLL_ENV] == LOCAL_TRAIN_POLL_S
        assert get_env_vars_to_propagate()[TRAIN_POLL_ENV] == LOCAL_TRAIN_POLL_S
    finally:
        ray.shutdown()


def test_a_poll_interval_the_user_set_is_kept(monkeypatch):
    import ray

    from store.cluster import TRAIN_POLL_ENV

    monkeypatch.setenv(TRAIN_POLL_ENV, "5")
    ray.shutdown()
    assert init_ray(None, 2)
    try:
        assert os.environ[TRAIN_POLL_ENV] == "5"
    finally:
        ray.shutdown()
