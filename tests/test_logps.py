"""``sequence_logps`` and ``concatenated_forward`` against independent computations.

GPT-2 uses absolute position embeddings, so it is the model where left padding goes wrong if
position ids are not handled; Llama (RoPE) is checked too.
"""

import pytest
import torch

from helpers import tiny_causal_lm

from dpo_ray.logps import (
    IGNORE_INDEX, concatenate_pairs, concatenated_forward, keeps_logits, model_forward_logits, pad_sequences,
    response_labels, response_logps, sequence_logps,
)

VOCAB, PAD = 101, 0


def tiny(arch: str):
    return tiny_causal_lm(arch, VOCAB)


# (prompt, response) token ids of different lengths
PAIRS = [([5, 6, 7], [8, 9]), ([11, 12], [13, 14, 15, 16]), ([21, 22, 23, 24, 25], [26])]


def loop_logps(model, prompt, response):
    """Independent: run the unpadded sequence alone and add log-probs token by token."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    total = 0.0
    for t in range(len(prompt), len(prompt) + len(response)):
        total += float(logprobs[t - 1, ids[0, t]])  # position t-1 predicts token t
    return total


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_logps_matches_token_loop(arch, side):
    model = tiny(arch)
    ids, mask = pad_sequences([p + r for p, r in PAIRS], PAD, side=side)
    labels = response_labels(ids, torch.tensor([len(p) for p, _ in PAIRS]), mask)
    with torch.no_grad():
        logps, counts = sequence_logps(model_forward_logits(model, ids, mask), labels)
    assert counts.tolist() == [len(r) for _, r in PAIRS]
    expected = torch.tensor([loop_logps(model, p, r) for p, r in PAIRS], dtype=torch.float64)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_response_only_logits_give_the_full_logits_values_and_gradients(arch, side):
    """``response_logps`` runs the LM head on response positions only (transformers' boolean
    ``logits_to_keep``): same log-probs and same gradients as the full (B, T, V) path, and as the
    token-by-token loop. Also through PEFT's wrapper, which must pass the mask on."""
    model = tiny(arch)
    assert keeps_logits(model)
    ids, mask = pad_sequences([p + r for p, r in PAIRS], PAD, side=side)
    labels = response_labels(ids, torch.tensor([len(p) for p, _ in PAIRS]), mask)
    kept, kept_counts = response_logps(model, ids, mask, labels)
    kept.sum().backward()
    kept_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full, full_counts = sequence_logps(model_forward_logits(model, ids, mask), labels)
    full.sum().backward()
    assert kept_counts.tolist() == full_counts.tolist() == [len(r) for _, r in PAIRS]
    torch.testing.assert_close(kept, full, atol=1e-6, rtol=0)
    for a, b in zip(kept_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    expected = torch.tensor([loop_logps(model, p, r) for p, r in PAIRS], dtype=torch.float64)
    torch.testing.assert_close(kept.detach(), expected, atol=1e-5, rtol=0)


def test_response_only_logits_through_peft_and_a_model_without_the_option():
    from peft import LoraConfig, get_peft_model

    model = tiny("llama")
    ids, mask = pad_sequences([p + r for p, r in PAIRS], PAD)
    labels = response_labels(ids, torch.tensor([len(p) for p, _ in PAIRS]), mask)
    with torch.no_grad():
        full, _ = sequence_logps(model_forward_logits(model, ids, mask), labels)
        peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        assert keeps_logits(peft)
        torch.testing.assert_close(response_logps(peft, ids, mask, labels)[0], full, atol=1e-6, rtol=0)

    class NoOption(torch.nn.Module):  # a remote-code model whose forward lacks the argument
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, use_cache):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, use_cache=use_cache)

    plain = NoOption(tiny("llama"))
    assert not keeps_logits(plain)
    with torch.no_grad():
        torch.testing.assert_close(response_logps(plain, ids, mask, labels)[0], full, atol=1e-6, rtol=0)


def test_sequence_logps_matches_model_mean_loss_times_count():
    model = tiny("llama")
    prompt, response = PAIRS[1]
    ids = torch.tensor([prompt + response])
    labels = ids.clone()
    labels[0, : len(prompt)] = IGNORE_INDEX
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)  # HF shifts internally; mean over response
        logps, counts = sequence_logps(out.logits, labels)
    torch.testing.assert_close(logps[0].float(), -out.loss * counts[0], atol=1e-5, rtol=0)


def test_response_labels_mask_prompt_and_padding_for_both_sides():
    ids, mask = pad_sequences([[1, 2, 3, 4], [5, 6]], PAD, side="left")
    labels = response_labels(ids, torch.tensor([2, 1]), mask)
    assert labels.tolist() == [[-100, -100, 3, 4], [-100, -100, -100, 6]]
    ids, mask = pad_sequences([[1, 2, 3, 4], [5, 6]], PAD, side="right")
    labels = response_labels(ids, torch.tensor([2, 1]), mask)
    assert labels.tolist() == [[-100, -100, 3, 4], [-100, 6, -100, -100]]


def test_concatenated_forward_equals_separate_passes():
    model = tiny("gpt2")
    prompts = [p for p, _ in PAIRS]
    chosen = [p + r for p, r in PAIRS]
    rejected = [p + r[::-1] + [42, 43] for p, r in PAIRS]  # longer: exercises the widening pad
    c_ids, c_mask = pad_sequences(chosen, PAD)
    r_ids, r_mask = pad_sequences(rejected, PAD)
    with torch.no_grad():
        out = concatenated_forward(model, c_ids, c_mask, r_ids, r_mask,
                                   torch.tensor([len(p) for p in prompts]), PAD)
    expected_c = [loop_logps(model, p, s[len(p):]) for p, s in zip(prompts, chosen)]
    expected_r = [loop_logps(model, p, s[len(p):]) for p, s in zip(prompts, rejected)]
    torch.testing.assert_close(out["chosen_logps"], torch.tensor(expected_c, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["rejected_logps"], torch.tensor(expected_r, dtype=torch.float64), atol=1e-5, rtol=0)
    assert out["rejected_tokens"].tolist() == [len(s) - len(p) for p, s in zip(prompts, rejected)]


def test_concatenate_pairs_stacks_chosen_over_rejected_with_right_padding():
    c_ids, c_mask = pad_sequences([[5, 6, 7], [8]], PAD)  # (2, 3)
    r_ids, r_mask = pad_sequences([[9, 10, 11, 12, 13], [14, 15]], PAD)  # (2, 5)
    ids, mask = concatenate_pairs(c_ids, c_mask, r_ids, r_mask, PAD)
    assert ids.tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0],
                            [9, 10, 11, 12, 13], [14, 15, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0],
                             [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="disagree"):
        sequence_logps(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
