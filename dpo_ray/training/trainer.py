"""Driver side of training: run directory, reference cache, ``TorchTrainer``, final artifacts.

    from dpo_ray.training import train
    result = train(run_config)          # or: dpo-ray train --config run.yaml key=value ...

Run directory ``<train.output_dir>/<train.run_name>`` (a path every node mounts, or an object-store
URI: the driver and rank 0 then write into local mirrors and upload, see ``dpo_ray/storage.py``,
and Ray Train writes the checkpoints there itself) holds ``config.yaml`` (resolved),
``reference.json`` (cache key and path), ``versions.json``, ``metrics.jsonl``, ``metrics.png``,
``tracking.json`` and ``tensorboard/`` with ``train.report_to`` (see ``dpo_ray/tracking.py``),
``restarts.jsonl`` (one line each time the workers restored a checkpoint: after a failure, or
``train.resume``), Ray Train's checkpoints under ``ray_train/`` and the final model in ``final_model/`` (a LoRA run: the adapter there, and with ``train.peft.merge`` the
merged model in ``final_model_merged/``).
A new run never resumes an old one: an existing run directory is an error unless
``train.resume=true``, which continues it from its latest checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from ray.data import DataContext
from ray.train.torch import TorchTrainer

from dpo_ray import storage
from dpo_ray.config import RunConfig, config_dict, save_config
from dpo_ray.console import follow_steps, stage
from dpo_ray.data import prepare_pairs, split_train_eval
from dpo_ray.preflight import check_paths
from dpo_ray.ray_env import check_resources, keep_order
from dpo_ray.reference import ensure_reference
from dpo_ray.reference.cache import model_fingerprint
from dpo_ray.training.checkpoint import NOT_MIRRORED, RAY_TRAIN_NAME, STATE_FILE, STEP_FILE
from dpo_ray.tracking import Tracker, TrackingPlan, plan_tracking
from dpo_ray.training.loop import (PAIR_TRAIN_COLUMNS, TRAIN_COLUMNS, WorkerPlan, count_steps,
                                  train_loop_per_worker)



@dataclass
class TrainResult:
    run_dir: Path  # the run directory on this machine (for an object-store run: its local mirror)
    final_model: Path
    metrics: list[dict]
    reference_key: str | None  # None for a reward model (no reference)
    tracking: TrackingPlan | None = None  # where train.report_to logged the run
    reference_cache_hit: bool | None = None  # the reference values were read from the cache
    run_uri: str = ""  # where the run lives: str(run_dir), or its s3:// (gs://, ...) URI

    def __post_init__(self):
        self.run_uri = self.run_uri or str(self.run_dir)


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The checkpoint with the highest step among all attempts of a run (``dpo_state.json``): a
    folder, or a URI for a run in object storage."""
    found = run_checkpoints(run_dir)
    return max(found)[1] if found else None


def run_checkpoints(run_dir: str | Path) -> list[tuple[int, str]]:
    """(step, folder or URI) of every checkpoint of every attempt of a run."""
    return [(json.loads(storage.read_text(path))["step"], path.rsplit("/", 1)[0])
            for path in storage.find(run_dir, f"{RAY_TRAIN_NAME}*/checkpoint_*/{STEP_FILE}")]


def export_model(checkpoint: Path, dest: Path) -> None:
    """A checkpoint as a plain model folder: everything but the resume state (optimizer, step)."""
    shutil.copytree(checkpoint, dest, ignore=shutil.ignore_patterns(STATE_FILE, STEP_FILE))


