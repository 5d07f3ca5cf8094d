"""dpo_ray: Direct Preference Optimization on Ray.

Data flow (one package per stage): ``data`` (pairs -> token ids) -> ``reference`` (cached
reference log-probs) -> ``training`` (Ray Train DPO) -> ``eval`` (win rates) -> ``jobs``.
The math lives in ``logps`` (sequence log-probs) and ``losses`` (DPO-family losses).

    import dpo_ray
    result = dpo_ray.train(run_config)   # dpo_ray.config.RunConfig
    report = dpo_ray.evaluate(eval_config)  # dpo_ray.config.EvalConfig
    swept = dpo_ray.sweep(run_config)       # Ray Tune over run_config.sweep, one reference pass
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import dpo_ray` (e.g. for the config classes) does not start torch and Ray.
    if name == "train":
        from dpo_ray.training import train

        return train
    if name == "evaluate":
        from dpo_ray.eval.winrate import evaluate

        return evaluate
    if name == "sweep":
        from dpo_ray.sweep import sweep

        return sweep
    raise AttributeError(f"module 'dpo_ray' has no attribute {name!r}")
