"""Training metrics under the names TRL users read (``loss``, ``rewards/margins``...).

A step adds up per-pair sums (``pair_sums``) over its micro-batches, the sums are added over
workers (``all_reduce_sum``), and ``means`` divides by the number of pairs. Sums, not means,
travel between workers so that ranks with different numbers of pairs (the last held-out batch)
still give the exact mean over all pairs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Per-pair quantities summed over a step (the order of the (len(SUMS),) tensor pair_sums returns).
SUMS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
        "logps/chosen", "logps/rejected", "pairs", "tokens")
_REWARD_MODEL = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def pair_sums(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
              policy_chosen_logps: torch.Tensor | None = None,
              policy_rejected_logps: torch.Tensor | None = None, tokens: int = 0) -> torch.Tensor:
    """Sums over the B pairs of a micro-batch, float64, shape (len(SUMS),).

    Args: ``losses``, ``chosen_rewards``, ``rejected_rewards``, ``policy_*_logps``: (B,);
    ``tokens``: real (unpadded) tokens in the micro-batch, for throughput. A reward model has no
    log-probs (None): those sums stay 0 and ``means`` leaves them out.
    ``rewards/accuracies`` is strict: a tie (r_c == r_r, as at step 0) counts as wrong.
    """
    zero = torch.zeros(1)
    return torch.tensor([
        float(losses.detach().sum()), float(chosen_rewards.sum()), float(rejected_rewards.sum()),
        float((chosen_rewards > rejected_rewards).sum()),
        float((chosen_rewards - rejected_rewards).sum()),
        float((zero if policy_chosen_logps is None else policy_chosen_logps).detach().sum()),
        float((zero if policy_rejected_logps is None else policy_rejected_logps).detach().sum()),
        float(losses.numel()), float(tokens),
    ], dtype=torch.float64)


def means(totals: list[float], objective: str = "dpo", prefix: str = "") -> dict[str, float]:
    """``totals`` (summed ``pair_sums``) -> per-pair means, e.g. ``{prefix}rewards/margins``.
    ``pairs``/``tokens`` are counts, not metrics; no pairs -> {}."""
    pairs = totals[SUMS.index("pairs")]
    if not pairs:
        return {}
    names = SUMS[:7] if objective == "dpo" else _REWARD_MODEL
    return {f"{prefix}{name}": totals[SUMS.index(name)] / pairs for name in names}


def total(totals: list[float], name: str) -> float:
    return totals[SUMS.index(name)]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(sums: torch.Tensor, device) -> list[float]:
    """Sums over every worker (the identity outside a process group)."""
    if not _distributed():
        return sums.tolist()
    summed = sums.to(device)
    dist.all_reduce(summed)
    return summed.cpu().tolist()


def all_max(value: float, device) -> float:
    if not _distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor[0])


def same_on_all_ranks(value: int, device) -> bool:
    both = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)  # -> [max, -min]
    return float(both[0]) == -float(both[1])


def peak_memory_mb(device) -> float:
    """Peak memory of this worker: GPU allocations on CUDA, else the process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
