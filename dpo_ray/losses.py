"""Preference losses as pure functions: tensors in, per-pair losses out.

Notation (Rafailov et al. 2023, eq. 7): for B pairs,

    h = [logp_pi(y_c) - logp_ref(y_c)] - [logp_pi(y_r) - logp_ref(y_r)]        shape (B,)
    implicit reward r(x, y) = beta * (logp_pi(y|x) - logp_ref(y|x))

Every loss below maps ``h`` (and beta) to per-pair losses of shape (B,). ``preference_loss``
computes ``h``, picks the loss by name from ``LOSSES`` (a table, not an if-chain), adds the
optional SFT term and returns the rewards that users read as ``rewards/chosen`` etc.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO, and cDPO when ``label_smoothing`` = eps > 0 (labels flipped with probability eps):

        -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h)

    Shapes: h (B,) -> (B,). At h = 0 the loss is ln 2 whatever eps is.
    """
    return (-(1 - label_smoothing) * F.logsigmoid(beta * h)
            - label_smoothing * F.logsigmoid(-beta * h))


def robust_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024), an unbiased loss under label noise eps in [0, 0.5):

        [-(1 - eps) * log sigma(beta * h) + eps * log sigma(-beta * h)] / (1 - 2 * eps)

    Shapes: h (B,) -> (B,).
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust loss needs label_smoothing in [0, 0.5), got {label_smoothing}")
    return ((-(1 - label_smoothing) * F.logsigmoid(beta * h)
             + label_smoothing * F.logsigmoid(-beta * h)) / (1 - 2 * label_smoothing))


def hinge_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """SLiC / RSO hinge: relu(1 - beta * h). Shapes: h (B,) -> (B,)."""
    return torch.relu(1 - beta * h)


def ipo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): (h - 1 / (2 * beta))^2, beta being the paper's tau.

    ``ipo`` is TRL's IPO: ``preference_loss`` first divides each log-ratio by its response's
    token count, so h compares mean per-token log-ratios. ``ipo_sum`` takes h from summed
    log-probs as they are. Shapes: h (B,) -> (B,).
    """
    return (h - 1 / (2 * beta)) ** 2


LOSSES = {
    "sigmoid": sigmoid_loss,
    "robust": robust_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,  # TRL's: h built from per-token (length-normalized) log-ratios
    "ipo_sum": ipo_loss,  # same formula on summed log-ratios
}
# Losses whose h is built from log-ratios divided by the response token count.
LENGTH_NORMALIZED = {"ipo"}


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    sft_weight: float = 0.0,
    sft_mean_tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family loss and implicit rewards.

    Args:
        policy_*_logps, ref_*_logps: (B,) summed response log-probs (``sequence_logps``).
        beta: KL strength (paper default 0.1).
        loss_type: a key of ``LOSSES``.
        label_smoothing: eps for cDPO (``sigmoid``) and ``robust``.
        chosen_tokens, rejected_tokens: (B,) response token counts; needed for
            ``ipo`` and for the SFT term.
        sft_weight: alpha of the RPO/SFT term (TRL's ``rpo_alpha``). Per pair:
            alpha * (-policy_chosen_logps) / n, where n = ``sft_mean_tokens``, the mean chosen
            response length over the batch (default: over these B pairs). The mean of the term
            over the batch is then alpha * (sum of chosen token NLLs) / (number of chosen
            tokens): TRL's token-mean NLL. The training loop passes the global batch's n, so
            the term does not depend on how pairs are split over workers and micro-batches.
    Returns:
        losses (B,), chosen_rewards (B,), rejected_rewards (B,); rewards are detached:
        r = beta * (logp_pi - logp_ref).
    """
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {sorted(LOSSES)}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    if loss_type in LENGTH_NORMALIZED:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(f"{loss_type} needs chosen_tokens and rejected_tokens")
        chosen_logratios = chosen_logratios / chosen_tokens.clamp(min=1)
        rejected_logratios = rejected_logratios / rejected_tokens.clamp(min=1)
    h = chosen_logratios - rejected_logratios  # (B,)
    losses = LOSSES[loss_type](h, beta, label_smoothing)
    if sft_weight:
        if sft_mean_tokens is None:
            if chosen_tokens is None:
                raise ValueError("the SFT term needs chosen_tokens or sft_mean_tokens")
            sft_mean_tokens = chosen_tokens.double().mean()
        losses = losses + sft_weight * (-policy_chosen_logps / sft_mean_tokens)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def reward_model_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                      margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry reward-model loss: -log sigma(s_c - s_r [- margin]).

    Shapes: scores (B,) from a scalar head; optional margin (B,) (Llama-2's margin loss).
    Returns (B,). At s_c == s_r the loss is ln 2, as DPO's is at h = 0.
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)
