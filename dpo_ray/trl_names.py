"""TRL's ``DPOConfig`` names, read into ours: the ones that mean the same are accepted
(``warmup_ratio``, ``optim``, ``report_to: none|all``, ``precompute_ref_log_probs``), the ones that
mean something else here are refused with the reason. ``TrainConfig`` and ``EvalConfig`` run these
on their keyword arguments before validation, so YAML, ``key=value`` and ``--flags`` all get them,
and a saved config holds our names only. docs/trl.md has the whole table.
"""

from __future__ import annotations

import sys

from dpo_ray.tracking import installed_trackers

# TRL/transformers optimizer names that mean one of ours.
_TRL_OPTIM = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw": "adamw", "rmsprop": "rmsprop"}
# TRL DPOConfig fields refused here, and why (a TRL user's config fails with this, not a typo hint).
_TRL_REFUSED = {
    "push_to_hub": "not done by dpo_ray: upload <run_dir>/final_model with `hf upload`",
    "max_prompt_length": "it is a data setting here: data.max_prompt_length",
    "max_length": "it is a data setting here: data.max_length",
    "use_logits_to_keep": "dpo_ray already computes logits on the positions a loss reads",
}


def trl_names(values: dict) -> dict:
    """Accept TRL ``DPOConfig`` names where the meaning is ours: ``warmup_ratio`` (share of steps),
    ``optim`` (adamw_torch / rmsprop), ``report_to: none|all|name``, and
    ``precompute_ref_log_probs`` (always true here: a note says so). TRL names that mean
    something else are refused with the reason."""
    values = dict(values)
    for name, why in _TRL_REFUSED.items():
        if name in values:
            raise ValueError(f"train.{name} (TRL's DPOConfig field): {why}")
    if values.get("loss_type") == "ipo_length_normalized":
        raise ValueError("train.loss_type=ipo_length_normalized is now called ipo (TRL's IPO: "
                         "log-probs averaged over response tokens); the summed form is ipo_sum")
    if "warmup_ratio" in values:
        ratio = values.pop("warmup_ratio")
        if values.get("warmup_steps"):
            raise ValueError("train.warmup_ratio and train.warmup_steps are both set; set one")
        if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"train.warmup_ratio must be a share in [0, 1), got {ratio!r}")
        values["warmup_steps"] = float(ratio)
    if "optim" in values:
        optim = values.pop("optim")
        if optim not in _TRL_OPTIM:
            raise ValueError(f"train.optim={optim!r}: dpo_ray has {sorted(_TRL_OPTIM)} "
                             "(train.optimizer: adamw or rmsprop)")
        values["optimizer"] = _TRL_OPTIM[optim]
    if "precompute_ref_log_probs" in values:
        values.pop("precompute_ref_log_probs")
        print("note: train.precompute_ref_log_probs is always on in dpo_ray: the reference stage "
              "scores every pair once and caches it, and training never runs the reference model",
              file=sys.stderr)
    return report_to_names(values)


def report_to_names(values: dict) -> dict:
    """``report_to`` as transformers takes it: a name, a list, "none" or "all"."""
    values = dict(values)
    report_to = values.get("report_to")
    if isinstance(report_to, str):
        report_to = [report_to]
    if isinstance(report_to, list) and {"none", "all"} & set(report_to):
        # as in transformers: "none" = no tracking, "all" = every tracker whose package is installed
        values["report_to"] = ([] if report_to == ["none"] else
                               installed_trackers()
                               if report_to == ["all"] else report_to)
    elif report_to is not None:
        values["report_to"] = report_to
    return values
