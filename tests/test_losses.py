"""Each loss against numbers worked out by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

from dpo_ray.losses import LOSSES, preference_loss, reward_model_loss
from dpo_ray.training import metrics

# One pair: policy logps chosen -10, rejected -12; reference -11 for both.
#   chosen log-ratio   = -10 - (-11) = +1
#   rejected log-ratio = -12 - (-11) = -1
#   h = 1 - (-1) = 2, beta = 0.1 -> beta*h = 0.2
PC, PR, RC, RR = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
BETA = 0.1
NEG_LOGSIG_POS = math.log(1 + math.exp(-0.2))  # -log sigma(0.2)  = 0.598138869...
NEG_LOGSIG_NEG = math.log(1 + math.exp(0.2))  # -log sigma(-0.2) = 0.798138869...


def loss_of(loss_type, **kw):
    losses, chosen_r, rejected_r = preference_loss(PC, PR, RC, RR, BETA, loss_type, **kw)
    return float(losses[0]), float(chosen_r[0]), float(rejected_r[0])


def test_hand_numbers_are_what_we_think():
    assert NEG_LOGSIG_POS == pytest.approx(0.598138869, abs=1e-9)
    assert NEG_LOGSIG_NEG == pytest.approx(0.798138869, abs=1e-9)


def test_sigmoid_dpo():
    loss, chosen_r, rejected_r = loss_of("sigmoid")
    assert loss == pytest.approx(NEG_LOGSIG_POS, abs=1e-6)
    assert chosen_r == pytest.approx(0.1 * 1)  # beta * chosen log-ratio
    assert rejected_r == pytest.approx(0.1 * -1)


def test_cdpo_label_smoothing():
    # 0.9 * 0.598138869 + 0.1 * 0.798138869 = 0.538324982 + 0.079813887 = 0.618138869
    assert loss_of("sigmoid", label_smoothing=0.1)[0] == pytest.approx(0.618138869, abs=1e-6)


def test_robust():
    # (0.9 * 0.598138869 - 0.1 * 0.798138869) / (1 - 0.2) = 0.458511095 / 0.8 = 0.573138869
    assert loss_of("robust", label_smoothing=0.1)[0] == pytest.approx(0.573138869, abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        loss_of("robust", label_smoothing=0.5)


def test_hinge():
    # relu(1 - 0.2) = 0.8; and zero once beta*h >= 1
    assert loss_of("hinge")[0] == pytest.approx(0.8, abs=1e-6)
    big = preference_loss(torch.tensor([0.0]), torch.tensor([-20.0]), torch.tensor([0.0]),
                          torch.tensor([0.0]), BETA, "hinge")[0]
    assert float(big[0]) == 0.0  # h = 20, beta*h = 2 -> relu(-1) = 0


def test_ipo_sum_is_the_paper_form_on_summed_logps():
    # (h - 1/(2 beta))^2 = (2 - 5)^2 = 9
    assert loss_of("ipo_sum")[0] == pytest.approx(9.0, abs=1e-5)


def test_ipo_length_normalized():
    # chosen log-ratio 1 over 2 tokens = 0.5; rejected -1 over 4 tokens = -0.25; h = 0.75
    # (0.75 - 5)^2 = 18.0625
    kw = dict(chosen_tokens=torch.tensor([2]), rejected_tokens=torch.tensor([4]))
    assert loss_of("ipo", **kw)[0] == pytest.approx(18.0625, abs=1e-5)
    with pytest.raises(ValueError, match="tokens"):
        loss_of("ipo")


def _trl_ipo(policy_c, policy_r, ref_c, ref_r, tokens_c, tokens_r, beta):
    """TRL's DPOTrainer with loss_type="ipo", written out independently: its concatenated forward
    divides each sequence's summed log-probs by its completion length (policy and reference
    alike), then logits = (pi_c - pi_r) - (ref_c - ref_r) and loss = (logits - 1/(2 beta))^2."""
    pi_c, pi_r = policy_c / tokens_c, policy_r / tokens_r
    r_c, r_r = ref_c / tokens_c, ref_r / tokens_r
    return ((pi_c - pi_r) - (r_c - r_r) - 1 / (2 * beta)) ** 2


def test_ipo_matches_trl_definition_on_fixed_tensors():
    torch.manual_seed(0)
    policy_c, policy_r = -torch.rand(6) * 40, -torch.rand(6) * 40
    ref_c, ref_r = -torch.rand(6) * 40, -torch.rand(6) * 40
    tokens_c, tokens_r = torch.tensor([3, 7, 1, 12, 5, 9]), torch.tensor([4, 2, 8, 1, 6, 11])
    ours = preference_loss(policy_c, policy_r, ref_c, ref_r, 0.3, "ipo",
                           chosen_tokens=tokens_c, rejected_tokens=tokens_r)[0]
    trl = _trl_ipo(policy_c, policy_r, ref_c, ref_r, tokens_c, tokens_r, 0.3)
    torch.testing.assert_close(ours, trl)
    summed = preference_loss(policy_c, policy_r, ref_c, ref_r, 0.3, "ipo_sum")[0]
    assert not torch.allclose(summed, trl)  # the two names are different losses


def test_sft_term_adds_weighted_chosen_nll():
    # mean token NLL of chosen = 10 / 2 tokens = 5; weight 0.5 -> +2.5
    loss = loss_of("sigmoid", sft_weight=0.5, chosen_tokens=torch.tensor([2]),
                   rejected_tokens=torch.tensor([3]))[0]
    assert loss == pytest.approx(NEG_LOGSIG_POS + 2.5, abs=1e-6)


def test_sft_term_is_trl_token_mean_nll_over_the_batch():
    """rpo_alpha as TRL computes it: one token mean of the chosen NLL over the batch (TRL's
    cross-entropy over the chosen half), not a mean of per-sequence means."""
    nll = torch.tensor([10.0, 30.0, 4.0])  # summed chosen NLL per pair
    tokens = torch.tensor([2, 10, 4])
    zeros = torch.zeros(3)
    with_sft = preference_loss(-nll, zeros, zeros, zeros, BETA, chosen_tokens=tokens,
                               rejected_tokens=tokens, sft_weight=0.5)[0]
    without = preference_loss(-nll, zeros, zeros, zeros, BETA)[0]
    trl = 0.5 * nll.sum() / tokens.sum()  # CrossEntropyLoss(mean) over the 16 chosen tokens
    torch.testing.assert_close((with_sft - without).mean(), trl.double(), check_dtype=False)
    assert abs(float((nll / tokens).mean()) * 0.5 - float(trl)) > 0.1  # the other reading differs
    # Split over workers, each pair's term uses the global batch's mean length: same total.
    halves = [preference_loss(-nll[s], zeros[s], zeros[s], zeros[s], BETA, sft_weight=0.5,
                              sft_mean_tokens=tokens.double().mean())[0]
              - preference_loss(-nll[s], zeros[s], zeros[s], zeros[s], BETA)[0]
              for s in (slice(0, 1), slice(1, 3))]
    torch.testing.assert_close(torch.cat(halves).mean(), trl.double(), check_dtype=False)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(loss_type):
    logps = torch.tensor([-5.0, -40.0, -0.5])
    losses, chosen_r, rejected_r = preference_loss(logps, logps - 3, logps, logps - 3, 0.1,
                                                   loss_type, label_smoothing=0.2)
    assert torch.allclose(losses, torch.full((3,), math.log(2)), atol=1e-7)
    assert torch.count_nonzero(chosen_r) == 0 and torch.count_nonzero(rejected_r) == 0


def test_reward_model_loss():
    # -log sigma(1 - 0) = log(1 + e^-1) = 0.313261687; equal scores -> ln 2; margin 1 -> ln 2
    assert float(reward_model_loss(torch.tensor([1.0]), torch.tensor([0.0]))[0]) == pytest.approx(
        0.313261687, abs=1e-6)
    assert float(reward_model_loss(torch.tensor([3.0]), torch.tensor([3.0]))[0]) == pytest.approx(
        math.log(2), abs=1e-7)
    assert float(reward_model_loss(torch.tensor([1.0]), torch.tensor([0.0]),
                                   margin=torch.tensor([1.0]))[0]) == pytest.approx(math.log(2))


def test_gradient_direction_raises_chosen_lowers_rejected():
    pc, pr = torch.tensor([-10.0], requires_grad=True), torch.tensor([-12.0], requires_grad=True)
    losses, _, _ = preference_loss(pc, pr, RC, RR, BETA)
    losses.sum().backward()
    assert pc.grad[0] < 0 < pr.grad[0]  # descending the loss raises logp(chosen)


def test_metrics_names_and_values():
    losses, chosen_r, rejected_r = preference_loss(
        torch.tensor([-10.0, -10.0]), torch.tensor([-12.0, -9.0]), torch.tensor([-11.0, -11.0]),
        torch.tensor([-11.0, -11.0]), BETA)
    # The functions the training loop logs with: per-pair sums, then means over pairs.
    sums = metrics.pair_sums(losses, chosen_r, rejected_r, torch.tensor([-10.0, -10.0]),
                             torch.tensor([-12.0, -9.0]), tokens=40)
    m = metrics.means(sums.tolist(), prefix="eval_")
    assert metrics.total(sums.tolist(), "pairs") == 2 and metrics.total(sums.tolist(), "tokens") == 40
    # rewards chosen 0.1, 0.1; rejected -0.1, +0.2 -> accuracies 1/2, margins (0.2 - 0.1)/2
    assert m["eval_rewards/accuracies"] == pytest.approx(0.5)
    assert m["eval_rewards/margins"] == pytest.approx(0.05)
    assert m["eval_rewards/chosen"] == pytest.approx(0.1)
    assert m["eval_rewards/rejected"] == pytest.approx(0.05)
    assert m["eval_logps/rejected"] == pytest.approx(-10.5)
    assert set(m) == {f"eval_{k}" for k in ("loss", "rewards/chosen", "rewards/rejected",
                      "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")}


def test_unknown_loss_type_names_choices():
    with pytest.raises(ValueError, match="hinge"):
        loss_of("kto")
    assert set(LOSSES) >= {"sigmoid", "robust", "hinge", "ipo", "ipo_sum"}


def test_reward_model_metrics_have_no_logps():
    scores_c, scores_r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    sums = metrics.pair_sums(reward_model_loss(scores_c, scores_r), scores_c, scores_r)
    m = metrics.means(sums.tolist(), objective="reward_model")
    assert m["rewards/accuracies"] == pytest.approx(0.5) and "logps/chosen" not in m


def test_every_rank_gets_the_global_batch_mean_chosen_length():
    """The SFT term's normalizer comes from the whole global batch, so each rank's micro-batches,
    whatever the world size and accumulation, carry the same value (the loss split invariance
    above then holds in training)."""
    import numpy as np

    from dpo_ray.training.loop import RankPairCollate

    chosen = [[1, 2, 3], [1, 2, 3, 4, 5, 6], [1, 2, 3, 4], [1, 9, 9, 9, 9, 9, 9, 9]]
    batch = {"pair_id": np.array([str(i) * 32 for i in range(4)]),
             "chosen_input_ids": np.array([np.array(c) for c in chosen], dtype=object),
             "rejected_input_ids": np.array([np.array([1, 2, 7]) for _ in chosen], dtype=object),
             "prompt_length": np.array([2, 2, 3, 1])}
    expected = np.mean([3 - 2, 6 - 2, 4 - 3, 8 - 1])  # response tokens per pair
    for world, accumulation in ((1, 1), (2, 1), (2, 2), (4, 1)):
        for rank in range(world):
            for micro in RankPairCollate(rank, world, accumulation, pad_id=0)(batch):
                assert float(micro["chosen_mean_tokens"]) == expected
