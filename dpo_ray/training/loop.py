"""The DPO training loop that runs in every Ray Train worker. Read it top to bottom.

Each worker holds only the policy. Reference log-probs come with every pair from the cached
dataset, so no reference model is ever loaded here.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

from dpo_ray.logps import concatenate_pairs, concatenated_forward
from dpo_ray.losses import preference_loss, reward_model_loss
from dpo_ray.training import checkpoint
from dpo_ray.training.collate import RankPairCollate
from dpo_ray.training.policy import gradient_sync, load_policy, local_state_mb, parallelize


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

    # 1. The policy (dtype, LoRA, checkpointing; see policy.py), replicated by DDP or sharded by
    #    FSDP; optimizer over the trainable parameters only; schedule. A reward model is the same
    #    backbone with a scalar head instead of the LM head.
    policy = load_policy(meta, run)
    model = parallelize(policy, t.parallel_strategy)
    device = ray.train.torch.get_device()
    optimizer = _optimizer([p for p in model.parameters() if p.requires_grad], t)
    scheduler = _scheduler(optimizer, t, total_steps)

    # 2. Restore: weights, optimizer, schedule, RNG and the data position (a step counter), from
    #    this attempt's latest checkpoint after a failure, else from the run being resumed.
    step = 0
    start_from = ray.train.get_checkpoint()
    if start_from is None and meta["resume_from"]:
        start_from = ray.train.Checkpoint(meta["resume_from"])
    if start_from:
        with start_from.as_directory() as folder:
            step = checkpoint.restore(folder, model, policy, optimizer, scheduler)
        print(f"[rank {rank}] restored step {step} from {start_from.path}", flush=True)

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
            # |logp_policy - logp_ref|, largest over pairs, absolute and relative to |logp_ref|
            # (the step-0 guard)
            max_abs_logratio, max_rel_logratio = 0.0, 0.0
            fingerprint = int(micro_batches[0].pop("global_batch_crc"))
            for i, batch in enumerate(micro_batches):
                batch = {k: v.to(device) for k, v in batch.items()}
                last = i == len(micro_batches) - 1
                sync = gradient_sync(model, enabled=last)
                autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.bf16)
                with sync, autocast:
                    out, losses, chosen_rewards, rejected_rewards = _pair_losses(
                        model, batch, t, meta["pad_id"])
                    # Sum over pairs / pairs per rank: after DDP averages over ranks, the gradient
                    # is that of the mean loss over the global batch, for any world size.
                    (losses.sum() / (global_batch // world)).backward()
                sums += _batch_sums(losses, chosen_rewards, rejected_rewards, out, batch)
                if t.objective == "dpo":
                    deviation = torch.cat([
                        out["chosen_logps"].detach() - batch["ref_chosen_logps"],
                        out["rejected_logps"].detach() - batch["ref_rejected_logps"]]).abs()
                    reference = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
                    max_abs_logratio = max(max_abs_logratio, float(deviation.max()))
                    max_rel_logratio = max(max_rel_logratio, float(
                        (deviation / reference.abs().clamp(min=1.0)).max()))

            # 5. Metrics averaged over workers; the step-0 guard before anything is updated.
            totals = _all_reduce(sums, device)
            step_logratio = _all_max(max_abs_logratio, device)
            step_rel_logratio = _all_max(max_rel_logratio, device)
            window = [w + x for w, x in zip(window, totals)]
            window_logratio = max(window_logratio, step_logratio)
            if world > 1 and not _same_on_all_ranks(fingerprint, device):
                raise RuntimeError("ranks disagree on the global batch: the data order is not "
                                   "shared, so pairs would be skipped or repeated")
            if step == 0 and meta["policy_is_reference"]:
                _step0_guard({**_means(totals, t.objective), "max_abs_logratio": step_logratio,
                              "max_rel_logratio": step_rel_logratio}, t, meta["reference_dtype"])

            # 6. Clip, step, schedule.
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            save = step == total_steps or (t.save_steps > 0 and step % t.save_steps == 0)
            log = save or step % t.logging_steps == 0
            # Read here, after backward, where FSDP holds only its shards (a forward without
            # backward, as in held-out evaluation, leaves the root's parameters gathered).
            state_mb = local_state_mb(model, optimizer) if log else None

            window_seconds += time.perf_counter() - started

            # 7. Held-out evaluation on its cached reference values (same steps on every rank).
            evaluated = {}
            if "eval" in meta["datasets"] and (step == total_steps or (
                    t.eval_steps > 0 and step % t.eval_steps == 0)):
                evaluated = _evaluate(policy, rank, world, t, meta, device)

            # 8. Report (a barrier: every rank, same steps); rank 0 logs and writes checkpoints.
            if log:
                metrics = {**_means(window, t.objective), "max_abs_logratio": window_logratio,
                           **evaluated, "grad_norm": float(grad_norm),
                           "learning_rate": scheduler.get_last_lr()[0],
                           "peak_memory_mb": _all_max(_peak_memory_mb(device), device),
                           "model_state_mb": _all_max(state_mb, device),
                           "epoch": step / steps_per_epoch, "step": step,
                           "pairs_per_second": window[_SUMS.index("pairs")] / window_seconds,
                           "tokens_per_second": window[_SUMS.index("tokens")] / window_seconds}
                window, window_logratio, window_seconds = [0.0] * len(_SUMS), 0.0, 0.0
                if rank == 0:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(metrics) + "\n")
                    print(_progress(metrics, total_steps), flush=True)
                _report(metrics, save, rank, model, policy, optimizer, scheduler, step, meta)
            started = time.perf_counter()  # throughput counts training, not eval or checkpoints


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
        if not micro_batches and t.parallel_strategy == "fsdp":
            # Sharded layers gather their weights collectively: a rank with no rows in the last
            # held-out batch still runs a forward, or every other rank would wait for it forever.
            policy(input_ids=torch.full((1, 2), meta["pad_id"], device=device))
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


def _step0_guard(metrics: dict, t, reference_dtype: str) -> None:
    """Policy == reference at step 0, so every log-ratio (hence reward) is 0 and the sigmoid loss
    ln 2. Anything else means the cached values do not belong to this policy or tokenization.
    The log-ratio is checked directly: through beta, rewards would hide a mismatch when beta is small.

    When either side ran in low precision (bfloat16 weights or autocast, a bfloat16/float16
    reference), rounding alone moves a sequence's log-prob by ~1% of its size, so the check is
    relative: |logp_policy - logp_ref| <= step0_rtol_low_precision * |logp_ref|. A wrong cache,
    model or tokenizer is off by far more, so the guard still fires for those.
    """
    policy_precision = "bfloat16" if t.bf16 or t.dtype == "bfloat16" else "float32"
    if policy_precision != "float32" or reference_dtype != "float32":
        if metrics["max_rel_logratio"] > t.step0_rtol_low_precision:
            raise Step0GuardError(
                f"step-0 guard: the policy starts from the reference weights but |logp_policy - "
                f"logp_ref| reaches {metrics['max_abs_logratio']:.4f} nats, "
                f"{metrics['max_rel_logratio']:.1%} of |logp_ref|. The policy runs in "
                f"{policy_precision} (train.dtype={t.dtype}, train.bf16={t.bf16}) and the reference "
                f"was scored in {reference_dtype} (reference.dtype): rounding explains up to "
                f"~{t.step0_rtol_low_precision:.0%} (train.step0_rtol_low_precision), not this. "
                "The cached reference values do not match this policy/tokenization "
                "(wrong cache, model or tokenizer?)")
        return
    problems = []
    if t.loss_type == "sigmoid" and abs(metrics["loss"] - math.log(2)) > t.step0_tolerance:
        problems.append(f"loss {metrics['loss']:.6f} != ln 2 = 0.693147")
    if metrics["max_abs_logratio"] > t.step0_tolerance:
        problems.append(f"|logp_policy - logp_ref| reaches {metrics['max_abs_logratio']:.6f} "
                        f"(rewards/chosen {metrics['rewards/chosen']:.6f}, "
                        f"rewards/rejected {metrics['rewards/rejected']:.6f}), expected 0")
    if problems:
        raise Step0GuardError("step-0 guard: the policy starts from the reference weights but "
                              + "; ".join(problems) + ". The cached reference values do not match "
                              "this policy/tokenization (wrong cache, model or tokenizer?)")


def _progress(metrics: dict, total_steps: int) -> str:
    return (f"step {metrics['step']}/{total_steps} loss {metrics['loss']:.4f} "
            f"acc {metrics['rewards/accuracies']:.2f} margin {metrics['rewards/margins']:.4f} "
            f"lr {metrics['learning_rate']:.2e} {metrics['pairs_per_second']:.2f} pairs/s")


def _report(metrics, save, rank, model, policy, optimizer, scheduler, step, meta) -> None:
    """``ray.train.report`` on every rank (a barrier); with ``save``, every rank first takes part
    in gathering the full state (FSDP shards live on all of them) and rank 0 writes it."""
    if not save:
        ray.train.report(metrics)
        return
    model_state, optimizer_state = checkpoint.gather_state(model, optimizer)
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        checkpoint.save(folder, policy, model_state, optimizer_state, scheduler, step, meta["tokenizer"])
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
