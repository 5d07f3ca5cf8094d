"""Sequence log-probabilities of responses: the one function that scores both the cached
reference values and the live policy, so the two can never be computed differently.

Notation: B pairs in a batch, T tokens per padded sequence, V vocabulary size.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the labelled tokens of each sequence.

        logp(y | x) = sum_t  log softmax(logits[b, t-1])[labels[b, t]]   over t with labels != -100

    The model's logits at position t-1 predict the token at position t, so logits drop their
    last position and labels their first (the explicit shift). Prompt and padding positions carry
    ``labels == -100`` and contribute nothing, which makes left and right padding equally correct.

    Args:
        logits: (B, T, V) float, the model's output for ``input_ids`` (B, T).
        labels: (B, T) long, ``input_ids`` with -100 on prompt and padding positions.
    Returns:
        logps: (B,) float64, summed log-probs of response tokens. The sum is float64 because a
            float32 value near -4000 (a 400-token response) cannot hold more than ~2e-4 of
            precision, which is larger than the tolerance the cached values are checked to.
        token_counts: (B,) long, number of response tokens that were summed.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    logits = logits[:, :-1, :]  # (B, T-1, V): position t predicts token t+1 (a view, no copy)
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != IGNORE_INDEX
    token_logps = _token_logps(logits, labels.masked_fill(~mask, 0))  # (B, T-1)
    return (token_logps.double() * mask).sum(-1), mask.sum(-1)


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) = logit[target] - logsumexp(logits), float32; logits (..., V), targets (...).

    One read of the logits and no V-sized output, unlike log_softmax + gather (the vocabulary
    dominates small models' cost). It is also more exact: torch's float32 CPU log_softmax was
    measured ~1e-5/token off float64 on SmolLM2, this form ~1e-7 (tests/test_reference.py
    compares against float64).
    """
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


