"""Win-rate evaluation: generation on an actor pool, judges, statistics and a report.

Heavy modules load lazily, so ``dpo_ray.eval.stats`` can be used without Ray or torch work.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("evaluate", "EvalResult"):
        from dpo_ray.eval import winrate as module

        return getattr(module, name)
    raise AttributeError(name)
