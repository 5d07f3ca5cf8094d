"""Connecting to Ray, and asking it for actors and workers it can place.

- ``init_ray``: a cluster when an address is given, otherwise a local instance. Quiet unless
  ``DPO_RAY_VERBOSE=1`` (``--verbose``): worker output is not forwarded to the console and Ray's
  own INFO logs are not printed (both stay in Ray's session logs, whose folder ``ray_logs()``
  names); our stages draw their own progress (``dpo_ray.console``). Errors still surface in full,
  as exceptions.
- ``check_resources``: a request that no node of the cluster can ever place (a GPU on a CPU-only
  cluster, more workers than CPUs, a custom resource no node has) fails at once and names the
  missing resource. Ray would otherwise queue it forever without a word. With an autoscaler the
  request may yet be placed on a new node: we print ``waiting for ...`` every 30 s and stop after
  ``placement.wait_timeout_s``.
- ``actor_pool_kwargs``: how every actor pool (a ``config.Pool``) is requested from Ray Data;
  ``task_pool_kwargs`` the same for plain tasks (a ``config.Tasks``).

Ray 2.60 on a 2-core machine hangs silently when Train workers hold every CPU and Ray Data
tasks cannot schedule, so a local instance advertises at least ``MIN_LOCAL_CPUS`` logical CPUs:
our stages are I/O- and BLAS-bound, and oversubscribing logical CPUs is safe where starving a
stage is not.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import ray

from dpo_ray.console import verbose

MIN_LOCAL_CPUS = 4
_WAIT_REPORT_S = 30.0


class ResourceUnavailable(RuntimeError):
    """The cluster cannot place what a stage asks for."""


def init_ray(address: str | None = None) -> None:
    """``ray.init`` once per process; ``address`` (or ``RAY_ADDRESS``) joins a cluster."""
    if ray.is_initialized():
        return
    quiet = not verbose()
    if quiet:
        _quiet_driver()
    # Worker output (every rank's prints, Ray Train's per-report lines, raylet warnings) stays in
    # the session's log files: the driver shows progress itself.
    options = {"log_to_driver": not quiet, "logging_level": logging.WARNING if quiet else logging.INFO}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **options)
    else:
        ray.init(num_cpus=max(MIN_LOCAL_CPUS, os.cpu_count() or 1), include_dashboard=False, **options)
    if quiet:
        print(f"Ray's logs: {ray_logs()} (DPO_RAY_VERBOSE=1 shows them here)", flush=True)


def keep_order() -> None:
    """Ray Data hands blocks on in their input order in this process (``preserve_order``), so a
    stage's output order is its input's, not the order its tasks or actors finished in: the data
    stage keeps the source's row order, the reference cache is written in it whatever the pool
    size, and training batches (training/batching.py) depend on the data and the seed only."""
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = True


def ray_logs() -> str:
    """The folder of this Ray session's log files (every worker's output)."""
    try:
        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except AttributeError:  # a driver of a remote cluster has no local session folder
        return "the head node's /tmp/ray/session_latest/logs"


def _quiet_driver() -> None:
    """Ray Data's own progress bars and plan/INFO lines off (our stages draw theirs), and the
    Python warnings Ray raises about its own API choices filtered out of the console."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # It would say, once per process, that we turned Ray Data's bars off (ours replace them).
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Pools sized to their blocks (actor_pool_kwargs) never need to grow: Ray's warning that they
    # cannot would only alarm.
    logging.getLogger("ray.data._internal.actor_autoscaler.default_actor_autoscaler").addFilter(
        _not_a_scale_up_warning)  # one function: addFilter keeps it once however often we start
    warnings.filterwarnings("ignore", module=r"ray(\..*)?$")
    _route_raylet_messages()


def _not_a_scale_up_warning(record: logging.LogRecord) -> bool:
    return "will not allow it to scale up" not in record.getMessage()


def _route_raylet_messages() -> None:
    """Messages the raylet pushes to the driver (worker-pool warnings, a worker killed for memory)
    are printed on stdout by a Ray thread, with no setting to change that. Quiet, they go to
    stderr, except Ray's "N worker processes have been started" warning: on a 2-core machine
    every actor pool triggers it, and it asks nothing of the user (the session log keeps it)."""
    from ray._private import worker as ray_worker

    printer = ray_worker.print_to_stdstream
    if getattr(printer, "routed_by_dpo_ray", False):
        return

    def routed(data, ignore_prefix):
        if data.get("pid") == "raylet":
            lines = [line for line in data["lines"] if "worker processes have been started" not in line]
            if not lines:
                return
            data = {**data, "lines": lines, "is_err": True}
        printer(data, ignore_prefix)

    routed.routed_by_dpo_ray = True
    ray_worker.print_to_stdstream = routed


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


def _autoscaler_present() -> bool:
    """Whether a cluster autoscaler could add nodes. ``DPO_RAY_AUTOSCALER=1``/``0`` decides when
    set. Otherwise: a v2 autoscaler sets a flag in the GCS key-value store; a v1 one writes its
    status there. Every head (even ``ray.init()`` on a laptop) runs a v1 monitor, but without a
    cluster config it is read-only: each node is then its own node type named ``node_<id>``."""
    forced = os.environ.get("DPO_RAY_AUTOSCALER")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        import json

        import ray._raylet
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        if _internal_kv_get(ray._raylet.GCS_AUTOSCALER_V2_ENABLED_KEY) == b"1":
            return True
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        if not status:
            return False
        mapping = json.loads(status).get("autoscaler_report", {}).get("node_type_mapping") or {}
        return any(node_type != f"node_{node_id}" for node_id, node_type in mapping.items())
    except Exception:  # noqa: BLE001 - an older or odd cluster: assume none, fail fast
        return False