def response_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor, vocab_chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequence_logps`` of the model's output, computing vocabulary logits only at the positions
    whose next token is labelled (response tokens): prompt and padding positions go through the
    model body, where they are context, but not through the LM head.

    The LM head's (positions x V) logits are most of a small model's compute and memory; with
    prompts ~70% of the real tokens and padding on top, 10-15% of the positions need them. The
    kept positions go to transformers as a boolean ``logits_to_keep`` mask, which returns their
    logits flattened to (N, V) in row-major order; a model whose forward has no
    ``logits_to_keep`` returns (B, T, V), of which the same positions are kept. ``vocab_chunk``
    > 0: the head runs a vocabulary chunk at a time (``output_head``), never (N, V) whole.

    Shapes: input_ids, attention_mask, labels (B, T) -> logps (B,) float64, token counts (B,).
    """
    predicts = torch.zeros_like(labels, dtype=torch.bool)  # (B, T): position t predicts t + 1
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    kwargs = {"logits_to_keep": predicts} if keeps_logits(model) else {}
    head = output_head(model, vocab_chunk)
    with _head_skipped(head):
        out = model_forward_logits(model, input_ids, attention_mask, **kwargs)
    if out.ndim == 3:  # (B, T, D): every position; keep the predicting ones, row-major
        out = out[predicts]
    targets = labels[:, 1:][predicts[:, :-1]]  # (N,)
    token_logps = terms_logps(out, torch.arange(len(targets), device=out.device), targets, head, vocab_chunk)
    logps = torch.zeros(labels.shape[0], dtype=torch.float64, device=labels.device)
    return logps.index_add(0, predicts.nonzero()[:, 0], token_logps.double()), predicts.sum(-1)


def terms_logps(out: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, head=None,
                vocab_chunk: int = 0) -> torch.Tensor:
    """log p(targets[n] | row rows[n]) for N terms, float32: ``out`` is the (K, V) logits of K
    positions, or, with ``head`` (``output_head``), their (K, H) hidden states, which the head
    turns into log-probs ``vocab_chunk`` vocabulary entries at a time (``_ChunkedTokenLogps``).
    One logsumexp per position, however many terms share it (the packed path's first chosen and
    first rejected token share the last prompt token's)."""
    if head is not None:
        return _ChunkedTokenLogps.apply(out, head.weight, head.bias, rows, targets, vocab_chunk)
    picked = out[rows, targets].float()  # (N,)
    return picked - torch.logsumexp(out.float(), dim=-1)[rows]


def keeps_logits(model) -> bool:
    """Whether the (possibly DDP-, FSDP- or PEFT-wrapped) model's forward takes a
    ``logits_to_keep`` mask (transformers' causal LMs do)."""
    return _forward_takes_logits_to_keep(type(_inner(model)))


def _inner(model):
    """The transformers model inside DDP (``.module``) and PEFT (``.base_model.model``) wrappers."""
    inner = model
    for _ in range(4):
        inner = getattr(inner, "module", None) or getattr(getattr(inner, "base_model", None), "model", None) or inner
    return inner


@cache
def _forward_takes_logits_to_keep(cls: type) -> bool:  # per class, not per forward pass
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def response_labels(input_ids: torch.Tensor, prompt_lengths: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """``input_ids`` (B, T) with -100 over padding and over each row's first ``prompt_length``
    real tokens (works for left and right padding: prompts are counted from the first real token).
    """
    position = attention_mask.long().cumsum(-1) - 1  # index among real tokens, -1 on left padding
    is_response = (position >= prompt_lengths[:, None]) & attention_mask.bool()
    return input_ids.masked_fill(~is_response, IGNORE_INDEX)


def pad_sequences(sequences: list[list[int]], pad_id: int, side: str = "right",
                  length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of token ids -> (input_ids (B, T), attention_mask (B, T)), padded on ``side``."""
    width = max(len(s) for s in sequences) if length is None else length
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        seq_t = torch.as_tensor(seq, dtype=torch.long)
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, span], mask[row, span] = seq_t, 1
    return ids, mask


def collate_pairs(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of B pairs (numpy columns of token-id lists, as Ray Data hands them) -> tensors:
    chosen and rejected each right-padded, pairs aligned row by row. Used by the reference scorer
    and the training loop alike.

    Returns (B, Tc)/(B, Tr) ``*_input_ids`` and ``*_attention_mask``, (B,) ``prompt_lengths``, and
    (B,) ``ref_*_logps`` when the batch has them (training batches of a DPO run).
    """
    chosen_ids, chosen_mask = pad_sequences([list(x) for x in batch["chosen_input_ids"]], pad_id)
    rejected_ids, rejected_mask = pad_sequences([list(x) for x in batch["rejected_input_ids"]], pad_id)
    out = {
        "chosen_input_ids": chosen_ids, "chosen_attention_mask": chosen_mask,
        "rejected_input_ids": rejected_ids, "rejected_attention_mask": rejected_mask,
        "prompt_lengths": torch.as_tensor(np.asarray(batch["prompt_length"], dtype=np.int64)),
    }
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        if name in batch:
            out[name] = torch.as_tensor(np.asarray(batch[name], dtype=np.float64))
    return out


def model_forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         **kwargs) -> torch.Tensor:
    """Logits (B, T, V) with position ids that count real tokens only (``kwargs``: e.g.
    ``logits_to_keep``).

    Models with absolute position embeddings (GPT-2) would otherwise give left-padded sequences
    shifted positions and different log-probs.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids, use_cache=False, **kwargs).logits


def concatenate_pairs(chosen_input_ids: torch.Tensor, chosen_attention_mask: torch.Tensor,
                      rejected_input_ids: torch.Tensor, rejected_attention_mask: torch.Tensor,
                      pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack chosen over rejected, right-padded to a common width: rows [0, B) are the chosen
    sequences, rows [B, 2B) the rejected ones.

    Args:
        chosen_input_ids, rejected_input_ids: (B, Tc), (B, Tr) long.
        *_attention_mask: same shapes, 1 on real tokens.
    Returns (input_ids, attention_mask), each (2B, max(Tc, Tr)); padding is ``pad_id`` / 0.
    """
    width = max(chosen_input_ids.shape[1], rejected_input_ids.shape[1])

    def widen(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]), value=value)

    return (torch.cat([widen(chosen_input_ids, pad_id), widen(rejected_input_ids, pad_id)]),
            torch.cat([widen(chosen_attention_mask, 0), widen(rejected_attention_mask, 0)]))


