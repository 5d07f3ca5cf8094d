"""Loading causal LMs the same way in every stage (reference actors, train workers, generators)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(name_or_path: str, dtype: str = "float32", revision: str | None = None,
                   trust_remote_code: bool = False, device: str | torch.device = "cpu"):
    """``AutoModelForCausalLM.from_pretrained`` with safetensors only (no pickle code execution)
    and remote code off unless the config asks for it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, revision=revision, dtype=DTYPES[dtype], use_safetensors=True,
        trust_remote_code=trust_remote_code)
    return model.to(device)


def pick_device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")
