"""Connecting to Ray: a cluster when an address is given, otherwise a local instance.

Ray 2.60 on a 2-core machine hangs silently when Train workers hold every CPU and Ray Data
tasks cannot schedule, so a local instance advertises at least ``MIN_LOCAL_CPUS`` logical CPUs:
our stages are I/O- and BLAS-bound, and oversubscribing logical CPUs is safe where starving a
stage is not.
"""

from __future__ import annotations

import os

import ray

MIN_LOCAL_CPUS = 4


def init_ray(address: str | None = None) -> None:
    """``ray.init`` once per process; ``address`` (or ``RAY_ADDRESS``) joins a cluster."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=max(MIN_LOCAL_CPUS, os.cpu_count() or 1), include_dashboard=False)


def root_cause(err: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers: a ``RayTaskError`` from a task or actor carries
    the original as ``cause`` (its message is Ray's stack text); Ray Train's ``WorkerGroupError``
    holds each rank's exception in ``worker_failures`` (rank 0's is taken) and ``ControllerError``
    its own in ``controller_failure``. Our own errors should reach the user as themselves."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None)
        failures = getattr(err, "worker_failures", None)  # Ray Train's WorkerGroupError
        if isinstance(failures, dict) and failures:
            inner = failures[min(failures)]
        inner = getattr(err, "controller_failure", inner)  # Ray Train's ControllerError
        if isinstance(inner, BaseException):
            err = inner
            continue
        if isinstance(err, ray.exceptions.RayError) and err.__cause__ is not None:
            err = err.__cause__
            continue
        break
    return err
