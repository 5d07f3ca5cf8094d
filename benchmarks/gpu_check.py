"""The GPU path, run end to end on a CUDA machine in a few minutes (not a test: CI has no GPU).

    python benchmarks/gpu_check.py --tokenizer TOKENIZER_DIR --data HH.jsonl[.gz] --out OUT_DIR
    python benchmarks/gpu_check.py ... --size tiny   # the same stages on CPU, as a dry run

On a ~1.1 B Llama-shaped model built from a config (TinyLlama's shape; no hub needed), through
the real Ray paths (actor pools, TorchTrainer on the GPU):
  1. parity: a tiny fp32 model scored and trained for 2 steps on CPU and on the GPU; the
     reference log-probs and the losses must agree;
  2. reference scoring on the GPU actor pool, bfloat16;
  3. DPO training with bf16 autocast: full fine-tuning under DDP (every GPU; one GPU = one
     worker), FSDP2, bfloat16 weights, and LoRA;
  4. generation on the GPU actor pool.
It prints tokens/s, MFU (6·N·tokens/s over the card's peak dense bf16 FLOP/s; 2·N for forward-only
stages) and peak GPU memory, and writes every number to OUT_DIR/gpu_check.json as it goes, so a
run cut short still reports what it measured. scripts/gpu_bundle.sh packs what a bare machine
with torch, transformers and peft but no Ray needs (see its header).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

# Peak dense bf16 tensor-core FLOP/s by card (vendor datasheets, SXM parts).
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10G": 70e12}
SIZES = {  # hidden, intermediate, layers, heads, kv heads
    "1b": (2048, 5632, 22, 32, 4),
    "tiny": (64, 128, 2, 4, 2),
}


def build_model(tokenizer: str, out: Path, size: str, device: str) -> tuple[Path, int]:
    """A randomly initialised Llama (bf16 on disk for the 1b size) with a real tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    hidden, inter, layers, heads, kv = SIZES[size]
    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=len(tok),
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if size != "tiny" else torch.float32
    with torch.device(device):  # initialise on the GPU: seconds instead of a minute on CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    return out, params


def peak_flops() -> float:
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))


class Report:
    """Numbers as they come: printed, and rewritten to gpu_check.json after every stage."""

    def __init__(self, out: Path):
        self.path, self.data = out / "gpu_check.json", {}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, stage: str, **values) -> None:
        self.data[stage] = values
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"[gpu_check] {stage}: {shown}", flush=True)
        self.path.write_text(json.dumps(self.data, indent=2))


