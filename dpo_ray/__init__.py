"""dpo_ray: Direct Preference Optimization on Ray.

Data flow (one module per stage): ``data`` (pairs -> token ids) -> ``reference`` (cached
reference log-probs) -> ``train`` (Ray Train DPO) -> ``eval`` (win rates) -> ``jobs``.
The math lives in ``logps`` (sequence log-probs) and ``losses`` (DPO-family losses).
"""

__version__ = "0.1.0"
