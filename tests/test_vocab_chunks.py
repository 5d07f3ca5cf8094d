"""Log-probs a vocabulary chunk at a time (``logps._ChunkedTokenLogps``, on by default) give the
whole-logits values and gradients: padded and packed paths, GPT-2 (tied head) and Llama with a
biased head, chunks that do not divide the vocabulary, under bf16 autocast; and which heads the
chunked path takes (the real-model check is tests/test_packing.py's SmolLM2 test)."""

import pytest
import torch

from dpo_ray.logps import concatenated_forward, output_head, pad_sequences
from helpers import tiny_causal_lm

VOCAB, PAD, CHUNK = 101, 0, 16  # 7 chunks, the last one of 5 entries

PAIRS = [([5, 6, 7], [8, 9], [10, 11, 12, 13]), ([11, 12], [13, 14, 15, 16], [17]),
         ([21, 22, 23, 24, 25], [26], [27])]


def tensors():
    c_ids, c_mask = pad_sequences([p + c for p, c, _ in PAIRS], PAD)
    r_ids, r_mask = pad_sequences([p + r for p, _, r in PAIRS], PAD)
    return c_ids, c_mask, r_ids, r_mask, torch.tensor([len(p) for p, _, _ in PAIRS])


def biased(model):
    """The model with an untied LM head that has a bias (as some architectures do)."""
    head = torch.nn.Linear(model.config.hidden_size, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.get_output_embeddings().weight)
        head.bias.normal_(0, 0.5)
    model.config.tie_word_embeddings = False
    model.set_output_embeddings(head)
    return model


def run(model, chunk, padding_free, bf16=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = concatenated_forward(model, *tensors(), PAD, padding_free=padding_free, vocab_chunk=chunk)
        loss = (out["chosen_logps"] * 0.7 - out["rejected_logps"]).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return torch.cat([out["chosen_logps"], out["rejected_logps"]]).detach(), grads


@pytest.mark.parametrize("padding_free", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("arch", ["gpt2", "llama-bias"])
def test_chunked_log_probs_and_gradients_equal_the_whole_logits(arch, padding_free):
    model = tiny_causal_lm(arch.split("-")[0], VOCAB, "sdpa")
    if arch.endswith("bias"):
        model = biased(model)
    head = output_head(model, CHUNK)
    assert head is model.get_output_embeddings()
    whole, whole_grads = run(model, 0, padding_free)
    chunked, chunked_grads = run(model, CHUNK, padding_free)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    assert set(chunked_grads) == set(whole_grads)  # the head's weight (and bias) included
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    if arch.endswith("bias"):
        assert head.bias.grad is not None and head.bias.grad.abs().sum() > 0
    with torch.no_grad():  # no autograd graph: forward only, as the reference scorer runs it
        torch.testing.assert_close(run_no_grad(model, CHUNK, padding_free), whole, atol=1e-5, rtol=0)


def run_no_grad(model, chunk, padding_free):
    out = concatenated_forward(model, *tensors(), PAD, padding_free=padding_free, vocab_chunk=chunk)
    return torch.cat([out["chosen_logps"], out["rejected_logps"]])


def test_chunked_under_bf16_autocast_stays_within_rounding_of_the_whole_logits():
    model = tiny_causal_lm("llama", VOCAB, "sdpa")
    whole, whole_grads = run(model, 0, True, bf16=True)
    chunked, chunked_grads = run(model, CHUNK, True, bf16=True)
    torch.testing.assert_close(chunked, whole, atol=0.05, rtol=0.01)
    flat = lambda grads: torch.cat([g.flatten().float() for _, g in sorted(grads.items())])  # noqa: E731
    assert float((flat(chunked_grads) - flat(whole_grads)).norm() / flat(whole_grads).norm()) < 0.02


def test_heads_the_chunked_path_cannot_serve_take_the_whole_logits():
    model = tiny_causal_lm("llama", VOCAB, "sdpa")
    assert output_head(model, 0) is None  # vocab_chunk_size: 0
    assert output_head(model, VOCAB) is None  # one chunk would be the whole vocabulary
    model.config.final_logit_softcapping = 30.0  # logits changed after the head (Gemma 2)
    assert output_head(model, CHUNK) is None
    model.config.final_logit_softcapping = None
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_causal_lm("llama", VOCAB, "sdpa"),
                          LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert output_head(lora, CHUNK) is None  # a LoRA-wrapped head is not one weight
    plain_lora = get_peft_model(tiny_causal_lm("llama", VOCAB, "sdpa"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert output_head(plain_lora, CHUNK) is not None
    # and the wrapped model's values still equal the whole-logits path
    torch.testing.assert_close(run_no_grad(plain_lora, CHUNK, True), run_no_grad(plain_lora, 0, True),
                               atol=1e-5, rtol=0)