def run_config(model: Path, data: str, work: Path, name: str, pairs: int, gpu: bool, max_length: int,
               batch: int, ref_dtype: str = "bfloat16", **train):
    from dpo_ray.config import DataConfig, Pool, ReferenceConfig, RunConfig, TrainConfig

    cpus = max(1, (os.cpu_count() or 2) // 4)
    return RunConfig(
        data=DataConfig(source=data, tokenizer=str(model), limit=pairs, on_bad_row="skip",
                        max_length=max_length, max_prompt_length=max_length // 2),
        reference=ReferenceConfig(model=str(model), dtype=ref_dtype, cache_dir=str(work / "cache"),
                                  pool=Pool(num_cpus_per_actor=cpus, num_gpus_per_actor=1 if gpu else 0),
                                  batch_size=64,
                                  micro_batch_size=16 if gpu else 4),
        train=TrainConfig(**{"output_dir": str(work / "runs"), "run_name": name, "num_workers": 1,
                             "use_gpu": gpu, "cpus_per_worker": cpus,
                             "per_device_train_batch_size": batch, "learning_rate": 1e-6,
                             "lr_scheduler_type": "constant", **train}),
    )


def sequence_tokens(dataset) -> int:
    rows = dataset.select_columns(["chosen_input_ids", "rejected_input_ids"]).to_pandas()
    return int(rows["chosen_input_ids"].map(len).sum() + rows["rejected_input_ids"].map(len).sum())


def parity(report: Report, tokenizer: str, data: str, work: Path, gpu: bool) -> None:
    """Tiny fp32 model: reference values and 2 training steps, CPU against GPU."""
    import numpy as np

    from dpo_ray.reference import ensure_reference
    from dpo_ray.training import train

    model, _ = build_model(tokenizer, work / "tiny", "tiny", "cpu")
    results = {}
    for device in ("cpu", "gpu") if gpu else ("cpu",):
        config = run_config(model, data, work / f"parity-{device}", f"parity-{device}", 16,
                            device == "gpu", 256, 4, ref_dtype="float32", max_steps=2,
                            learning_rate=1e-3)
        ref = ensure_reference(config.data, config.reference).dataset.to_pandas().sort_values("pair_id")
        results[device] = (ref, train(config).metrics)
    if not gpu:
        report.add("parity", skipped="no GPU")
        return
    (ref_cpu, m_cpu), (ref_gpu, m_gpu) = results["cpu"], results["gpu"]
    ref_diff = float(np.abs(ref_cpu["ref_chosen_logps"].to_numpy() - ref_gpu["ref_chosen_logps"].to_numpy()).max())
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(m_cpu, m_gpu))
    report.add("parity", max_ref_logp_diff=ref_diff, max_loss_diff=loss_diff,
               losses_cpu=[m["loss"] for m in m_cpu], losses_gpu=[m["loss"] for m in m_gpu],
               match=bool(ref_diff < 1e-2 and loss_diff < 1e-3))


def stage(report: Report, name: str, skip: list[str], run) -> None:
    """Run one stage; a failure is reported with its error and the next stage still runs (one
    short GPU lease should bring back every number it can)."""
    if name in skip:
        return
    started = time.perf_counter()
    try:
        run()
    except Exception as err:  # noqa: BLE001 - reported, and the check goes on
        import traceback

        traceback.print_exc()
        report.add(name, error=f"{type(err).__name__}: {str(err)[:500]}")
    print(f"[gpu_check] {name} took {time.perf_counter() - started:.0f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="gpu_check_out")
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="pairs per GPU per step")
    parser.add_argument("--skip", nargs="*", default=[], help="stages to leave out")
    args = parser.parse_args()

    import torch

    from dpo_ray.config import GenerationConfig, LoraConfig, Pool
    from dpo_ray.ray_env import init_ray
    from dpo_ray.reference import ensure_reference
    from dpo_ray.training import train

    gpus = torch.cuda.device_count()
    report = Report(Path(args.out))
    report.add("machine", gpu=torch.cuda.get_device_name() if gpus else "none", gpus=gpus,
               cpus=os.cpu_count(), torch=torch.__version__, peak_bf16_tflops=peak_flops() / 1e12)
    init_ray()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    peak = peak_flops() if gpus else float("nan")
    stage(report, "parity", args.skip, lambda: parity(report, args.tokenizer, args.data, work, gpus > 0))

    started = time.perf_counter()
    model, params = build_model(args.tokenizer, work / "model", args.size, "cuda" if gpus else "cpu")
    report.add("model", params=params, size=args.size, build_s=time.perf_counter() - started)
    base = dict(model=model, data=args.data, work=work, pairs=args.pairs, gpu=gpus > 0,
                max_length=args.max_length, batch=args.batch)

    def reference_scoring():  # the cold pass every later run reuses
        config = run_config(name="unused", **base)
        started = time.perf_counter()
        reference = ensure_reference(config.data, config.reference)
        seconds = time.perf_counter() - started
        tokens = sequence_tokens(reference.dataset)
        report.add("reference_scoring", pairs=reference.rows, tokens=tokens, seconds=seconds,
                   tokens_per_s=tokens / seconds, mfu=2 * params * tokens / seconds / peak,
                   note="wall time includes the data stage, model load and the cache write")

    trained = {}

    def training(name: str, settings: dict):
        started = time.perf_counter()
        result = train(run_config(name=name, num_workers=max(gpus, 1), **{**base, **settings}))
        wall = time.perf_counter() - started
        steady = result.metrics[1:] or result.metrics
        tok_s = statistics.median(m["tokens_per_second"] for m in steady)
        report.add(name, steps=len(result.metrics), wall_s=wall, tokens_per_s=tok_s,
                   pairs_per_s=statistics.median(m["pairs_per_second"] for m in steady),
                   mfu=6 * params * tok_s / peak / max(gpus, 1),
                   peak_memory_mb=max(m["peak_memory_mb"] for m in result.metrics),
                   model_state_mb=result.metrics[-1]["model_state_mb"],
                   loss_first=result.metrics[0]["loss"], loss_last=result.metrics[-1]["loss"])
        trained[name] = result.final_model

    def generation():
        import ray

        from dpo_ray.eval.generate import generate

        prompts = ray.data.from_items([{"prompt_id": str(i), "prompt_json": json.dumps(
            f"Tell me something about the number {i}.")} for i in range(128)])
        config = GenerationConfig(max_new_tokens=64, dtype="bfloat16", batch_size=64,
                                  pool=Pool(num_gpus_per_actor=1 if gpus else 0))
        target = trained.get("lora_r16", model)  # a LoRA adapter folder loads as base + adapter
        started = time.perf_counter()
        samples = generate(prompts, str(target), config).to_pandas()
        seconds = time.perf_counter() - started
        new_tokens = int(samples["response_tokens"].sum())
        report.add("generation", model="lora adapter" if target != model else "base",
                   samples=len(samples), new_tokens=new_tokens, seconds=seconds,
                   new_tokens_per_s=new_tokens / seconds, note="wall time includes the model load")

    stage(report, "reference_scoring", args.skip, reference_scoring)
    variants = {  # most telling first: a short lease still brings these back
        "ddp_full_bf16_autocast": dict(bf16=True),
        "lora_r16": dict(bf16=True, peft=LoraConfig(r=16, alpha=32), learning_rate=1e-4),
        "fsdp_full_bf16_autocast": dict(bf16=True, parallel_strategy="fsdp"),
    }
    for name, settings in variants.items():
        stage(report, name, args.skip, lambda: training(name, settings))
    stage(report, "generation", args.skip, generation)
    stage(report, "bf16_weights", args.skip, lambda: training("bf16_weights", dict(bf16=True, dtype="bfloat16")))
    print(json.dumps(report.data, indent=2))


if __name__ == "__main__":
    main()
