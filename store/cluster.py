"""Starting or joining Ray: the one place both stages (and sweeps) do it.

``import ray`` happens inside the function: importing store/ never needs Ray.
"""

from __future__ import annotations


def init_ray(address: str | None, cpus_needed: int, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address``, or start a local Ray; True when this call started
    (or joined) it, False when Ray was already initialised in this process.

    A local Ray gets more logical CPUs than the work needs (at least 4; ``num_cpus`` when
    given), whatever the core count: on a 2-core machine Ray Data's tasks and the driver's own
    would otherwise queue behind the actors or training workers that hold every CPU.
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=True,
                 logging_level="WARNING")  # fmt: skip
    else:
        ray.init(num_cpus=num_cpus or max(4, cpus_needed + 2), include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level="WARNING")  # fmt: skip
    return True