def _units_that_fit(per_unit: dict[str, float], label_selector: dict[str, str]) -> tuple[int, list]:
    """How many ``per_unit`` bundles the alive nodes could hold at once (each bundle on one node),
    and each node's total resources (for the message)."""

    total, nodes = 0, []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        labels = node.get("Labels", {}) or {}
        nodes.append({k: v for k, v in have.items() if not k.startswith("node:")})
        if any(not str(v).startswith(("!", "in(", "!in(")) and labels.get(k) != v
               for k, v in label_selector.items()):
            continue
        counts = [int(have.get(k, 0.0) // v + 1e-9) for k, v in per_unit.items() if v > 0]
        total += min(counts) if counts else 10**6
    return total, nodes


def check_resources(what: str, per_unit: dict[str, float], count: int, placement=None) -> None:
    """Fail (or, with an autoscaler, wait) unless ``count`` bundles of ``per_unit`` fit."""
    per_unit = {k: float(v) for k, v in per_unit.items() if v}
    selector = {}
    timeout = 600.0
    if placement is not None:
        per_unit.update({k: float(v) for k, v in placement.resources.items() if v})
        if placement.accelerator_type:
            per_unit[f"accelerator_type:{placement.accelerator_type}"] = 0.001
        selector = dict(placement.label_selector)
        timeout = placement.wait_timeout_s
    fits, nodes = _units_that_fit(per_unit, selector)
    if fits >= count:
        return
    need = f"{what} needs {count} x {per_unit}" + (f" on nodes labelled {selector}" if selector else "")
    if not _autoscaler_present():
        missing = sorted(k for k in per_unit if not any(k in n for n in nodes))
        hint = f"no node has {', '.join(missing)}" if missing else f"the nodes can hold only {fits}"
        raise ResourceUnavailable(f"{need}, but {hint} (nodes: {nodes}) and there is no "
                                  "autoscaler to add one. Lower the request or add such nodes.")
    # The autoscaler scales for demand it sees: ask for the bundles now, so nodes start while we
    # wait, and withdraw the request once they are there (the stage's own request takes over).
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[per_unit] * count)
    started = time.monotonic()
    try:
        while fits < count:
            waited = time.monotonic() - started
            if waited > timeout:
                raise ResourceUnavailable(f"{need}; waited {waited:.0f} s for the autoscaler "
                                          f"(placement.wait_timeout_s={timeout:g}); {fits} fit now")
            print(f"waiting for {what}: {count} x {per_unit}, {fits} fit now "
                  f"({waited:.0f} s of {timeout:g} s)", flush=True)
            time.sleep(min(_WAIT_REPORT_S, timeout - waited + 0.1))
            fits, nodes = _units_that_fit(per_unit, selector)
    finally:
        request_resources(bundles=[])


def task_pool_kwargs(tasks, what: str) -> dict:
    """``Dataset.map_batches`` keyword arguments for plain Ray tasks (a ``config.Tasks``): CPUs per
    task, how many at once, placement; first checks that the cluster can hold one task."""
    from ray.data import TaskPoolStrategy

    if ray.is_initialized():
        check_resources(f"{what} tasks", {"CPU": tasks.num_cpus_per_task}, 1, tasks.placement)
    return {"compute": TaskPoolStrategy(size=tasks.max_tasks), "num_cpus": tasks.num_cpus_per_task,
            **tasks.placement.ray_data_kwargs()}


def actor_pool_kwargs(pool, what: str, blocks: int | None = None) -> dict:
    """``Dataset.map_batches`` keyword arguments for an actor pool (a ``config.Pool``): its size
    (min/max actors), CPUs/GPUs per actor and its placement. One place decides how every pool is
    requested, and first checks that the cluster can hold it.

    ``blocks``, when the caller knows how many blocks the pool will get: the pool starts with that
    many actors (within min/max), all loading their model at once. Ray Data's autoscaler only grows
    a pool whose actors are busy, and an actor accepts several blocks at a time, so a pool of up to
    2 actors scored 2 blocks on 1 actor, one after the other (measured: 2 x 18 s on SmolLM2).
    """
    from ray.data import ActorPoolStrategy

    low, high = pool.min_actors, pool.max_actors
    # Ray would queue a pool no node can hold forever; fail (or wait for an autoscaler) instead.
    # (Every stage connects to Ray before it builds a pool; without a connection there is no
    # cluster to ask yet.)
    if ray.is_initialized():
        check_resources(f"{what} actor pool",
                        {"CPU": pool.num_cpus_per_actor, "GPU": pool.num_gpus_per_actor}, low,
                        pool.placement)
    if blocks is None:
        strategy = ActorPoolStrategy(min_size=low, max_size=high)
    else:
        # As many actors as blocks from the start, and one block in flight per actor: a block
        # waits for a free actor instead of queueing behind a busy one while another still loads
        # its model. (No growth is needed past that, so Ray's warning that one block per actor
        # cannot trigger scale-up does not apply.)
        strategy = ActorPoolStrategy(min_size=low, max_size=high, initial_size=min(max(blocks, low), high),
                                     max_tasks_in_flight_per_actor=1)
    return {"compute": strategy,
            "num_cpus": pool.num_cpus_per_actor, "num_gpus": pool.num_gpus_per_actor,
            **pool.placement.ray_data_kwargs()}
