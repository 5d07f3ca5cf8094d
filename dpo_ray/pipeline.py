"""The whole flow as one job: data -> reference -> train -> held-out pair accuracy -> win rate.

    dpo-ray pipeline --config run.yaml            # locally, or through `ray job submit`

Each stage is the same function its own subcommand runs, so any stage can be re-run alone from
the artifacts this leaves: the reference cache entry (reused on a re-run), the run directory
(config, metrics, checkpoints, final_model/), ``pair_accuracy.json`` and the eval directory.
``pipeline.json`` in the run directory lists them.
"""

from __future__ import annotations

import json
from dataclasses import replace

from dpo_ray import storage
from dpo_ray.config import EvalConfig, RunConfig

# An eval left at its default folder goes inside the run directory instead, next to the model.
_DEFAULT_EVAL_DIR = EvalConfig.__dataclass_fields__["output_dir"].default


def run_pipeline(config: RunConfig) -> dict:
    from dpo_ray.eval import evaluate
    from dpo_ray.eval.pairs import pair_accuracy
    from dpo_ray.training import train

    result = train(config)  # runs (or reuses) the data and reference stages first
    # Later stages get the run as configured (a path, or a URI their actors read from), and write
    # into this machine's copy of it, which is uploaded at the end (dpo_ray/storage.py).
    run = result.run_uri
    summary: dict = {"run_dir": run, "final_model": storage.join(run, "final_model"),
                     "reference_key": result.reference_key}
    if result.reference_key:
        summary["reference_cache"] = json.loads((result.run_dir / "reference.json").read_text())["path"]
    if config.has_held_out:
        summary["pair_accuracy"] = pair_accuracy(run)
    if config.eval is not None:
        ev = config.eval
        ev = replace(ev, policies=ev.policies or [run],
                     output_dir=run if ev.output_dir == _DEFAULT_EVAL_DIR else ev.output_dir,
                     name=ev.name or "eval")
        evaluated = evaluate(ev)
        if result.tracking is not None:  # the win rates join the training run's metrics
            from dpo_ray.eval.winrate import track_eval
            from dpo_ray.tracking import Tracker

            last_step = result.metrics[-1]["step"] if result.metrics else 0
            track_eval(Tracker(result.tracking), evaluated.summary, evaluated.eval_dir, last_step)
        summary["eval_dir"] = evaluated.eval_uri
        summary["win_rates"] = [{k: r[k] for k in ("policy", "judge", "win_rate", "ci_low", "ci_high")}
                                for r in evaluated.summary["results"]]
    (result.run_dir / "pipeline.json").write_text(json.dumps(summary, indent=2))
    storage.publish(result.run_dir, run)
    print(f"pipeline finished: {storage.join(run, 'pipeline.json')}", flush=True)
    return summary