def _run_dir(config: RunConfig) -> tuple[Path, str]:
    """(the run directory on this machine, the run directory as configured: path or URI)."""
    t = config.train
    name = t.run_name or time.strftime("dpo-%Y%m%d-%H%M%S")
    run = storage.join(t.output_dir, name)
    run_dir, remote = storage.local_dir(run), storage.is_remote(run)
    if t.resume and latest_checkpoint(run) is None:
        raise FileNotFoundError(f"train.resume=true but {run} has no checkpoint to resume from")
    if not t.resume and storage.exists(run):
        if latest_checkpoint(run) is not None or storage.exists(storage.join(run, "final_model")):
            raise FileExistsError(f"{run} exists: set train.resume=true to continue that run, "
                                  "or choose another train.run_name")
        # A run that failed before its first checkpoint has nothing to resume: it must not block
        # the corrected re-run. Its files are kept aside, not deleted (in object storage, where a
        # rename is a copy of everything, they are overwritten file by file instead).
        if remote:
            print(f"{run} held no checkpoint (an earlier attempt failed); its files will be "
                  "replaced, starting fresh", flush=True)
        else:
            aside = run_dir.with_name(f"{run_dir.name}.failed-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir.rename(aside)
            print(f"{run_dir} held no checkpoint (an earlier attempt failed); its files are now in "
                  f"{aside}, starting fresh", flush=True)
    if remote:  # the local mirror starts as the run is: empty, or the resumed run's files
        shutil.rmtree(run_dir, ignore_errors=True)
        if t.resume:
            storage.pull(run, run_dir, exclude=(f"{RAY_TRAIN_NAME}*",))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, run


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl, one entry per step (a step re-run after a restart keeps its last record)."""
    path = Path(run_dir) / "metrics.jsonl"
    by_step = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_metrics(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
            "grad_norm"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    steps = [m["step"] for m in metrics]
    for ax, key in zip(axes.flat, keys):
        ax.plot(steps, [m[key] for m in metrics], marker=".")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _versions() -> dict[str, str | None]:
    """Installed versions of what shapes a run's numbers (None: not installed, e.g. a source tree
    on PYTHONPATH)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("dpo-ray", "ray", "torch", "transformers", "peft", "datasets"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def _materialize(setting: str, rows: int, max_length: int) -> bool:
    """Whether to hold the splits in the object store. Streamed, every worker re-runs the read and
    split for each epoch and each held-out evaluation: ~10 s each on a small cluster, more than the
    training itself on a few thousand pairs. Held, they are read once and served from memory."""
    if setting != "auto":
        return setting == "always"
    upper_bound = rows * (2 * max_length * 4 + 256)  # int32 token ids of both sequences + the rest
    return upper_bound <= ray.cluster_resources().get("object_store_memory", 0) / 4


def _chosen_mean_tokens(dataset) -> float:
    """Mean chosen response length (tokens after the prompt) over a split."""
    frame = dataset.select_columns(["chosen_input_ids", "prompt_length"]).to_pandas()
    return float((frame["chosen_input_ids"].map(len) - frame["prompt_length"]).mean())


def _report_overlap(datasets: dict, eval_source: str, run_dir: Path) -> None:
    """A held-out pair that is also a training pair (same pair_id: same prompt and responses)
    makes the eval_* metrics optimistic: say how many, before training, and in held_out.json."""
    ids = {name: set(ds.select_columns(["pair_id"]).to_pandas()["pair_id"]) for name, ds in datasets.items()}
    both = ids["train"] & ids["eval"]
    (run_dir / "held_out.json").write_text(json.dumps(
        {"eval_source": eval_source, "pairs": len(ids["eval"]), "also_training_pairs": len(both)}))
    print(f"data.eval_source: {len(ids['eval'])} held-out pairs"
          + (f"; warning: {len(both)} of them are also training pairs" if both else
             ", none of them in the training pairs"), flush=True)


def _write_merged(adapter: Path, out: Path, tokenizer: str) -> None:
    """Base + LoRA adapter folded into one plain Hugging Face model (no peft needed to load it)."""
    from transformers import AutoTokenizer

    from dpo_ray.models import load_causal_lm

    if out.exists():
        shutil.rmtree(out)
    load_causal_lm(str(adapter)).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)


