"""The model a Ray Train worker trains: loaded in ``train.dtype``, optionally wrapped in LoRA
adapters, then replicated (DDP) or sharded (FSDP2) across the workers.

Memory per worker, P parameters, AdamW:
    full fine-tuning, float32 weights      16·P bytes (weights 4, gradients 4, Adam moments 8)
    full fine-tuning, bfloat16 weights      8·P bytes
    LoRA                                    2·P or 4·P for the frozen base + 16 bytes per adapter weight
    FSDP over W workers                     each of the above / W (plus one layer gathered at a time)
The reference model is never here: its log-probs come cached with every pair.
"""

from __future__ import annotations

import contextlib

import ray.train.torch
import torch
from torch.nn.parallel import DistributedDataParallel

from dpo_ray.models import load_causal_lm


def load_policy(name_or_path: str, pad_id: int, run) -> torch.nn.Module:
    """The policy (or reward model) ready to train: precision, attention kernel, dropout off,
    LoRA adapters and gradient checkpointing as ``run.train`` asks."""
    t = run.train
    extra = {"attn_implementation": t.attn_implementation} if t.attn_implementation else {}
    if t.objective == "reward_model":
        from transformers import AutoModelForSequenceClassification

        from dpo_ray.models import DTYPES

        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, use_safetensors=True, dtype=DTYPES[t.dtype],
            trust_remote_code=run.reference.trust_remote_code, **extra)
        model.config.pad_token_id = pad_id  # the head reads the last non-pad token
    else:
        model = load_causal_lm(name_or_path, t.dtype, trust_remote_code=run.reference.trust_remote_code,
                               attn_implementation=t.attn_implementation)
    if t.disable_dropout:  # the base model's dropout; LoRA's own dropout (train.peft.dropout) is kept
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if t.peft is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=t.peft.r, lora_alpha=t.peft.alpha, lora_dropout=t.peft.dropout,
            target_modules=t.peft.target_modules,
            task_type="SEQ_CLS" if t.objective == "reward_model" else "CAUSAL_LM"))
    if t.gradient_checkpointing:
        # Non-reentrant checkpointing also works when the inputs need no gradient (a frozen
        # embedding under LoRA), where the reentrant form silently drops every gradient.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def parallelize(policy: torch.nn.Module, strategy: str) -> torch.nn.Module:
    """DDP through Ray Train's ``prepare_model`` (gloo on CPU, NCCL on GPU), or FSDP2: each
    decoder layer (``_no_split_modules``) is one shard group gathered just before it runs, and the
    root holds the rest (embeddings, final norm, LM head). FSDP shards ``policy`` in place and
    returns it; DDP returns a wrapper."""
    if strategy == "ddp":
        return ray.train.torch.prepare_model(policy)
    from torch.distributed.fsdp import fully_shard

    policy.to(ray.train.torch.get_device())
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    layer_classes = set(getattr(base, "_no_split_modules", None) or [])
    if not layer_classes:
        raise ValueError(f"{type(base).__name__} names no decoder-layer class (_no_split_modules): "
                         "train.parallel_strategy=fsdp cannot tell where to shard it")
    for module in policy.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module)
    fully_shard(policy)
    return policy


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """A context in which backward does (or, accumulating micro-batches, does not yet) reduce
    gradients across workers."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if enabled or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def local_state_mb(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """MiB this worker holds of weights and optimizer state between steps (gradients are freed
    after each step; during backward add one more copy of the trainable weights): its shards under
    FSDP, everything under DDP. A measure of the model's memory that process-wide counters (RSS,
    which includes the libraries) would drown on small models."""
    def nbytes(tensor) -> int:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # DTensor shard
        return local.numel() * local.element_size()

    total = 0
    for p in model.parameters():
        total += nbytes(p) + (nbytes(p.grad) if p.grad is not None else 0)
    for state in optimizer.state.values():
        total += sum(nbytes(v) for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return total / 2**20
