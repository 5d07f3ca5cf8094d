"""Sweeps: Ray Tune trials over ``train.*`` fields (β, learning rate, loss type...), every trial a
``TorchTrainer`` run on the same cached reference values.

    dpo-ray sweep --config run.yaml sweep.grid.beta=[0.05,0.1,0.2,0.5]
    result = dpo_ray.sweep(run_config)      # run_config.sweep: dpo_ray.config.SweepConfig

The data and reference sections are fixed for the whole sweep, so the reference pass runs once,
on the driver, before the first trial; each trial's ``train()`` then finds it in the cache (and
says so in the results table). Sweep directory ``<train.output_dir>/<sweep.name>``:

- ``config.yaml``: the resolved config, sweep section included;
- ``trial-NNN/``: one ordinary run directory per trial (config, metrics, final model);
- ``results.csv``: one row per trial: its values, status, final logged metrics (``eval_*`` are
  the held-out ones), run directory, whether its reference values came from the cache;
- ``sweep.json``: the reference entry, how many scoring passes ran and were saved, the best trial;
- ``ray_tune/``: Ray Tune's own experiment state.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from dpo_ray.config import RunConfig, SweepConfig, local_dir, save_config, trial_train

TUNE_NAME = "ray_tune"


class SweepTrialsFailed(RuntimeError):
    """Some trials failed; the results table (written) says which and why."""


@dataclass
class SweepResult:
    sweep_dir: Path
    results: pd.DataFrame  # one row per trial (results.csv)
    summary: dict  # sweep.json


def _trial_name(trial) -> str:
    """trial-000, trial-001, ... in the order Tune created them (its ids end in that counter)."""
    return f"trial-{int(trial.trial_id.rsplit('_', 1)[-1]):03d}"


def _run_trial(params: dict, base: RunConfig, sweep_dir: str) -> None:
    """One trial, inside a Tune trial actor: an ordinary training run with the trial's values,
    whose last logged metrics (held-out ones included) go to Tune."""
    from ray import tune

    from dpo_ray.training import train

    name = tune.get_context().get_trial_name()
    config = replace(base, sweep=None, train=trial_train(base.train, params, sweep_dir, name))
    result = train(config)
    last = result.metrics[-1] if result.metrics else {}
    tune.report({**last, "run_dir": str(result.run_dir),
                 "reference_cache_hit": result.reference_cache_hit})


def _concurrency(config: RunConfig, trials: int) -> int:
    """Trials at once: as many as the cluster's CPUs (and GPUs) hold next to one CPU left for a
    data task. A stage whose tasks find no free CPU waits forever on a small machine (see
    ``ray_env``), so on 2 cores this is one trial at a time."""
    import ray

    if config.sweep.max_concurrent_trials:
        return config.sweep.max_concurrent_trials
    t, free = config.train, ray.cluster_resources()
    cpus = t.num_workers * t.cpus_per_worker
    fits = int((free.get("CPU", 0) - 1) // cpus) if cpus > 0 else trials
    if t.use_gpu:
        fits = min(fits, int(free.get("GPU", 0) // t.num_workers))
    return max(1, min(fits, trials))


def _param_space(sweep: SweepConfig) -> dict:
    from ray import tune

    space = {key: tune.grid_search(values) for key, values in sweep.grid.items()}
    for key, spec in sweep.random.items():
        (kind, values), = spec.items()
        space[key] = tune.choice(values) if kind == "choice" else getattr(tune, kind)(*values)
    return space


def _needs_reference(config: RunConfig) -> bool:
    objectives = {config.train.objective, *config.sweep.grid.get("objective", []),
                  *config.sweep.random.get("objective", {}).get("choice", [])}
    return "dpo" in objectives


def _sweep_dir(config: RunConfig) -> Path:
    name = config.sweep.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    sweep_dir = local_dir(config.train.output_dir, "train.output_dir") / name
    if sweep_dir.exists():
        raise FileExistsError(f"{sweep_dir} exists: choose another sweep.name")
    sweep_dir.mkdir(parents=True)
    return sweep_dir


# Columns the console table shows (results.csv has every logged metric).
_SHOWN = ["loss", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"]


def _plain(value):
    """A numpy scalar from the table as a plain Python value (for sweep.json)."""
    return value.item() if hasattr(value, "item") else value


def _table(grid, keys: list[str]) -> pd.DataFrame:
    """results.csv: the trial's values, status and final metrics, in trial order."""
    rows = []
    for result in grid:
        trial = Path(result.path).name
        row = {"trial": trial, "status": "error" if result.error else "done",
               **{key: result.config.get(key) for key in keys}}
        metrics = {k: v for k, v in (result.metrics or {}).items()
                   if k in ("run_dir", "reference_cache_hit") or "/" in k or k.startswith("eval_")
                   or k in ("step", "loss", "grad_norm", "pairs_per_second")}
        row.update(metrics)
        row["error"] = str(result.error).strip().splitlines()[-1] if result.error else None
        rows.append(row)
    return pd.DataFrame(rows).sort_values("trial", ignore_index=True)


