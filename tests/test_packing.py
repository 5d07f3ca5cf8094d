"""The padding-free, shared-prompt path (``pack_pairs`` + ``packed_logps``) gives the padded
path's log-probs and gradients: tiny GPT-2 (absolute positions) and Llama (RoPE) with SDPA and
eager attention, both padding sides, one-token responses, a prompt of one token, pairs whose
prompts differ; SmolLM2 on real HH pairs, plain and conversational, with left and right prompt
truncation."""

import gzip
import json
import re

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import records_batch, tiny_causal_lm

from dpo_ray.logps import collate_pairs, concatenated_forward, pack_pairs, packs, pad_sequences

VOCAB, PAD = 101, 0

# (prompt, chosen response, rejected response): different lengths, one-token responses, a
# one-token prompt
PAIRS = [
    ([5, 6, 7], [8, 9], [10, 11, 12, 13]),
    ([11, 12], [13, 14, 15, 16], [17]),
    ([21, 22, 23, 24, 25], [26], [27]),
    ([30], [31, 32, 33], [34, 35]),
]


def tiny(arch: str, attn: str = "sdpa"):
    return tiny_causal_lm(arch, VOCAB, attn)


def padded_pairs(pairs, side="right"):
    c_ids, c_mask = pad_sequences([p + c for p, c, _ in pairs], PAD, side=side)
    r_ids, r_mask = pad_sequences([p + r for p, _, r in pairs], PAD, side=side)
    return c_ids, c_mask, r_ids, r_mask, torch.tensor([len(p) for p, _, _ in pairs])


def both_paths(model, tensors, packed_vocab_chunk=0):
    """(packed, padded) outputs of ``concatenated_forward`` and the gradient of a loss on each
    (the packed path's log-probs in vocabulary chunks when ``packed_vocab_chunk`` > 0)."""
    results = []
    for padding_free in (True, False):
        model.zero_grad()
        out = concatenated_forward(model, *tensors, PAD, padding_free=padding_free,
                                   vocab_chunk=packed_vocab_chunk if padding_free else 0)
        (out["chosen_logps"].sum() - 2 * out["rejected_logps"].sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append(({k: v.detach() for k, v in out.items()}, grads))
    return results


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_packed_logps_and_gradients_equal_the_padded_path(arch, attn, side):
    model = tiny(arch, attn)
    assert packs(model)
    (packed, packed_grads), (padded, padded_grads) = both_paths(model, padded_pairs(PAIRS, side))
    for key in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(packed[key], padded[key], atol=1e-5, rtol=0)
    for key in ("chosen_tokens", "rejected_tokens"):
        assert packed[key].tolist() == padded[key].tolist()
    assert packed["chosen_tokens"].tolist() == [len(c) for _, c, _ in PAIRS]
    torch.testing.assert_close(packed_grads, padded_grads, atol=1e-5, rtol=1e-4)


def test_the_prompt_is_computed_once_and_rows_hold_several_pairs():
    pairs = [([1, 2, 3, 4], [5, 6, 7], [8, 9, 10]), ([11, 12], [13, 14], [15]), ([21], [22, 23], [24])]
    packed = pack_pairs(*padded_pairs(pairs))
    # segments of 10, 5 and 4 tokens: the two short ones share the second row, no padding inside
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
                                         [11, 12, 13, 14, 15, 21, 22, 23, 24, PAD]]
    # positions restart per segment, and the rejected response restarts after the prompt
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 4, 5, 6],
                                            [0, 1, 2, 3, 2, 0, 1, 2, 1, 0]]
    # rejected token 15 sees its prompt and itself, not the chosen response nor the other pair
    assert packed.allowed[1, 4].tolist() == [True, True, False, False, True] + [False] * 5
    assert packed.allowed[1, 6].tolist() == [False] * 5 + [True, True] + [False] * 3
    assert packed.allowed[1, 9].tolist() == [False] * 9 + [True]  # padding sees only itself
    # c0 and r0 are both predicted by the last prompt token, whose logits are computed once
    assert packed.predictor.tolist().count(3) == 2
    assert packed.targets.numel() == 12  # every response token of the 3 pairs...
    assert int(packed.keep.sum()) == len(set(packed.predictor.tolist())) == 12 - 3  # ...9 logit rows
    assert packed.owner.tolist().count(0) == 3 and packed.owner.tolist().count(3) == 3


