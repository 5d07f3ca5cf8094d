"""The DPO training loop that runs in every Ray Train worker. Read it top to bottom.

Each worker holds only the policy. Reference log-probs come with every pair from the cached
dataset, so no reference model is ever loaded here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from dpo_ray.logps import concatenate_pairs, concatenated_forward
from dpo_ray.losses import preference_loss, reward_model_loss
from dpo_ray.models import load_causal_lm
from dpo_ray.training.collate import RankPairCollate

STATE_FILE = "trainer_state.pt"


class Step0GuardError(ValueError):
    """The cached reference values do not match the policy at step 0: a setting to fix (wrong
    cache, model or tokenizer), so the CLI prints it as one line."""


_SUMS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
         "logps/chosen", "logps/rejected", "pairs", "tokens"]


def train_loop_per_worker(config: dict) -> None:
    run, meta = config["run"], config["meta"]
    t = run.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    global_batch = t.per_device_train_batch_size * t.gradient_accumulation_steps * world
    steps_per_epoch = meta["pairs"] // global_batch  # drop_last: every rank gets full batches
    total_steps = steps_per_epoch * t.num_train_epochs
    if t.max_steps > 0:
        total_steps = min(total_steps, t.max_steps)
    torch.manual_seed(t.seed)

    # 1. The policy (DDP through prepare_model: gloo on CPU, NCCL on GPU), optimizer, schedule.
    #    A reward model is the same backbone with a scalar head instead of the LM head.
    policy = _load_model(meta, run)
    if t.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    if t.disable_dropout:
        for module in policy.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    policy.train()
    model = ray.train.torch.prepare_model(policy)
    device = ray.train.torch.get_device()
    optimizer = _optimizer(policy.parameters(), t)
    scheduler = _scheduler(optimizer, t, total_steps)

    # 2. Restore: weights, optimizer, schedule, RNG and the data position (a step counter), from
    #    this attempt's latest checkpoint after a failure, else from the run being resumed.
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and meta["resume_from"]:
        checkpoint = ray.train.Checkpoint(meta["resume_from"])
    if checkpoint:
        with checkpoint.as_directory() as folder:
            step = _restore(folder, policy, optimizer, scheduler)
        print(f"[rank {rank}] restored step {step} from {checkpoint.path}", flush=True)

    # 3. Every rank reads the same global batches; RankPairCollate keeps rows rank::world.
    shard = ray.train.get_dataset_shard("train")
    collate = RankPairCollate(rank, world, t.gradient_accumulation_steps, meta["pad_id"])
    metrics_file = Path(meta["run_dir"]) / "metrics.jsonl"
    # Logged metrics are means over every pair since the last log (as TRL/HF Trainer log them):
    # with logging_steps > 1 a single 16-pair batch would swing rewards/accuracies by +-0.3.
    window, window_logratio, window_seconds = [0.0] * len(_SUMS), 0.0, 0.0
    started = time.perf_counter()
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        batches = shard.iter_torch_batches(
            batch_size=global_batch, collate_fn=collate, drop_last=True,
            local_shuffle_buffer_size=meta["shuffle_buffer"], local_shuffle_seed=t.seed + epoch)
        for index, micro_batches in enumerate(batches):
            if index < skip:
                continue  # trained on before the restart
            if index >= steps_per_epoch or step >= total_steps:
                break

            # 4. Forward + backward over the micro-batches; gradients sync on the last one only.
            sums = torch.zeros(len(_SUMS), dtype=torch.float64)
            max_abs_logratio = 0.0  # |logp_policy - logp_ref|, largest over pairs (step-0 guard)
            fingerprint = int(micro_batches[0].pop("global_batch_crc"))
            for i, batch in enumerate(micro_batches):
                batch = {k: v.to(device) for k, v in batch.items()}
                last = i == len(micro_batches) - 1
                sync = contextlib.nullcontext() if last or world == 1 else model.no_sync()
                autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.bf16)
                with sync, autocast:
                    out, losses, chosen_rewards, rejected_rewards = _pair_losses(
                        model, batch, t, meta["pad_id"])
                    # Sum over pairs / pairs per rank: after DDP averages over ranks, the gradient
                    # is that of the mean loss over the global batch, for any world size.
                    (losses.sum() / (global_batch // world)).backward()
                sums += _batch_sums(losses, chosen_rewards, rejected_rewards, out, batch)
                if t.objective == "dpo":
                    max_abs_logratio = max(max_abs_logratio, float(torch.cat([
                        out["chosen_logps"].detach() - batch["ref_chosen_logps"],
                        out["rejected_logps"].detach() - batch["ref_rejected_logps"]]).abs().max()))

            # 5. Metrics averaged over workers; the step-0 guard before anything is updated.
            totals = _all_reduce(sums, device)
            step_logratio = _all_max(max_abs_logratio, device)
            window = [w + x for w, x in zip(window, totals)]
            window_logratio = max(window_logratio, step_logratio)
            if world > 1 and not _same_on_all_ranks(fingerprint, device):
                raise RuntimeError("ranks disagree on the global batch: the data order is not "
                                   "shared, so pairs would be skipped or repeated")
            if step == 0 and meta["policy_is_reference"]:
                _step0_guard({**_means(totals, t.objective), "max_abs_logratio": step_logratio}, t)

            # 6. Clip, step, schedule.
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            window_seconds += time.perf_counter() - started

            # 7. Held-out evaluation on its cached reference values (same steps on every rank).
            evaluated = {}
            if "eval" in meta["datasets"] and (step == total_steps or (
                    t.eval_steps > 0 and step % t.eval_steps == 0)):
                evaluated = _evaluate(policy, rank, world, t, meta, device)

            # 8. Report (a barrier: every rank, same steps); rank 0 logs and writes checkpoints.
            save = step == total_steps or (t.save_steps > 0 and step % t.save_steps == 0)
            if save or step % t.logging_steps == 0:
                metrics = {**_means(window, t.objective), "max_abs_logratio": window_logratio,
                           **evaluated, "grad_norm": float(grad_norm),
                           "learning_rate": scheduler.get_last_lr()[0],
                           "peak_memory_mb": _all_max(_peak_memory_mb(device), device),
                           "epoch": step / steps_per_epoch, "step": step,
                           "pairs_per_second": window[_SUMS.index("pairs")] / window_seconds,
                           "tokens_per_second": window[_SUMS.index("tokens")] / window_seconds}
                window, window_logratio, window_seconds = [0.0] * len(_SUMS), 0.0, 0.0
                if rank == 0:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(metrics) + "\n")
                    print(_progress(metrics, total_steps), flush=True)
                _report(metrics, save and rank == 0, policy, optimizer, scheduler, step, meta)
            started = time.perf_counter()  # throughput counts training, not eval or checkpoints


def _load_model(meta: dict, run):
    if run.train.objective == "reward_model":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            meta["policy"], num_labels=1, use_safetensors=True,
            trust_remote_code=run.reference.trust_remote_code)
        model.config.pad_token_id = meta["pad_id"]  # the head reads the last non-pad token
        return model
    return load_causal_lm(meta["policy"], "float32", trust_remote_code=run.reference.trust_remote_code)


def _pair_losses(model, batch: dict, t, pad_id: int):
    """Policy log-probs (one chosen+rejected forward) -> per-pair losses and rewards against the
    cached reference log-probs. Returns (forward outputs, losses, chosen_rewards, rejected_rewards).
    For a reward model: scalar scores s of chosen and rejected (one forward), the Bradley-Terry
    loss -log sigma(s_c - s_r), and the scores as rewards."""
    if t.objective == "reward_model":
        ids, mask = concatenate_pairs(batch["chosen_input_ids"], batch["chosen_attention_mask"],
                                      batch["rejected_input_ids"], batch["rejected_attention_mask"], pad_id)
        scores = model(input_ids=ids, attention_mask=mask).logits[:, 0].double()  # (2B,)
        chosen, rejected = scores.chunk(2)
        return {}, reward_model_loss(chosen, rejected), chosen.detach(), rejected.detach()
    out = concatenated_forward(
        model, batch["chosen_input_ids"], batch["chosen_attention_mask"],
        batch["rejected_input_ids"], batch["rejected_attention_mask"], batch["prompt_lengths"], pad_id)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        out["chosen_logps"], out["rejected_logps"], batch["ref_chosen_logps"],
        batch["ref_rejected_logps"], t.beta, t.loss_type, t.label_smoothing,
        out["chosen_tokens"], out["rejected_tokens"], t.rpo_alpha)
    return out, losses, chosen_rewards, rejected_rewards


@torch.no_grad()
def _evaluate(policy, rank, world, t, meta, device) -> dict[str, float]:
    """``eval_``-prefixed metrics over the whole held-out split (rows rank::world per batch).
    The policy module itself runs (not the DDP wrapper): no gradients, nothing to synchronise."""
    policy.eval()
    sums = torch.zeros(len(_SUMS), dtype=torch.float64)
    collate = RankPairCollate(rank, world, 1, meta["pad_id"])
    batches = ray.train.get_dataset_shard("eval").iter_torch_batches(
        batch_size=t.per_device_eval_batch_size * world, collate_fn=collate)
    for micro_batches in batches:
        for batch in micro_batches:
            batch.pop("global_batch_crc", None)
            batch = {k: v.to(device) for k, v in batch.items()}
            out, losses, chosen_rewards, rejected_rewards = _pair_losses(
                policy, batch, t, meta["pad_id"])
            sums += _batch_sums(losses, chosen_rewards, rejected_rewards, out, batch)
    policy.train()
    totals = _all_reduce(sums, device)
    return {f"eval_{k}": v for k, v in _means(totals, t.objective).items()}


def _optimizer(params, t):
    if t.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def _scheduler(optimizer, t, total_steps):
    from transformers import get_scheduler

    name = "constant_with_warmup" if t.lr_scheduler_type == "constant" else t.lr_scheduler_type
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps,
                         num_training_steps=max(total_steps, 1))


def _batch_sums(losses, chosen_rewards, rejected_rewards, out, batch) -> torch.Tensor:
    """Per-micro-batch sums of what ``_SUMS`` names (means are taken after the all-reduce).
    A reward model has no log-probs: those sums stay 0 and its metrics leave them out."""
    zero = torch.zeros(1)
    return torch.tensor([
        float(losses.detach().sum()), float(chosen_rewards.sum()), float(rejected_rewards.sum()),
        float((chosen_rewards > rejected_rewards).sum()), float((chosen_rewards - rejected_rewards).sum()),
        float(out.get("chosen_logps", zero).detach().sum()),
        float(out.get("rejected_logps", zero).detach().sum()),
        float(losses.numel()),
        float(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()),
    ], dtype=torch.float64)


def _all_reduce(sums: torch.Tensor, device) -> list[float]:
    if dist.is_available() and dist.is_initialized():
        summed = sums.to(device)
        dist.all_reduce(summed)
        return summed.cpu().tolist()
    return sums.tolist()


def _peak_memory_mb(device) -> float:
    """Peak memory of this worker: GPU allocations on CUDA, else the process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _all_max(value: float, device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor[0])