def concatenated_forward(model, chosen_input_ids: torch.Tensor, chosen_attention_mask: torch.Tensor,
                         rejected_input_ids: torch.Tensor, rejected_attention_mask: torch.Tensor,
                         prompt_lengths: torch.Tensor, pad_id: int,
                         padding_free: bool = True, vocab_chunk: int = 0) -> dict[str, torch.Tensor]:
    """Chosen and rejected of B pairs through the model in one pass.

    ``padding_free`` (and a model that takes a custom attention mask, see ``packs``): each pair
    is one prompt|chosen|rejected segment, the prompt computed once, segments packed into a few
    rows with no padding between them (``pack_pairs``, ``packed_logps``). Otherwise chosen and
    rejected are stacked as (2B, T) rows right-padded to a common T (one pass instead of two
    halves the kernel launches and, under DDP/FSDP, the collective calls per step, as the
    original DPO repo does). Both give the same values to float rounding (tests/test_packing.py).
    ``vocab_chunk`` > 0: log-probs a vocabulary chunk at a time (``output_head``), either way.

    Args:
        chosen_input_ids, rejected_input_ids: (B, Tc), (B, Tr) long, prompt + response.
        *_attention_mask: same shapes, 1 on real tokens.
        prompt_lengths: (B,) long, where each response starts (same for chosen and rejected).
    Returns dict of (B,) tensors: ``chosen_logps``, ``rejected_logps``, ``chosen_tokens``,
        ``rejected_tokens``.
    """
    batch = chosen_input_ids.shape[0]
    if padding_free and packs(model):
        packed = pack_pairs(chosen_input_ids, chosen_attention_mask, rejected_input_ids,
                            rejected_attention_mask, prompt_lengths, pad_id)
        logps, tokens = packed_logps(model, packed, vocab_chunk)  # (2B,), (2B,)
    else:
        input_ids, attention_mask = concatenate_pairs(chosen_input_ids, chosen_attention_mask,
                                                      rejected_input_ids, rejected_attention_mask, pad_id)
        labels = response_labels(input_ids, prompt_lengths.repeat(2), attention_mask)  # (2B, T)
        logps, tokens = response_logps(model, input_ids, attention_mask, labels, vocab_chunk)  # (2B,), (2B,)
    return {
        "chosen_logps": logps[:batch], "rejected_logps": logps[batch:],
        "chosen_tokens": tokens[:batch], "rejected_tokens": tokens[batch:],
    }


# -- Padding-free packing with a shared prompt ------------------------------------------------
#
# One pair is one segment: prompt (P tokens), chosen response (C), rejected response (R).
#
#     tokens     p0 .. p(P-1) | c0 .. c(C-1) | r0 .. r(R-1)
#     positions  0  .. P-1    | P  .. P+C-1  | P  .. P+R-1       (rejected restarts after the prompt)
#     attends    causal       | prompt+self  | prompt+self, never the chosen response
#
# so every token sees exactly the context it has in its own unpadded sequence, and the prompt is
# computed once instead of twice. c0 and r0 are both predicted by the last prompt token's logits.
# Segments are packed into rows no longer than the longest segment; a block-diagonal mask keeps
# segments from seeing each other. A pair whose chosen and rejected prompts differ (they never
# do for tokenized pairs, which share prompt_length and prompt tokens) becomes two segments.

PACKED_ATTENTION = ("sdpa", "eager")  # implementations that take a custom (R, 1, L, L) mask


def packs(model) -> bool:
    """Whether the model can run the packed path: a transformers model whose attention takes a
    custom 4D mask (SDPA or eager; flash attention cannot express the shared-prompt mask)."""
    config = getattr(_inner(model), "config", None)
    return getattr(config, "_attn_implementation", None) in PACKED_ATTENTION


@dataclass(frozen=True)
class PackedPairs:
    """B pairs as segments packed into R rows of L tokens, and where each log-prob term is.

    input_ids, position_ids: (R, L) long (padding: token 0, position 0).
    allowed: (R, L, L) bool, query i may attend to key j (a padding position only to itself).
    keep: (R, L) bool, positions whose logits some target needs.
    predictor: (N,) long, flat index (row * L + column) of the position predicting each target.
    targets: (N,) long, the target token ids.  owner: (N,) long, 0..B-1 chosen, B..2B-1 rejected.
    """
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    keep: torch.Tensor
    predictor: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor
    sequences: int  # 2B


def _segments(chosen: list[int], rejected: list[int], prompt_length: int, b: int, batch: int) -> list[dict]:
    """One pair's segments: tokens, positions, the [start, end) span of the chosen response (which
    the rejected one may not see), and (predictor, target, owner) triples, all segment-local."""
    def alone(tokens: list[int], owner: int) -> dict:
        terms = [(t - 1, tokens[t], owner) for t in range(max(prompt_length, 1), len(tokens))]
        return {"tokens": tokens, "positions": list(range(len(tokens))), "hidden": (0, 0), "terms": terms}

    if chosen[:prompt_length] != rejected[:prompt_length]:
        return [alone(chosen, b), alone(rejected, batch + b)]
    p, n_c = prompt_length, len(chosen)
    segment = alone(chosen, b)
    segment["tokens"] = chosen + rejected[p:]
    segment["positions"] += list(range(p, len(rejected)))
    segment["hidden"] = (p, n_c)
    for j in range(len(rejected) - p):  # r_j is predicted by r_(j-1), r_0 by the last prompt token
        predictor = p - 1 if j == 0 else n_c + j - 1
        if predictor >= 0:
            segment["terms"].append((predictor, rejected[p + j], batch + b))
    return [segment]


