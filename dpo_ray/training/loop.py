"""The DPO training loop that runs in every Ray Train worker. Read it top to bottom.

Each worker holds only the policy. Reference log-probs come with every pair from the cached
dataset, so no reference model is ever loaded here.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import zlib
from dataclasses import dataclass

import numpy as np
import ray.train
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from dpo_ray import storage
from dpo_ray.logps import collate_pairs, concatenate_pairs, concatenated_forward
from dpo_ray.losses import preference_loss, reward_model_loss
from dpo_ray.models import bf16_autocast
from dpo_ray.tracking import Tracker, TrackingPlan
from dpo_ray.training import checkpoint, metrics
from dpo_ray.training.batching import epoch_batches
from dpo_ray.training.policy import gradient_sync, load_policy, local_state_mb, parallelize

# The columns a worker reads from the cached dataset (docs/data.md): a reward model needs no
# reference values.
PAIR_TRAIN_COLUMNS = ["pair_id", "chosen_input_ids", "rejected_input_ids", "prompt_length"]
TRAIN_COLUMNS = [*PAIR_TRAIN_COLUMNS, "ref_chosen_logps", "ref_rejected_logps"]  # DPO


@dataclass(frozen=True)
class WorkerPlan:
    """What the driver decided for the workers, beside the ``RunConfig`` (both travel in
    ``train_loop_config``). Frozen and typed: a misspelt field fails on the driver, not in a worker."""

    train_pairs: int  # pairs in the training split (steps per epoch = train_pairs // global batch)
    policy: str  # the policy's starting weights: a folder (absolute) or hub id
    policy_is_reference: bool  # same weights as the reference: the step-0 guard applies
    pad_id: int
    tokenizer: str  # saved with every checkpoint
    reference_dtype: str  # the precision the cached values were scored in (step-0 guard)
    run_dir: str  # a path every node mounts, or a URI (rank 0 writes a local mirror and uploads)
    has_eval: bool  # a held-out split exists (train.eval_fraction > 0)
    resume_from: str | None  # a checkpoint of the run being resumed (train.resume)
    tracking: TrackingPlan | None = None  # train.report_to, resolved on the driver
    # With rpo_alpha: the mean chosen response length over the whole held-out split, so the
    # eval loss's SFT term is one token mean over it, whatever the eval batch size.
    eval_chosen_mean_tokens: float | None = None


class RankPairCollate(NumpyBatchCollateFn):
    """``iter_torch_batches`` collate class: this rank's rows of a global batch, split into
    ``accumulation_steps`` micro-batches of padded tensors (a list, one entry per micro-batch;
    empty when the batch has fewer rows than ranks and none fall to this one).

    Every worker iterates the same globally ordered batches and keeps rows ``rank::world_size``.
    This costs each worker a read of every pair (cheap next to a forward pass) and buys two things:
    the global batch is the same whatever the number of workers, and the data position is a single
    batch counter, so a restarted run can skip exactly the batches it already trained on.
    """

    def __init__(self, rank: int, world_size: int, accumulation_steps: int, pad_id: int):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.accumulation_steps, self.pad_id = accumulation_steps, pad_id

    def __call__(self, batch: dict[str, np.ndarray]) -> list[dict[str, torch.Tensor]]:
        rows = np.arange(len(batch["pair_id"]))[self.rank::self.world_size]
        if not len(rows):
            # Only a last held-out batch can be smaller than the world (training drops partial
            # batches): this rank has nothing to score in it, and says so with no micro-batch.
            return []
        micro = [chunk for chunk in np.array_split(rows, self.accumulation_steps) if len(chunk)]
        out = [collate_pairs({k: v[chunk] for k, v in batch.items()}, self.pad_id) for chunk in micro]
        # The mean chosen response length over the whole global batch: the SFT term's (rpo_alpha)
        # token mean is taken over the global batch, whatever the split into ranks.
        mean_tokens = np.mean([len(ids) for ids in batch["chosen_input_ids"]] - batch["prompt_length"])
        for micro_batch in out:
            micro_batch["chosen_mean_tokens"] = torch.tensor(float(mean_tokens), dtype=torch.float64)
        # A checksum of the whole global batch, which every rank must agree on (see below).
        crc = zlib.crc32("".join(map(str, batch["pair_id"])).encode()) & 0x7FFFFFFF
        out[0]["global_batch_crc"] = torch.tensor(crc % (1 << 24))  # exact in float64 reductions
        return out


class Step0GuardError(ValueError):
    """The cached reference values do not match the policy at step 0: a setting to fix (wrong
    cache, model or tokenizer), so the CLI prints it as one line."""


def train_loop_per_worker(config: dict) -> None:
    run, plan = config["run"], config["plan"]
    t = run.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    global_batch = t.per_device_train_batch_size * t.gradient_accumulation_steps * world
    steps_per_epoch, total_steps = count_steps(plan.train_pairs, t, world)
    torch.manual_seed(t.seed)

    # 1. The policy (dtype, LoRA, checkpointing; see policy.py), replicated by DDP or sharded by
    #    FSDP; optimizer over the trainable parameters only; schedule. A reward model is the same
    #    backbone with a scalar head instead of the LM head.
    policy = load_policy(plan.policy, plan.pad_id, run)
    model = parallelize(policy, t.parallel_strategy)
    device = ray.train.torch.get_device()
    bf16, why = bf16_autocast(t.bf16, device)
    precision = "bfloat16" if bf16 or t.dtype == "bfloat16" else "float32"
    # Rank 0's files (precision, step-0 guard, metrics, tracker files) go to run_dir, or to this
    # node's mirror of it, uploaded after each write (storage.publish: a no-op on a shared disk).
    run_dir = storage.local_dir(plan.run_dir)
    if rank == 0 and storage.is_remote(plan.run_dir):
        # The mirror starts as the run is (a restarted rank 0 may land on another node, or find
        # an older run's mirror here): metrics.jsonl then continues the uploaded one.
        shutil.rmtree(run_dir, ignore_errors=True)
        storage.pull(plan.run_dir, run_dir, exclude=checkpoint.NOT_MIRRORED)
    if rank == 0:  # the driver prints it after the run
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "precision.json").write_text(json.dumps(
            {"weights": t.dtype, "bf16_autocast": bf16, "why": why, "device": device.type}))
        storage.publish(run_dir, plan.run_dir)
    optimizer = _optimizer([p for p in model.parameters() if p.requires_grad], t)
    scheduler = _scheduler(optimizer, t, total_steps)

    # 2. Restore: weights, optimizer, schedule, RNG and the data position (a step counter), from
    #    this attempt's latest checkpoint after a failure, else from the run being resumed.
    #    Rank 0 records each restore in restarts.jsonl: a run that survived failures says so.
    step = 0
    start_from, why = ray.train.get_checkpoint(), "the workers restarted after a failure"
    if start_from is None and plan.resume_from:
        start_from, why = ray.train.Checkpoint(plan.resume_from), "train.resume"
    if start_from:
        with start_from.as_directory() as folder:
            step = checkpoint.restore(folder, model, policy, optimizer, scheduler)
        print(f"[rank {rank}] restored step {step} from {start_from.path}", flush=True)
        if rank == 0:
            with (run_dir / "restarts.jsonl").open("a") as f:
                f.write(json.dumps({"restored_step": step, "checkpoint": start_from.path, "why": why,
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
            storage.publish(run_dir, plan.run_dir)

    # 3. Every rank reads the same global batches; RankPairCollate keeps rows rank::world.
    shard = ray.train.get_dataset_shard("train")
    collate = RankPairCollate(rank, world, t.gradient_accumulation_steps, plan.pad_id)
    metrics_file = run_dir / "metrics.jsonl"
    # The run the driver opened (tracking.json); rank 0 adds every logged step to it.
    tracker = Tracker(plan.tracking) if plan.tracking is not None and rank == 0 else None
    # Logged metrics are means over every pair since the last log (as TRL/HF Trainer log them):
    # with logging_steps > 1 a single 16-pair batch would swing rewards/accuracies by +-0.3.
    window, window_logratio, window_seconds = [0.0] * len(metrics.SUMS), 0.0, 0.0
    started = time.perf_counter()
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        batches = epoch_batches(shard, global_batch, t.shuffle_window, t.seed, epoch, t.group_by_length)
        for index, pairs in enumerate(batches):
            if index < skip:
                continue  # trained on before the restart
            if index >= steps_per_epoch or step >= total_steps:
                break
            micro_batches = collate(pairs)

            # 4. Forward + backward over the micro-batches; gradients sync on the last one only.
            sums = torch.zeros(len(metrics.SUMS), dtype=torch.float64)
            # |logp_policy - logp_ref|, largest over pairs, absolute and relative to |logp_ref|
            # (the step-0 guard)
            deviations = (0.0, 0.0)
            # Step 0 of a policy that starts as the reference, with float32 weights under bf16
            # autocast and a float32 cache: the guard also runs each micro-batch once in float32
            # (no gradients), so it stays exact (absolute tolerance) instead of relative.
            exact_guard = (step == 0 and plan.policy_is_reference and bf16 and t.dtype == "float32"
                           and plan.reference_dtype == "float32")
            guard_sums, guard_deviations = torch.zeros_like(sums), (0.0, 0.0)
            fingerprint = int(micro_batches[0].pop("global_batch_crc"))
            for i, batch in enumerate(micro_batches):
                batch = {k: v.to(device) for k, v in batch.items()}
                if exact_guard:
                    with torch.no_grad():
                        out, losses, chosen_rewards, rejected_rewards = pair_losses(
                            policy, batch, t, plan.pad_id)
                    guard_sums += _pair_sums(losses, chosen_rewards, rejected_rewards, out, batch)
                    guard_deviations = _deviations(guard_deviations, out, batch)
                last = i == len(micro_batches) - 1
                sync = gradient_sync(model, enabled=last)
                autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
                with sync, autocast:
                    out, losses, chosen_rewards, rejected_rewards = pair_losses(
                        model, batch, t, plan.pad_id)
                    # Sum over pairs / pairs per rank: after DDP averages over ranks, the gradient
                    # is that of the mean loss over the global batch, for any world size.
                    (losses.sum() / (global_batch // world)).backward()
                sums += _pair_sums(losses, chosen_rewards, rejected_rewards, out, batch)
                if t.objective == "dpo":
                    deviations = _deviations(deviations, out, batch)

            # 5. Metrics averaged over workers; the step-0 guard before anything is updated.
            totals = metrics.all_reduce_sum(sums, device)
            step_logratio = metrics.all_max(deviations[0], device)
            window = [w + x for w, x in zip(window, totals)]
            window_logratio = max(window_logratio, step_logratio)
            if world > 1 and not metrics.same_on_all_ranks(fingerprint, device):
                raise RuntimeError("ranks disagree on the global batch: the data order is not "
                                   "shared, so pairs would be skipped or repeated")
            if step == 0 and plan.policy_is_reference:
                if exact_guard:
                    guard_totals, guard_precision = metrics.all_reduce_sum(guard_sums, device), "float32"
                else:
                    guard_totals, guard_deviations, guard_precision = totals, deviations, precision
                checked = {**metrics.means(guard_totals, t.objective),
                           "max_abs_logratio": metrics.all_max(guard_deviations[0], device),
                           "max_rel_logratio": metrics.all_max(guard_deviations[1], device)}
                if rank == 0:  # what the guard compared, kept with the run for an audit
                    (run_dir / "step0_guard.json").write_text(json.dumps(
                        {"policy_precision": guard_precision, "reference_dtype": plan.reference_dtype,
                         **{k: checked[k] for k in ("loss", "max_abs_logratio", "max_rel_logratio")}}))
                    storage.publish(run_dir, plan.run_dir)
                _step0_guard(checked, t, guard_precision, plan.reference_dtype)

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
            if plan.has_eval and (step == total_steps or (
                    t.eval_steps > 0 and step % t.eval_steps == 0)):
                evaluated = _evaluate(policy, rank, world, t, plan, device, bf16)

            # 8. Report (a barrier: every rank, same steps); rank 0 logs and writes checkpoints.
            if log:
                logged = {**metrics.means(window, t.objective), "max_abs_logratio": window_logratio,
                          **evaluated, "grad_norm": float(grad_norm),
                          "learning_rate": scheduler.get_last_lr()[0],
                          "peak_memory_mb": metrics.all_max(metrics.peak_memory_mb(device), device),
                          "model_state_mb": metrics.all_max(state_mb, device),
                          "epoch": step / steps_per_epoch, "step": step,
                          "pairs_per_second": metrics.total(window, "pairs") / window_seconds,
                          "tokens_per_second": metrics.total(window, "tokens") / window_seconds}
                window, window_logratio, window_seconds = [0.0] * len(metrics.SUMS), 0.0, 0.0
                if rank == 0:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(logged) + "\n")
                    print(_progress(logged, total_steps), flush=True)
                    if tracker is not None:
                        tracker.log_metrics(logged, step)
                    storage.publish(run_dir, plan.run_dir)
            if save:  # only checkpoints go through Ray Train: a report costs ~2 s (a barrier
                # with the controller, measured on 2 cores), more than a tiny model's step
                _save(logged, rank, model, policy, optimizer, scheduler, step, plan)
            started = time.perf_counter()  # throughput counts training, not eval or checkpoints
    if tracker is not None:
        tracker.close()  # left open: the driver adds the final model and ends it


def count_steps(train_pairs: int, t, world: int) -> tuple[int, int]:
    """(steps per epoch, total steps): full global batches only (drop_last), so every rank gets
    whole batches; ``max_steps`` > 0 stops earlier."""
    steps_per_epoch = train_pairs // (t.per_device_train_batch_size * t.gradient_accumulation_steps * world)
    total_steps = steps_per_epoch * t.num_train_epochs
    return steps_per_epoch, min(total_steps, t.max_steps) if t.max_steps > 0 else total_steps


def pair_losses(model, batch: dict, t, pad_id: int):
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
        batch["rejected_input_ids"], batch["rejected_attention_mask"], batch["prompt_lengths"], pad_id,
        padding_free=t.padding_free, vocab_chunk=t.vocab_chunk_size)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        out["chosen_logps"], out["rejected_logps"], batch["ref_chosen_logps"],
        batch["ref_rejected_logps"], t.beta, t.loss_type, t.label_smoothing,
        out["chosen_tokens"], out["rejected_tokens"], t.rpo_alpha, batch.get("chosen_mean_tokens"))
    return out, losses, chosen_rewards, rejected_rewards


@torch.no_grad()
def _evaluate(policy, rank, world, t, plan: WorkerPlan, device, bf16: bool) -> dict[str, float]:
    """``eval_``-prefixed metrics over the whole held-out split (rows rank::world per batch), in
    the training passes' precision. The policy module itself runs (not the DDP wrapper): no
    gradients, nothing to synchronise."""
    policy.eval()
    sums = torch.zeros(len(metrics.SUMS), dtype=torch.float64)
    collate = RankPairCollate(rank, world, 1, plan.pad_id)
    batches = ray.train.get_dataset_shard("eval").iter_torch_batches(
        batch_size=t.per_device_eval_batch_size * world, collate_fn=collate)
    for micro_batches in batches:
        if not micro_batches and t.parallel_strategy == "fsdp":
            # Sharded layers gather their weights collectively: a rank with no rows in the last
            # held-out batch still runs a forward, or every other rank would wait for it forever.
            policy(input_ids=torch.full((1, 2), plan.pad_id, device=device))
        for batch in micro_batches:
            batch.pop("global_batch_crc", None)
            if plan.eval_chosen_mean_tokens is not None:
                batch["chosen_mean_tokens"] = torch.tensor(plan.eval_chosen_mean_tokens, dtype=torch.float64)
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out, losses, chosen_rewards, rejected_rewards = pair_losses(
                    policy, batch, t, plan.pad_id)
            sums += _pair_sums(losses, chosen_rewards, rejected_rewards, out, batch)
    policy.train()
    return metrics.means(metrics.all_reduce_sum(sums, device), t.objective, prefix="eval_")


def _optimizer(params, t):
    if t.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def _scheduler(optimizer, t, total_steps):
    from transformers import get_scheduler

    return get_scheduler(t.lr_scheduler_type, optimizer, num_warmup_steps=t.num_warmup_steps(total_steps),
                         num_training_steps=max(total_steps, 1))


def _pair_sums(losses, chosen_rewards, rejected_rewards, out, batch) -> torch.Tensor:
    """``metrics.pair_sums`` of one micro-batch (a reward model's ``out`` has no log-probs)."""
    return metrics.pair_sums(
        losses, chosen_rewards, rejected_rewards, out.get("chosen_logps"), out.get("rejected_logps"),
        int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()))