def _same_on_all_ranks(value: int, device) -> bool:
    both = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)  # -> [max, -min]
    return float(both[0]) == -float(both[1])


def _means(totals: list[float], objective: str = "dpo") -> dict[str, float]:
    pairs = totals[_SUMS.index("pairs")]
    if not pairs:
        return {}
    names = _SUMS[:7] if objective == "dpo" else _SUMS[:5]  # a reward model has no log-probs
    return {name: totals[i] / pairs for i, name in enumerate(names)}


def _step0_guard(metrics: dict, t) -> None:
    """Policy == reference at step 0, so every log-ratio (hence reward) is 0 and the sigmoid loss
    ln 2. Anything else means the cached values do not belong to this policy or tokenization.
    The log-ratio is checked directly: through beta, rewards would hide a mismatch when beta is small.
    """
    problems = []
    if t.loss_type == "sigmoid" and abs(metrics["loss"] - math.log(2)) > t.step0_tolerance:
        problems.append(f"loss {metrics['loss']:.6f} != ln 2 = 0.693147")
    if metrics["max_abs_logratio"] > t.step0_tolerance:
        problems.append(f"|logp_policy - logp_ref| reaches {metrics['max_abs_logratio']:.6f} "
                        f"(rewards/chosen {metrics['rewards/chosen']:.6f}, "
                        f"rewards/rejected {metrics['rewards/rejected']:.6f}), expected 0")
    if problems and not t.bf16:  # bf16 autocast differs from the fp32 reference by design
        raise Step0GuardError("step-0 guard: the policy starts from the reference weights but "
                           + "; ".join(problems) + ". The cached reference values do not match "
                           "this policy/tokenization (wrong cache, model or tokenizer?)")


