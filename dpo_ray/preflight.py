"""Checks that run before any work: paths before Ray starts, resources before any actor or worker
is requested. Their point is that nothing hangs silently and nothing fails after minutes of work
for a reason that was visible at the start.

- ``check_paths``: data sources exist and have a known type, model and tokenizer folders exist
  (a name that is not a folder is taken as a hub id and left to the hub), and every output
  directory can be created and written (probed with a real file: permission bits say little to
  root, and a full or read-only disk only shows on write).
- ``check_resources``: a request that no node of the cluster can ever place (a GPU on a CPU-only
  cluster, more workers than CPUs, a custom resource no node has) fails at once and names the
  missing resource. Ray would otherwise queue it forever without a word. With an autoscaler the
  request may yet be placed on a new node: we print ``waiting for ...`` every 30 s and stop after
  ``placement.wait_timeout_s``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from dpo_ray.data.formats import PreferenceDataError


class ResourceUnavailable(RuntimeError):
    """The cluster cannot place what a stage asks for."""


# What the CLI prints as one ``error:`` line (exit 2) instead of a traceback.
USER_ERRORS = (PreferenceDataError, ValueError, OSError, ResourceUnavailable)
_WAIT_REPORT_S = 30.0


def _local(path: str) -> Path | None:
    """A local path (``file://`` allowed), or None for an object-store URI."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    if "://" in path:
        return None
    return Path(path).expanduser().absolute()


def check_writable_dir(path: str, field: str) -> None:
    """``path`` can be created (if missing) and a file written in it."""
    folder = _local(path)
    if folder is None:
        return  # object stores are checked by their first write
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{field}={path!r}: {existing} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dpo_ray-write-check-"):
            pass
    except OSError as err:
        raise PermissionError(err.errno, f"{field}={path!r} is not writable: "
                              f"{err.strerror or err}") from None


def check_model_path(name: str, field: str, need_config: bool = True) -> None:
    """A model or tokenizer: an existing folder (with ``config.json`` for a model), or a hub id.
    A name that can only be a path (absolute, ``./``, ``~``, or with more than one ``/``) must
    exist: Hugging Face would otherwise say "Repo id must be in the form ..."."""
    folder = Path(os.path.expanduser(name))
    if folder.exists():
        if not folder.is_dir():
            raise NotADirectoryError(f"{field}={name!r} is a file; give a model folder or a hub id")
        if need_config and not (folder / "config.json").exists():
            raise FileNotFoundError(f"{field}={name!r}: the folder has no config.json, so it is "
                                    "not a Hugging Face model folder")
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith("/") or not name:
        raise FileNotFoundError(f"{field}={name!r}: no such folder (and not a hub id of the form "
                                "'org/name')")


def check_data_source(source, field: str, file_format: str = "auto") -> None:
    if isinstance(source, str) and not source.startswith("hf://"):
        from dpo_ray.data.sources import list_source

        list_source(source, file_format)


def check_paths(config, source=None) -> None:
    """All paths of a ``RunConfig`` (data, reference, train; eval when present). ``source``: an
    in-memory source passed from Python instead of ``data.source``."""
    data, ref, train = config.data, config.reference, config.train
    if source is None:
        check_data_source(data.source, "data.source", data.file_format)
    check_model_path(data.tokenizer, "data.tokenizer", need_config=False)
    check_model_path(ref.model, "reference.model")
    if train.model:
        check_model_path(train.model, "train.model")
    if train.objective == "dpo":  # a reward model has no reference values to cache
        check_writable_dir(ref.cache_dir, "reference.cache_dir")
    check_writable_dir(train.output_dir, "train.output_dir")
    if config.eval is not None:
        check_writable_dir(config.eval.output_dir, "eval.output_dir")


def check_eval_paths(config) -> None:
    """An ``EvalConfig``: prompts, every model it names, and its output directory."""
    check_data_source(config.prompts, "eval.prompts")
    for i, policy in enumerate(config.policies):
        check_model_path(policy, f"eval.policies[{i}]", need_config=False)  # run dirs too
    if config.baseline not in ("reference", "chosen"):
        check_model_path(config.baseline, "eval.baseline", need_config=False)
    if config.reference:
        check_model_path(config.reference, "eval.reference")
    for judge in config.judges:
        if judge.kind != "function":
            check_model_path(judge.name, f"judge {judge.name!r}")
    check_writable_dir(config.output_dir, "eval.output_dir")


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
    import ray

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