def test_pairs_with_different_prompts_become_two_segments():
    """Not produced by the tokenizer stage, but the function stays exact for any input."""
    model = tiny("llama")
    pairs = [([5, 6, 7], [8, 9], [10]), ([11, 12], [13], [14, 15])]
    c_ids, c_mask, r_ids, r_mask, prompts = padded_pairs(pairs)
    r_ids[0, 1] = 40  # rejected prompt differs from the chosen one
    (packed, _), (padded, _) = both_paths(model, (c_ids, c_mask, r_ids, r_mask, prompts))
    torch.testing.assert_close(packed["rejected_logps"], padded["rejected_logps"], atol=1e-5, rtol=0)
    assert pack_pairs(c_ids, c_mask, r_ids, r_mask, prompts).predictor.numel() == 6


def test_flash_attention_models_take_the_padded_path():
    model = tiny("llama")
    model.config._attn_implementation = "flash_attention_2"
    assert not packs(model)


def _hh_records(hh_path, n: int, conversational: bool) -> pa.Table:
    """The first n HH lines as the data stage's record batch; conversational: each dialogue's
    turns as chat messages (the last assistant turn is the response)."""
    rows = [json.loads(line) for line in gzip.open(hh_path, "rt").read().splitlines()[:n]]
    if conversational:
        for i, pair in enumerate(rows):
            turns = {}
            for side in ("chosen", "rejected"):
                parts = re.split(r"\n\n(Human|Assistant): ?", pair[side])[1:]
                turns[side] = [{"role": "user" if who == "Human" else "assistant", "content": text}
                               for who, text in zip(parts[::2], parts[1::2])]
            rows[i] = {"prompt": turns["chosen"][:-1], "chosen": turns["chosen"][-1:],
                       "rejected": turns["rejected"][-1:]}
    return records_batch(rows, str(hh_path))


@pytest.mark.slow  # the real model's forward and backward, twice per case
@pytest.mark.parametrize("conversational", [False, True], ids=["hh", "chat"])
def test_smollm2_on_real_hh_pairs(smollm2, hh_path, conversational):
    """Real model, real pairs tokenized by the data stage's own tokenizer: 6 HH pairs cut to 96
    tokens (prompts cut from the left, responses from the right), plain and as chat messages;
    the packed path (log-probs in 8192-entry vocabulary chunks, as by default) and the padded
    path (whole logits) give the same log-probs and gradients."""
    from dpo_ray.config import DataConfig
    from dpo_ray.data.tokenize import PairTokenizer

    cfg = DataConfig(source=str(hh_path), tokenizer=str(smollm2), max_length=96, max_prompt_length=48)
    rows = PairTokenizer(cfg)(_hh_records(hh_path, 6, conversational))
    assert rows.column("skip_reason").null_count == 6
    assert any(rows.column("prompt_truncated").to_pylist()) and any(rows.column("chosen_truncated").to_pylist())
    assert set(rows.column("format").to_pylist()) == {"conversational" if conversational else "implicit"}
    batch = collate_pairs({k: rows.column(k).to_numpy(zero_copy_only=False)
                           for k in ("chosen_input_ids", "rejected_input_ids", "prompt_length")}, pad_id=0)
    model = AutoModelForCausalLM.from_pretrained(smollm2, attn_implementation="sdpa").train()
    tensors = tuple(batch[k] for k in ("chosen_input_ids", "chosen_attention_mask", "rejected_input_ids",
                                      "rejected_attention_mask", "prompt_lengths"))
    (packed, packed_grads), (padded, padded_grads) = both_paths(model, tensors, packed_vocab_chunk=8192)
    for key in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(packed[key], padded[key], atol=2e-4, rtol=0)  # measured 4e-5
    assert packed["rejected_tokens"].tolist() == padded["rejected_tokens"].tolist()
    # 134M float32 gradients summed in different orders: compared as a whole, not entry by entry
    relative = float((packed_grads - padded_grads).norm() / padded_grads.norm())
    assert relative < 1e-5  # measured 2.3e-6
