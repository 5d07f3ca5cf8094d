"""Held-out pairwise accuracy of a trained run, with a bootstrap CI, scored on an actor pool.

- reward model (``train.objective=reward_model``): correct iff s(chosen) > s(rejected).
- DPO policy: correct iff the implicit reward r = beta * (logp_policy - logp_ref) of chosen beats
  rejected; the reference side comes from the run's reference cache (no reference forward pass),
  the policy side from the same actor pool and ``sequence_logps`` that computed the cache.

The held-out pairs are the run's own: ``data.eval_source``, or the ``train.eval_fraction`` split
by pair_id hash: pairs the run never trained on.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from dpo_ray import storage
from dpo_ray.config import RunConfig, load_config
from dpo_ray.eval import stats
from dpo_ray.preflight import check_model_path


class _PairScorer:
    """Ray Data callable class: a reward model's scores of each pair's chosen and rejected."""

    def __init__(self, model: str, batch_size: int):
        from dpo_ray.eval.judges import RewardModelJudge

        self.judge = RewardModelJudge(model, batch_size=batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        chosen = self.judge.score_ids(batch.column("chosen_input_ids").to_pylist())
        rejected = self.judge.score_ids(batch.column("rejected_input_ids").to_pylist())
        return pa.table({"pair_id": batch.column("pair_id"), "chosen_score": chosen,
                         "rejected_score": rejected})


def pair_accuracy(run_dir: str | Path, model: str | None = None, actors: int = 1,
                  confidence: float = 0.95, address: str | None = None) -> dict:
    """Accuracy on the run's held-out pairs; writes ``<run_dir>/pair_accuracy.json``. ``run_dir``
    may be an object-store URI: the actors then load ``final_model`` from there."""
    from dpo_ray.data.pipeline import split_train_eval
    from dpo_ray.ray_env import actor_pool_kwargs, init_ray

    run = str(run_dir)
    run_dir = storage.local_dir(run)
    config_text = storage.read_text(storage.join(run, "config.yaml"))
    if config_text is None:
        raise FileNotFoundError(f"{run} is not a training run directory (no config.yaml)")
    if storage.is_remote(run):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_text)
    config = load_config(RunConfig, run_dir / "config.yaml")
    t = config.train
    if not config.has_held_out:
        raise ValueError(f"{run_dir}: the run has no held-out pairs (train.eval_fraction is 0 and "
                         "data.eval_source is not set)")
    held_out = config.data.held_out()
    if actors < 1:
        raise ValueError(f"--actors must be at least 1, got {actors}")
    model = model or storage.join(run, "final_model")
    check_model_path(model, "--model")
    init_ray(address)
    # The reference pool's CPUs, GPUs and placement, with exactly ``actors`` actors.
    pool = replace(config.reference.pool, min_actors=actors, max_actors=actors)
    if t.objective == "reward_model":
        from dpo_ray.data import prepare_pairs

        if held_out is not None:
            held = prepare_pairs(held_out)[0]
        else:
            held = split_train_eval(prepare_pairs(config.data)[0], t.eval_fraction)["eval"]
        scored = held.select_columns(["pair_id", "chosen_input_ids", "rejected_input_ids"]).map_batches(
            _PairScorer, fn_constructor_args=(model, config.reference.micro_batch_size),
            batch_format="pyarrow", batch_size=config.reference.batch_size,
            **actor_pool_kwargs(pool, "reward-model scorer")).to_pandas()
        margins = (scored["chosen_score"] - scored["rejected_score"]).to_numpy()
    else:
        from dpo_ray.reference import ensure_reference
        from dpo_ray.reference.scorer import REFERENCE_COLUMNS, score_pairs

        if held_out is not None:  # a cache hit after training, as below
            held = ensure_reference(held_out, config.reference).dataset
        else:
            reference = ensure_reference(config.data, config.reference)  # a cache hit after training
            held = split_train_eval(reference.dataset, t.eval_fraction)["eval"]
        held = held.rename_columns({"ref_chosen_logps": "cached_ref_chosen_logps",
                                    "ref_rejected_logps": "cached_ref_rejected_logps"})
        held = held.drop_columns([c for c in REFERENCE_COLUMNS if c.endswith("_tokens")])
        policy_config = replace(config.reference, model=model, revision=None, pool=pool)
        # The reference scorer run with the policy's weights: its ref_* columns are policy logps.
        scored = score_pairs(held, policy_config).to_pandas()
        chosen = t.beta * (scored["ref_chosen_logps"] - scored["cached_ref_chosen_logps"])
        rejected = t.beta * (scored["ref_rejected_logps"] - scored["cached_ref_rejected_logps"])
        margins = (chosen - rejected).to_numpy()
    result = {"run_dir": run, "model": model, "objective": t.objective,
              **stats.accuracy(margins > 0, confidence), "mean_margin": float(np.mean(margins))}
    (run_dir / "pair_accuracy.json").write_text(json.dumps(result, indent=2))
    storage.publish(run_dir, run)
    print(f"held-out pair accuracy of {model}: {result['accuracy']:.3f} "
          f"[{result['ci_low']:.3f}, {result['ci_high']:.3f}] on {result['n']} pairs", flush=True)
    return result