def sweep(config: RunConfig) -> SweepResult:
    """Run ``config.sweep`` on Ray Tune; see the module docstring for what it writes."""
    from ray import tune

    from dpo_ray.console import stage
    from dpo_ray.preflight import check_paths
    from dpo_ray.ray_env import check_resources, init_ray
    from dpo_ray.reference import ensure_reference

    if config.sweep is None:
        raise ValueError("no sweep section: give the fields to vary, e.g. sweep.grid.beta=[0.05,0.1]")
    s, t = config.sweep, config.train
    check_paths(config)
    init_ray()
    check_resources("train workers", {"CPU": t.cpus_per_worker, "GPU": 1 if t.use_gpu else 0},
                    t.num_workers, t.placement)
    sweep_dir = _sweep_dir(config)
    save_config(config, sweep_dir / "config.yaml")

    reference = None
    if _needs_reference(config):  # once, here: every trial then reads it from the cache
        reference = ensure_reference(config.data, config.reference)
        if config.data.held_out() is not None:
            ensure_reference(config.data.held_out(), config.reference)

    n_trials = len(s.grid_points()) * s.num_samples
    concurrent = _concurrency(config, n_trials)
    keys = [*s.grid, *s.random]

    class _Lines(tune.Callback):  # one console line per finished trial
        done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            m = trial.last_result or {}
            values = " ".join(f"{k}={trial.config.get(k)}" for k in keys)
            print(f"[sweep] {_trial_name(trial)} {values}: {s.metric}="
                  f"{m.get(s.metric, float('nan')):.4f} ({self.done}/{n_trials})", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            print(f"[sweep] {_trial_name(trial)} failed ({self.done}/{n_trials}); its error is in "
                  f"results.csv and {sweep_dir / _trial_name(trial)}", flush=True)

    trainable = tune.with_resources(  # the trial actor only drives; TorchTrainer asks for workers
        tune.with_parameters(_run_trial, base=config, sweep_dir=str(sweep_dir)), {"CPU": 0.01})
    tuner = tune.Tuner(
        trainable,
        param_space=_param_space(s),
        tune_config=tune.TuneConfig(
            # Tune ignores max_concurrent_trials beside a search-algorithm instance: the limit
            # goes to the generator itself.
            num_samples=s.num_samples,
            search_alg=tune.search.BasicVariantGenerator(random_state=s.search_seed, max_concurrent=concurrent),
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=TUNE_NAME, storage_path=str(sweep_dir), verbose=0,
                                  callbacks=[_Lines()]),
    )
    with stage("sweep", f"{n_trials} trials over {', '.join(keys)}, {concurrent} at a time -> {sweep_dir}"):
        grid = tuner.fit()

    table = _table(grid, keys)
    table.to_csv(sweep_dir / "results.csv", index=False)
    done = table[table["status"] == "done"]
    best = None
    if s.metric in done and done[s.metric].notna().any():
        row = done.loc[done[s.metric].idxmin() if s.mode == "min" else done[s.metric].idxmax()]
        best = {"trial": row["trial"], s.metric: float(row[s.metric]),
                "values": {k: _plain(row[k]) for k in keys}, "run_dir": row["run_dir"]}
    computed = int(reference is not None and not reference.cache_hit)
    summary = {
        "trials": n_trials, "done": len(done), "failed": int((table["status"] == "error").sum()),
        "metric": s.metric, "mode": s.mode, "best": best, "max_concurrent_trials": concurrent,
        "reference": None if reference is None else {
            "key": reference.key, "path": reference.path, "rows": reference.rows,
            "scoring_passes": computed, "scoring_passes_saved": len(done) - computed},
        "results": str(sweep_dir / "results.csv"),
    }
    (sweep_dir / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    shown = ["trial", "status", *keys, s.metric, *(c for c in _SHOWN if c != s.metric), "reference_cache_hit"]
    print(table[[c for c in shown if c in table]].to_string(index=False), flush=True)
    if reference is not None:
        print(f"[sweep] reference values computed {computed}x for {len(done)} trials "
              f"({len(done) - computed} scoring passes saved)", flush=True)
    if summary["failed"]:
        raise SweepTrialsFailed(f"{summary['failed']} of {n_trials} sweep trials failed: see "
                           f"{sweep_dir / 'results.csv'}")
    return SweepResult(sweep_dir, table, summary)