def train(config: RunConfig, source=None) -> TrainResult:
    from dpo_ray.ray_env import init_ray

    check_paths(config, source)  # before Ray starts: a wrong path fails in seconds, not minutes
    init_ray()
    t = config.train
    # Before the data and reference stages: workers no node can hold must not cost a scoring pass.
    check_resources("train workers", {"CPU": t.cpus_per_worker, "GPU": 1 if t.use_gpu else 0},
                    t.num_workers, t.placement)
    run_dir, run = _run_dir(config)
    save_config(config, run_dir / "config.yaml")
    # The tracked run is opened here, with the config as params; rank 0 logs into it by id.
    tracking = plan_tracking(t.report_to, run, run_dir.name, t.project, t.tracking_uri,
                             t.output_dir)
    if tracking is not None:
        Tracker(tracking, config_dict(config)).close()
    (run_dir / "versions.json").write_text(json.dumps(_versions(), indent=2))

    policy = t.model or config.reference.model
    if Path(policy).expanduser().is_dir():  # a LoRA adapter records its base by this path
        policy = str(Path(policy).expanduser().absolute())
    held_out, held = config.data.held_out(), None  # data.eval_source: its own pairs, own cache entry
    if t.objective == "reward_model":  # Bradley-Terry on the pairs themselves: no reference
        pairs, report = prepare_pairs(config.data, source)
        print(report.summary(), flush=True)
        rows, reference_key, columns, cache_hit = report.pairs, None, PAIR_TRAIN_COLUMNS, None
        if held_out is not None:
            held = prepare_pairs(held_out)[0]
    else:
        reference = ensure_reference(config.data, config.reference, source)
        (run_dir / "reference.json").write_text(json.dumps(
            {"key": reference.key, "path": reference.path, "rows": reference.rows}, indent=2))
        pairs, rows, reference_key, columns = reference.dataset, reference.rows, reference.key, TRAIN_COLUMNS
        cache_hit = reference.cache_hit
        if held_out is not None:
            held = ensure_reference(held_out, config.reference).dataset
    # Every worker iterates the whole dataset in the same order (see RankPairCollate in
    # training/loop.py): the cache's row order, which is the data's own (prepare_pairs keeps it
    # through tokenizing, scoring and writing), whatever pool scored it; training/batching.py
    # shuffles it in windows.
    keep_order()
    pairs = pairs.select_columns(columns)
    in_memory = _materialize(t.materialize_datasets, rows, config.data.max_length)
    if in_memory:  # read once; both splits then filter blocks already in memory
        pairs = pairs.materialize()
    if held is None:
        datasets = split_train_eval(pairs, t.eval_fraction)
    else:
        datasets = {"train": pairs, "eval": held.select_columns(columns)}
        _report_overlap(datasets, config.data.eval_source, run_dir)
    if in_memory:
        datasets = {name: ds.materialize() for name, ds in datasets.items()}
    train_pairs = datasets["train"].count() if t.eval_fraction > 0 else rows
    global_batch = t.global_batch_size
    if train_pairs < global_batch:
        raise ValueError(f"{train_pairs} training pairs is less than one global batch ({global_batch}"
                         " = per_device_train_batch_size x gradient_accumulation_steps x num_workers)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.data.tokenizer)
    # Resuming starts a new Ray Train attempt from the run's latest checkpoint, explicitly: a
    # reused Ray Train name would silently pick up (or skip) the old attempt's state.
    resume_from, attempt = None, RAY_TRAIN_NAME
    if t.resume:
        resume_from = latest_checkpoint(run)
        attempts = [name for name in storage.names(run) if name.startswith(RAY_TRAIN_NAME)]
        attempt = f"{RAY_TRAIN_NAME}-resume-{len(attempts)}"
        print(f"resuming {run} from {resume_from}", flush=True)
    plan = WorkerPlan(
        train_pairs=train_pairs,
        policy=policy,
        policy_is_reference=t.objective == "dpo" and model_fingerprint(policy, None) == (
            model_fingerprint(config.reference.model, config.reference.revision)),
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        tokenizer=config.data.tokenizer,
        reference_dtype=config.reference.dtype,
        run_dir=run,
        has_eval="eval" in datasets,
        resume_from=str(resume_from) if resume_from else None,  # Train V2: via the loop's config
        tracking=tracking,
        eval_chosen_mean_tokens=_chosen_mean_tokens(datasets["eval"]) if (
            "eval" in datasets and t.rpo_alpha and t.objective == "dpo") else None,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": config, "plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {}),
                                  **t.placement.resources},
            accelerator_type=t.placement.accelerator_type,
            label_selector=dict(t.placement.label_selector) or None),
        run_config=ray.train.RunConfig(
            name=attempt, storage_path=run,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.save_total_limit)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[],
                                            execution_options=DataContext.get_current().execution_options),
    )
    storage.publish(run_dir, run)  # config, versions, tracking ids: before any worker starts
    restarts_before = len(_read_lines(run_dir / "restarts.jsonl"))  # a resumed run's earlier ones
    try:
        total = count_steps(train_pairs, t, t.num_workers)[1]
        with stage("train", f"{t.num_workers} workers, {train_pairs} pairs, {total} steps "
                   f"({t.parallel_strategy}) -> {run}"), follow_steps(storage.join(run, "metrics.jsonl"), total):
            result = trainer.fit()
    except BaseException:
        if tracking is not None:
            Tracker(tracking).close("FAILED")
        raise
    if storage.is_remote(run):  # what rank 0 wrote and uploaded, from whichever node it ran on
        storage.pull(run, run_dir, exclude=NOT_MIRRORED)
    for line in _read_lines(run_dir / "restarts.jsonl")[restarts_before:]:
        restart = json.loads(line)
        print(f"restarted from step {restart['restored_step']} ({restart['why']})", flush=True)
    precision = run_dir / "precision.json"  # written by rank 0, which resolved train.bf16
    if precision.exists():
        used = json.loads(precision.read_text())
        print(f"precision: {used['weights']} weights, bf16 autocast {'on' if used['bf16_autocast'] else 'off'}"
              f" ({used['why']})", flush=True)
    final = run_dir / "final_model"
    if final.exists():
        shutil.rmtree(final)
    # A resumed run that had already reached its last step trains nothing and reports no new
    # checkpoint: its final model is the checkpoint it resumed from.
    last = result.checkpoint or (ray.train.Checkpoint(resume_from) if resume_from else None)
    if last is None:
        raise RuntimeError(f"training in {run_dir} ended without a checkpoint")
    with last.as_directory() as folder:
        export_model(Path(folder), final)
    if t.peft is not None and t.peft.merge:
        _write_merged(final, run_dir / "final_model_merged", config.data.tokenizer)
    metrics = read_metrics(run_dir)
    if metrics:
        plot_metrics(metrics, run_dir / "metrics.png")
    if tracking is not None:
        tracker = Tracker(tracking)
        for artifact in (final, run_dir / "metrics.png", run_dir / "config.yaml"):
            if artifact.exists():
                tracker.log_artifact(artifact)
        tracker.close("FINISHED")
    storage.publish(run_dir, run)
    print(f"run directory: {run}\nfinal model: {storage.join(run, 'final_model')}", flush=True)
    return TrainResult(run_dir, final, metrics, reference_key, tracking, cache_hit, run)