def _progress(metrics: dict, total_steps: int) -> str:
    return (f"step {metrics['step']}/{total_steps} loss {metrics['loss']:.4f} "
            f"acc {metrics['rewards/accuracies']:.2f} margin {metrics['rewards/margins']:.4f} "
            f"lr {metrics['learning_rate']:.2e} {metrics['pairs_per_second']:.2f} pairs/s")


def _report(metrics, write_checkpoint, policy, optimizer, scheduler, step, meta) -> None:
    if not write_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        _save(folder, policy, optimizer, scheduler, step, meta)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _save(folder, policy, optimizer, scheduler, step, meta) -> None:
    """A Hugging Face folder (safetensors, config, generation config, tokenizer) + trainer state."""
    from transformers import AutoTokenizer

    policy.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(meta["tokenizer"]).save_pretrained(folder)
    Path(folder, "dpo_state.json").write_text(json.dumps({"step": step}))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                        "python": random.getstate()}},
               os.path.join(folder, STATE_FILE))


def _restore(folder, policy, optimizer, scheduler) -> int:
    from safetensors.torch import load_file

    weights = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        weights.update(load_file(path))
    missing, unexpected = policy.load_state_dict(weights, strict=False)
    if unexpected or any("embed" not in m and "lm_head" not in m for m in missing):
        raise RuntimeError(f"checkpoint {folder} does not fit the policy: missing {missing}, "
                           f"unexpected {unexpected}")
    if missing:  # tied embeddings are saved once
        policy.tie_weights()
    state = torch.load(os.path.join(folder, STATE_FILE), weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return int(state["step"])
