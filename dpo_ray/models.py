"""Loading causal LMs the same way in every stage (reference actors, train workers, generators)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
    merged in: every stage that scores or generates sees a plain model, with no peft overhead."""
    from transformers import AutoModelForCausalLM

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
