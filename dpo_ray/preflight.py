"""Checks that run before any work: paths before Ray starts, resources before any actor or worker
is requested. Their point is that nothing hangs silently and nothing fails after minutes of work
for a reason that was visible at the start.

- ``check_paths``: data sources exist and have a known type, model and tokenizer folders exist
  (a name that is not a folder is taken as a hub id and left to the hub), and every output
  directory can be created and written (probed with a real file: permission bits say little to
  root, and a full or read-only disk only shows on write).

Resources are checked by ``dpo_ray.ray_env.check_resources``, before any actor or worker is
requested.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dpo_ray import storage
from dpo_ray.data.errors import PreferenceDataError
from dpo_ray.ray_env import ResourceUnavailable
from dpo_ray.tracking import check_trackers, mlflow_uri


# What the CLI prints as one ``error:`` line (exit 2) instead of a traceback.
USER_ERRORS = (PreferenceDataError, ValueError, OSError, ResourceUnavailable)


def _local(path: str) -> Path | None:
    """A local path (``file://`` allowed), or None for an object-store URI."""
    return None if storage.is_remote(path) else storage.local_path(path)


def check_writable_dir(path: str, field: str) -> None:
    """``path`` can be created (if missing) and a file written in it."""
    folder = _local(path)
    if folder is None:  # a marker object written and deleted: bucket, credentials, permission
        storage.check_writable(path, field)
        return
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
    if storage.is_remote(name):  # a model (or run directory) in object storage
        if not storage.exists(storage.join(name, "config.json") if need_config else name):
            raise FileNotFoundError(f"{field}={name!r}: nothing there"
                                    + (" with a config.json" if need_config else ""))
        return
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
    from dpo_ray.data.sources import hub_dataset_id, list_source

    if isinstance(source, str) and hub_dataset_id(source) is None:
        list_source(source, file_format)


def check_paths(config, source=None) -> None:
    """All paths of a ``RunConfig`` (data, reference, train; eval when present). ``source``: an
    in-memory source passed from Python instead of ``data.source``."""
    data, ref, train = config.data, config.reference, config.train
    if source is None:
        check_data_source(data.source, "data.source", data.file_format)
    if data.eval_source is not None:
        check_data_source(data.eval_source, "data.eval_source", data.file_format)
    check_model_path(data.tokenizer, "data.tokenizer", need_config=False)
    check_model_path(ref.model, "reference.model")
    if train.model:
        check_model_path(train.model, "train.model")
    if train.objective == "dpo":  # a reward model has no reference values to cache
        check_writable_dir(ref.cache_dir, "reference.cache_dir")
    check_writable_dir(train.output_dir, "train.output_dir")
    check_trackers(train.report_to, "train.report_to")
    if "mlflow" in train.report_to:
        mlflow_uri(train.tracking_uri, train.output_dir, "train.report_to")
    if config.eval is not None:
        check_writable_dir(config.eval.output_dir, "eval.output_dir")
        # evaluate() checks it too, but a pipeline reaches evaluate() only after training
        check_trackers(config.eval.report_to, "eval.report_to")


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