def pack_pairs(chosen_input_ids: torch.Tensor, chosen_attention_mask: torch.Tensor,
               rejected_input_ids: torch.Tensor, rejected_attention_mask: torch.Tensor,
               prompt_lengths: torch.Tensor, pad_id: int = 0) -> PackedPairs:
    """Padded pairs (as ``collate_pairs`` makes them, either padding side) -> ``PackedPairs``.

    Rows are filled first-fit by decreasing segment length, each row at most as long as the
    longest segment, so attention (quadratic in the row length) costs no more than one pair's.
    """
    batch = chosen_input_ids.shape[0]
    segments = []
    for b in range(batch):
        chosen = chosen_input_ids[b][chosen_attention_mask[b].bool()].tolist()
        rejected = rejected_input_ids[b][rejected_attention_mask[b].bool()].tolist()
        segments += _segments(chosen, rejected, int(prompt_lengths[b]), b, batch)
    capacity = max(len(s["tokens"]) for s in segments)
    rows: list[list[dict]] = []
    for segment in sorted(segments, key=lambda s: -len(s["tokens"])):
        row = next((r for r in rows if sum(len(s["tokens"]) for s in r) + len(segment["tokens"]) <= capacity), None)
        if row is None:
            rows.append(row := [])
        row.append(segment)
    width = max(sum(len(s["tokens"]) for s in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding sees itself
    predictor, targets, owner = [], [], []
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            n, end = len(s["tokens"]), start + len(s["tokens"])
            input_ids[r, start:end] = torch.tensor(s["tokens"])
            position_ids[r, start:end] = torch.tensor(s["positions"])
            allowed[r, start:end, start:end] = torch.ones(n, n, dtype=torch.bool).tril()
            hide_from, hide_to = s["hidden"]  # rejected tokens (after the chosen) never see it
            allowed[r, start + hide_to:end, start + hide_from:start + hide_to] = False
            for pos, target, who in s["terms"]:
                predictor.append(r * width + start + pos)
                targets.append(target)
                owner.append(who)
            start = end
    predictor_t = torch.tensor(predictor, dtype=torch.long)
    keep = torch.zeros(len(rows) * width, dtype=torch.bool)
    keep[predictor_t] = True
    device = chosen_input_ids.device
    return PackedPairs(input_ids.to(device), position_ids.to(device), allowed.to(device),
                       keep.view(len(rows), width).to(device), predictor_t.to(device),
                       torch.tensor(targets, dtype=torch.long, device=device),
                       torch.tensor(owner, dtype=torch.long, device=device), 2 * batch)


def packed_logps(model, packed: PackedPairs, vocab_chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of the 2B sequences of ``packed`` in one forward:

        logp(seq k) = sum over terms n with owner[n] = k of
                      logit[predictor[n], targets[n]] - logsumexp(logit[predictor[n], :])

    The LM head runs only at ``keep`` positions (each once, even where it predicts both c0 and
    r0). ``vocab_chunk`` > 0: the head runs a vocabulary chunk at a time (``output_head``).
    Returns logps (2B,) float64 (rows 0..B-1 chosen, B..2B-1 rejected) and token counts (2B,).
    """
    inner = _inner(model)
    if inner.config._attn_implementation == "sdpa":
        mask = packed.allowed[:, None]  # (R, 1, L, L) bool, True = attend
    else:  # eager adds the mask to the scores
        dtype = next(inner.parameters()).dtype
        mask = torch.zeros(packed.allowed.shape, dtype=dtype, device=packed.allowed.device)
        mask = mask.masked_fill(~packed.allowed, torch.finfo(dtype).min)[:, None]
    kwargs = {"logits_to_keep": packed.keep} if keeps_logits(model) else {}
    head = output_head(model, vocab_chunk)
    with _head_skipped(head):
        out = model(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                    use_cache=False, **kwargs).logits
    if out.ndim == 2:  # (K, D): the kept positions, row-major; map flat positions to rows
        rows = (packed.keep.flatten().long().cumsum(0) - 1)[packed.predictor]
    else:  # (R, L, D)
        out, rows = out.flatten(0, 1), packed.predictor
    token_logps = terms_logps(out, rows, packed.targets, head, vocab_chunk)  # (N,)
    logps = torch.zeros(packed.sequences, dtype=torch.float64, device=token_logps.device)
    counts = torch.bincount(packed.owner, minlength=packed.sequences)
    return logps.index_add(0, packed.owner, token_logps.double()), counts


# -- Log-probs a vocabulary chunk at a time ---------------------------------------------------


class _ChunkedTokenLogps(torch.autograd.Function):
    """log p(target) = logit[target] - logsumexp_v(logit[v]), logit = hidden @ weight.T + bias,
    for N (row, target) terms, with the LM head applied one vocabulary chunk at a time: the
    (K x V) logits are never whole, in forward or in backward. Backward recomputes each chunk's
    logits (one more head matmul: the price of the memory, as gradient checkpointing pays it for
    the body).

    Shapes: hidden (K, H), weight (V, H), bias (V,) or None, rows (N,) long (the hidden row of
    each term), targets (N,) long -> (N,) float32.
    Backward, chunk by chunk: d logit[k, v] = sum of g[n] over terms n on row k with target v
                                             - G[k] * softmax(logit[k])[v],
    G[k] = sum of g[n] over the terms on row k (g: the upstream gradient of each term).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, targets, chunk):
        device = hidden.device.type
        lse = torch.full((hidden.shape[0],), -torch.inf, dtype=torch.float32, device=hidden.device)
        picked = torch.zeros(rows.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, weight.shape[0], chunk):
            logits = F.linear(hidden, weight[start:start + chunk],
                              None if bias is None else bias[start:start + chunk]).float()  # (K, c)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
            inside = (targets >= start) & (targets < start + chunk)
            picked[inside] = logits[rows[inside], targets[inside] - start]
        ctx.save_for_backward(hidden, weight, bias, rows, targets, lse)
        ctx.chunk = chunk
        # Backward recomputes the logits as forward computed them (bf16 matmuls under autocast).
        ctx.autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return picked - lse[rows]

    @staticmethod
    def backward(ctx, grad):  # grad (N,)
        hidden, weight, bias, rows, targets, lse = ctx.saved_tensors
        device = hidden.device.type
        row_grad = torch.zeros_like(lse).index_add(0, rows, grad.float())  # G (K,)
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if bias is not None and ctx.needs_input_grad[2] else None
        # The matmuls run as forward's did: in bf16 under autocast (as autograd's own backward
        # of the head would), accumulated in float32.
        autocast = torch.autocast(device, dtype=ctx.autocast or torch.bfloat16, enabled=ctx.autocast is not None)
        for start in range(0, weight.shape[0], ctx.chunk):
            w = weight[start:start + ctx.chunk]
            with autocast:
                logits = F.linear(hidden, w, None if bias is None else bias[start:start + ctx.chunk])
            d_logits = -row_grad[:, None] * torch.exp(logits.float() - lse[:, None])  # (K, c)
            inside = (targets >= start) & (targets < start + ctx.chunk)
            d_logits.index_put_((rows[inside], targets[inside] - start), grad[inside].float(), accumulate=True)
            if ctx.autocast is None:  # bfloat16 weights without autocast: matmuls in their dtype
                d_logits = d_logits.to(w.dtype)
            with autocast:
                grad_hidden += d_logits @ w
                if grad_weight is not None:
                    grad_weight[start:start + ctx.chunk] = d_logits.T @ hidden.to(d_logits.dtype)
            if grad_bias is not None:
                grad_bias[start:start + ctx.chunk] = d_logits.sum(0)
        return (grad_hidden.to(hidden.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None)


# Configs whose logits are changed after the LM head (soft-capping, scaling): the chunked path
# would skip that, so such models keep the whole-logits path.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def output_head(model, vocab_chunk: int):
    """The LM head to apply a vocabulary chunk at a time, or None for the whole-logits path:
    ``vocab_chunk`` > 0 and below the vocabulary size, a plain ``nn.Linear`` head (not wrapped by
    LoRA, not sharded by FSDP), and nothing applied to the logits after it."""
    if vocab_chunk <= 0:
        return None
    inner = _inner(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.weight.shape[0] <= vocab_chunk:
        return None
    from torch.distributed.tensor import DTensor

    if isinstance(head.weight, DTensor):  # FSDP2: the weight is whole only inside its forward
        return None
    config = getattr(inner, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_POSTPROCESSING):
        return None
    return head


@contextmanager
def _head_skipped(head):
    """Inside, the model's forward returns the hidden states its LM head would read (the head is
    the identity), so ``terms_logps`` can apply the head chunk by chunk. ``head`` None: no change."""
    if head is None:
        yield
        return
    head.forward = _identity  # an instance attribute shadows nn.Linear.forward
    try:
        yield
    finally:
        del head.forward


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden
