"""Loading causal LMs the same way in every stage (reference actors, train workers, generators)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpo_ray import storage

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_CONFIG = "adapter_config.json"  # what peft writes next to a LoRA adapter


def adapter_base(name_or_path: str) -> str | None:
    """The base model a LoRA adapter folder was trained on, or None when it is not an adapter."""
    config = Path(name_or_path).expanduser() / ADAPTER_CONFIG
    if not config.is_file():
        return None
    return json.loads(config.read_text())["base_model_name_or_path"]


def load_causal_lm(name_or_path: str, dtype: str = "float32", revision: str | None = None,
                   trust_remote_code: bool = False, device: str | torch.device = "cpu",
                   attn_implementation: str | None = None):
    """``AutoModelForCausalLM.from_pretrained`` with safetensors only (no pickle code execution)
    and remote code off unless the config asks for it.

    A LoRA adapter folder (a LoRA run's ``final_model``) loads as its base model with the adapter
    merged in: every stage that scores or generates sees a plain model, with no peft overhead.
    An ``s3://`` (``gs://``, ...) folder is downloaded once per node (``storage.local_model``)."""
    from transformers import AutoModelForCausalLM

    name_or_path = storage.local_model(name_or_path)  # a model in object storage: this node's copy
    base = adapter_base(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        base or name_or_path, revision=None if base else revision, dtype=DTYPES[dtype],
        use_safetensors=True, trust_remote_code=trust_remote_code,
        **({"attn_implementation": attn_implementation} if attn_implementation else {}))
    if base:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(Path(name_or_path).expanduser())).merge_and_unload()
    return model.to(device)


def pick_device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def bf16_autocast(setting: bool | str, device: torch.device) -> tuple[bool, str]:
    """``train.bf16`` resolved on the device that trains: (autocast on?, why).

    "auto" turns it on where bfloat16 matmuls are faster than float32: a CUDA GPU that supports
    bf16, or a CPU with AVX512-BF16 or AMX instructions (oneDNN runs bf16 matmuls on them; on
    this project's 2-core machine a bf16 matmul measured ~2.2x float32's throughput). Elsewhere
    bf16 is emulated and slower than float32, so "auto" leaves it off.
    """
    if setting != "auto":
        return bool(setting), f"train.bf16={str(bool(setting)).lower()}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, "train.bf16=auto: the GPU supports bfloat16"
        return False, "train.bf16=auto: the GPU has no bfloat16 support"
    for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        if getattr(torch.cpu, probe, lambda: False)():  # private torch probes; absent = unknown = off
            return True, f"train.bf16=auto: the CPU has {name}"
    return False, "train.bf16=auto: the CPU has no bfloat16 instructions (AVX512-BF16 or AMX)"