def _deviations(previous: tuple[float, float], out: dict, batch: dict) -> tuple[float, float]:
    """The largest |logp_policy - logp_ref| over ``previous`` and this micro-batch's pairs:
    (absolute in nats, relative to max(|logp_ref|, 1))."""
    deviation = torch.cat([out["chosen_logps"].detach() - batch["ref_chosen_logps"],
                           out["rejected_logps"].detach() - batch["ref_rejected_logps"]]).abs()
    reference = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).abs().clamp(min=1.0)
    return (max(previous[0], float(deviation.max())),
            max(previous[1], float((deviation / reference).max())))


def _step0_guard(step_metrics: dict, t, policy_precision: str, reference_dtype: str) -> None:
    """Policy == reference at step 0, so every log-ratio (hence reward) is 0 and the sigmoid loss
    ln 2. Anything else means the cached values do not belong to this policy or tokenization.
    The log-ratio is checked directly: through beta, rewards would hide a mismatch when beta is small.

    ``step_metrics`` come from passes in ``policy_precision``. When either side ran in low
    precision (bfloat16 weights, a bfloat16/float16 reference, or bf16 autocast where no float32
    check pass ran), rounding alone moves a sequence's log-prob by ~1% of its size, so the check
    is relative: |logp_policy - logp_ref| <= step0_rtol_low_precision * |logp_ref|. A wrong cache,
    model or tokenizer is off by far more, so the guard still fires for those.
    """
    if policy_precision != "float32" or reference_dtype != "float32":
        if step_metrics["max_rel_logratio"] > t.step0_rtol_low_precision:
            raise Step0GuardError(
                f"step-0 guard: the policy starts from the reference weights but |logp_policy - "
                f"logp_ref| reaches {step_metrics['max_abs_logratio']:.4f} nats, "
                f"{step_metrics['max_rel_logratio']:.1%} of |logp_ref|. The policy runs in "
                f"{policy_precision} (train.dtype={t.dtype}, train.bf16={t.bf16}) and the reference "
                f"was scored in {reference_dtype} (reference.dtype): rounding explains up to "
                f"~{t.step0_rtol_low_precision:.0%} (train.step0_rtol_low_precision), not this. "
                "The cached reference values do not match this policy/tokenization "
                "(wrong cache, model or tokenizer?)")
        return
    problems = []
    # ln 2 holds for the sigmoid loss (with cDPO's label_smoothing too), not with an SFT term added.
    if (t.loss_type == "sigmoid" and not t.rpo_alpha
            and abs(step_metrics["loss"] - math.log(2)) > t.step0_tolerance):
        problems.append(f"loss {step_metrics['loss']:.6f} != ln 2 = 0.693147")
    if step_metrics["max_abs_logratio"] > t.step0_tolerance:
        problems.append(f"|logp_policy - logp_ref| reaches {step_metrics['max_abs_logratio']:.6f} "
                        f"(rewards/chosen {step_metrics['rewards/chosen']:.6f}, "
                        f"rewards/rejected {step_metrics['rewards/rejected']:.6f}), expected 0")
    if problems:
        raise Step0GuardError("step-0 guard: the policy starts from the reference weights but "
                              + "; ".join(problems) + ". The cached reference values do not match "
                              "this policy/tokenization (wrong cache, model or tokenizer?)")


def _progress(metrics: dict, total_steps: int) -> str:
    return (f"step {metrics['step']}/{total_steps} loss {metrics['loss']:.4f} "
            f"acc {metrics['rewards/accuracies']:.2f} margin {metrics['rewards/margins']:.4f} "
            f"lr {metrics['learning_rate']:.2e} {metrics['pairs_per_second']:.2f} pairs/s")


def _save(logged, rank, model, policy, optimizer, scheduler, step, plan: WorkerPlan) -> None:
    """A checkpoint through ``ray.train.report`` on every rank (a barrier): every rank first takes
    part in gathering the full state (FSDP shards live on all of them) and rank 0 writes it."""
    model_state, optimizer_state = checkpoint.gather_state(model, optimizer)
    if rank != 0:
        ray.train.report(logged)
        return
    with checkpoint.staging_folder() as (folder, upload_fn):
        checkpoint.save(folder, policy, model_state, optimizer_state, scheduler, step, plan.tokenizer)
        ray.train.report(logged, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_upload_fn=upload_fn)
