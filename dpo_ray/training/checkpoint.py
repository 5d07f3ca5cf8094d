"""Checkpoints of a training run: a plain Hugging Face folder (or a LoRA adapter folder) that any
stage can load, plus ``trainer_state.pt`` for resuming (optimizer, schedule, RNG, step).

State is gathered and restored through ``torch.distributed.checkpoint.state_dict``, which speaks
one key space for a plain, DDP-wrapped or FSDP-sharded model: the unsharded parameter names.
Gathering is a collective (every rank calls ``gather_state``); only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import ray.train
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict)

STATE_FILE = "trainer_state.pt"
STEP_FILE = "dpo_state.json"
# Ray Train's run name: checkpoints live under <run_dir>/ray_train/ (ray_train-resume-N/ for a
# resumed run's later attempts).
RAY_TRAIN_NAME = "ray_train"
# What a run directory's local mirror leaves in the bucket (dpo_ray/storage.py): checkpoints (Ray
# Train reads them there) and the final model (the driver writes it).
NOT_MIRRORED = (f"{RAY_TRAIN_NAME}*", "final_model*")


@contextlib.contextmanager
def staging_folder():
    """Where rank 0 writes a checkpoint, and what it passes to ``ray.train.report``.

    Yields ``(folder, upload_fn)``. Ray Train's default upload copies the folder into the run's
    storage with pyarrow: ~3.7 s for SmolLM2's 1.6 GB (weights and AdamW state) on this machine,
    a second full write. When the storage is a local (or mounted) path that Ray Train has
    validated on this node, the folder is written inside the run's Ray Train directory instead
    and ``upload_fn`` renames it into place: one write, and a checkpoint folder that appears
    whole or not at all. Elsewhere (a bucket; a path this node does not see) ``upload_fn`` is
    None and Ray Train uploads (or refuses) as usual."""
    from pyarrow.fs import LocalFileSystem
    from ray.train.v2._internal.constants import VALIDATE_STORAGE_MARKER_FILENAME

    storage = ray.train.get_context().get_storage()  # DeveloperAPI: the run's filesystem and path
    experiment = Path(storage.experiment_fs_path)
    local = (isinstance(storage.storage_filesystem, LocalFileSystem)
             and (experiment / VALIDATE_STORAGE_MARKER_FILENAME).exists())
    if not local:
        with tempfile.TemporaryDirectory() as folder:
            yield folder, None
        return

    def move_into_place(checkpoint, name: str):
        target = experiment / name
        os.rename(checkpoint.path, target)
        return ray.train.Checkpoint.from_directory(str(target))

    # A staging folder left by a worker killed while writing is never a checkpoint (Ray Train
    # lists its own records, run_checkpoints checkpoint_* folders); only rank 0 of this attempt
    # writes here, so what is left from before is garbage.
    for stale in experiment.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=experiment, prefix=".staging-", ignore_cleanup_errors=True) as folder:
        yield folder, move_into_place


def gather_state(model, optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state on rank 0 (CPU tensors; empty dicts elsewhere). Frozen
    parameters are left out: under LoRA only the adapters are checkpointed."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options))


def save(folder, policy, model_state: dict, optimizer_state: dict, scheduler, step: int,
         tokenizer: str) -> None:
    """Write the Hugging Face folder (safetensors, config, tokenizer; a LoRA policy writes its
    adapter: ``adapter_config.json`` + ``adapter_model.safetensors``) and the trainer state."""
    from transformers import AutoTokenizer

    # A tied weight (lm_head = embed_tokens) is saved once. Gathered FSDP shards no longer share
    # storage, which is how save_pretrained would otherwise notice the tie.
    tied = getattr(policy, "all_tied_weights_keys", None) or {}
    model_state = {k: v for k, v in model_state.items() if tied.get(k) not in model_state}
    policy.save_pretrained(folder, state_dict=model_state, safe_serialization=True)
    _plain_architecture_name(Path(folder) / "config.json")
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
    Path(folder, STEP_FILE).write_text(json.dumps({"step": step}))
    torch.save({"step": step, "model": model_state if _is_peft(policy) else None,
                "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                        "python": random.getstate()}},
               os.path.join(folder, STATE_FILE))


def restore(folder, model, policy, optimizer, scheduler) -> int:
    """Load a checkpoint written by ``save`` into this rank's (possibly sharded) model and
    optimizer; returns the step to continue from."""
    state = torch.load(os.path.join(folder, STATE_FILE), weights_only=False)
    if _is_peft(policy):
        weights = state["model"]
    else:
        from safetensors.torch import load_file

        weights = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            weights.update(load_file(path))
    options = StateDictOptions(full_state_dict=True, strict=False)
    missing, unexpected = set_model_state_dict(model, weights, options=options)
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    # Tied embeddings are saved once; frozen base weights are not saved under LoRA.
    missing = [m for m in missing if m in trainable and "embed" not in m and "lm_head" not in m]
    if unexpected or missing:
        raise RuntimeError(f"checkpoint {folder} does not fit the policy: missing {missing}, "
                           f"unexpected {unexpected}")
    set_optimizer_state_dict(model, optimizer, state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return int(state["step"])


def _is_peft(policy) -> bool:
    return hasattr(policy, "peft_config")


def _plain_architecture_name(config_path: Path) -> None:
    """FSDP2 renames a sharded module's class (``FSDPLlamaForCausalLM``), and ``save_pretrained``
    records the class name; the saved model must name the class that loads it."""
    if not config_path.exists():
        return
    config = json.loads(config_path.read_text())
    names = config.get("architectures") or []
    if any(n.startswith("FSDP") for n in names):
        config["architectures"] = [n.removeprefix("FSDP") for n in names]
        config_path.write_text(json.dumps(config, indent=2))
