"""Small helpers shared by tests: writing preference files in each supported format."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    """Rows as JSON Lines; ``raw_lines`` {1-based line: text} inserts lines verbatim."""
    lines = [json.dumps(r) for r in rows]
    for lineno, text in sorted((raw_lines or {}).items()):
        lines.insert(lineno - 1, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def records_batch(rows: list[dict], source_file: str = "mem.jsonl") -> pa.Table:
    """A ``RECORD_SCHEMA`` batch as the datasource would emit it (for calling PairTokenizer)."""
    from dpo_ray.data.sources import _canonical, _records_table

    return _records_table(source_file, [(i, _canonical(r), None) for i, r in enumerate(rows, 1)])


def tiny_causal_lm(arch: str, vocab: int, attn: str = "sdpa"):
    """A 2-layer random GPT-2 (absolute positions) or Llama (RoPE, grouped KV heads), seeded."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    else:
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def load_job(name: str):
    """A script under jobs/ as a module (its ``main(argv)`` is what the README runs)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"dpo_job_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def own_ray_processes(fragment: str) -> list:
    """Processes whose command line contains ``fragment`` and that this test session's Ray
    started (descendants of its raylet): a test must never touch another Ray on the machine."""
    import psutil
    import ray
    from ray._private import ray_constants

    node = ray._private.worker._global_node
    raylets = {p.process.pid for p in node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]}
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if not any(fragment in part for part in proc.info["cmdline"] or []):
            continue
        try:
            if raylets & {parent.pid for parent in proc.parents()}:
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


# A small DPO run on the tiny model: 16 real HH pairs, of which 5 held out (by their hash) and 11
# trained on; 2 workers x 2 pairs: 2 steps per epoch. A constant schedule, so a run stopped and
# resumed must equal the uninterrupted one. The held-out pairs come in global batches of 4 and
# then 1, so one rank gets no row in the last batch (under FSDP it must still join the forward).
STEPS = dict(pairs=16, per_device_train_batch_size=2, learning_rate=1e-3, num_train_epochs=2,
             lr_scheduler_type="constant", max_steps=4, eval_fraction=0.25, eval_steps=2,
             per_device_eval_batch_size=2)


def run_config(hh_path, model, out_dir, name, cache, pairs=16, **train_kw):
    """A RunConfig over the first ``pairs`` HH pairs; ``cache`` is the session's reference cache
    (tests that are about the cache itself pass their own folder)."""
    from dpo_ray.config import DataConfig, Pool, ReferenceConfig, RunConfig, TrainConfig

    return RunConfig(
        data=DataConfig(source=str(hh_path), tokenizer=str(model), limit=pairs, on_bad_row="skip",
                        max_length=96, max_prompt_length=48),
        reference=ReferenceConfig(model=str(model), cache_dir=str(cache),
                                  pool=Pool(num_cpus_per_actor=0.5)),
        # float32 and whole logits unless a test asks otherwise: the training tests compare runs
        # to 1e-5 and FSDP always takes the whole logits; bf16 rounding depends on how pairs are
        # packed, and chunked log-probs differ at 1e-6, which AdamW turns into weight differences.
        train=TrainConfig(output_dir=str(Path(out_dir) / "runs"), run_name=name, seed=0,
                          **{"num_workers": 2, "cpus_per_worker": 1.0, "bf16": False,
                             "vocab_chunk_size": 0, **train_kw}),
    )


def weights(folder) -> dict:
    from safetensors.torch import load_file

    return {k: v for p in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(p).items()}


def assert_same_steps(a, b, atol=1e-5):
    """Two runs of STEPS logged the same losses, gradient norms and held-out losses."""
    import pytest

    assert [m["step"] for m in a.metrics] == [m["step"] for m in b.metrics]
    for x, y in zip(a.metrics, b.metrics):
        assert x["loss"] == pytest.approx(y["loss"], abs=atol), x["step"]
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-3), x["step"]
        assert ("eval_loss" in x) == ("eval_loss" in y) == (x["step"] % 2 == 0)
        if "eval_loss" in x:
            assert x["eval_loss"] == pytest.approx(y["eval_loss"], abs=atol)


def assert_same_weights(a, b, atol=5e-5):
    """The same weights after STEPS, to within rounding. Adam divides each update by the root of
    its second moment, so where a gradient element is near zero, the summation order of the
    gradient (one worker, or two all-reduced; sharded or not) moves that weight's update by a
    visible part of the learning rate (1.4e-5 seen for one element on one CPU). 5e-5 is ~1% of the
    largest total update (4 steps x lr 1e-3); a wrong batch or gradient moves weights by ~1e-3."""
    import torch

    w, v = weights(a), weights(b)
    assert w.keys() == v.keys()
    off = {k: (float((w[k].float() - v[k].float()).abs().max()),
               int(((w[k].float() - v[k].float()).abs() > atol).sum()), v[k].numel())
           for k in v if not torch.allclose(w[k], v[k], atol=atol)}
    assert not off, f"tensors differing by more than {atol} (max diff, elements off, elements): {off}"
