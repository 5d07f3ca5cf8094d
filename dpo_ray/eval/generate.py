"""Generation and sequence scoring on Ray Data actor pools (each actor loads its model once).

``generate(prompts, model, config)``: prompts (``prompt_id``, ``prompt_json``) -> one row per
sample with ``GENERATION_COLUMNS`` (docs/eval.md). ``logp`` is the summed log-prob of the response
tokens under the generating model at temperature 1 (``response_logps``, the function that scores
pairs for DPO), so a policy's samples scored again under the reference give the KL estimate

    KL(pi || ref) ~= mean over samples y ~ pi of  [log pi(y|x) - log ref(y|x)].
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import ray
import torch

from dpo_ray import storage
from dpo_ray.logps import pad_sequences, response_labels, response_logps
from dpo_ray.models import load_causal_lm, pick_device
from dpo_ray.ray_env import actor_pool_kwargs

GENERATION_COLUMNS = {
    "prompt_id": pa.string(),
    "model_id": pa.string(),  # the model folder / hub id as given
    "sample_index": pa.int32(),  # 0 .. num_samples-1 for each prompt
    "prompt_input_ids": pa.list_(pa.int32()),  # the prompt as the model saw it (template applied)
    "response_input_ids": pa.list_(pa.int32()),  # generated ids, up to and including EOS
    "response": pa.string(),  # decoded, special tokens dropped
    "response_tokens": pa.int32(),
    "finished": pa.bool_(),  # ended with EOS (else cut at max_new_tokens)
    "logp": pa.float64(),  # sum of log pi(token) over the response, temperature 1
    "seed": pa.int64(),  # torch seed of the micro-batch that produced the sample
}


def prompt_ids(tokenizer, prompt, chat_template: bool, max_prompt_length: int) -> list[int]:
    """Chat messages -> the template with the generation prompt; text -> a user turn when
    ``chat_template`` (and the tokenizer has one), else the text with the tokenizer's special
    tokens. Long prompts keep their end (the turn being answered)."""
    if isinstance(prompt, str) and not (chat_template and tokenizer.chat_template):
        ids = tokenizer(prompt).input_ids
    else:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
    return list(ids[-max_prompt_length:])


def _seed(base: int, keys: list[str]) -> int:
    """A seed per micro-batch from the run seed and its prompts: rerunning the same config gives
    the same samples, whatever actor ran the batch."""
    digest = hashlib.sha256(json.dumps([base, keys]).encode()).hexdigest()
    return int(digest[:12], 16)


@torch.inference_mode()
def score_responses(model, prompts: list[list[int]], responses: list[list[int]], device) -> list[float]:
    """Summed log-probs (float64) of each response given its prompt, one padded forward pass."""
    ids, mask = pad_sequences([p + r for p, r in zip(prompts, responses)], pad_id=0)
    ids, mask = ids.to(device), mask.to(device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    logps, _ = response_logps(model, ids, mask, response_labels(ids, lengths, mask))
    return logps.cpu().tolist()


class Generator:
    """Ray Data callable class: prompts batch -> ``num_samples`` rows per prompt."""

    def __init__(self, model_id: str, config):
        from transformers import AutoTokenizer

        self.cfg, self.model_id = config, model_id
        self.device = pick_device(config.pool.num_gpus_per_actor)
        folder = storage.local_model(model_id)  # a model in object storage: fetched once, here
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = load_causal_lm(folder, config.dtype, device=self.device).eval()
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.cfg
        rows = batch.select(["prompt_id", "prompt_json"]).to_pylist()
        prompts = [prompt_ids(self.tokenizer, json.loads(r["prompt_json"]), cfg.chat_template,
                              cfg.max_prompt_length) for r in rows]
        out = {name: [] for name in GENERATION_COLUMNS}
        order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))  # similar lengths pad less
        per_call = max(1, cfg.batch_size // cfg.num_samples)
        for start in range(0, len(order), per_call):
            idx = order[start:start + per_call]
            seed = _seed(cfg.seed, [rows[i]["prompt_id"] for i in idx])
            torch.manual_seed(seed)
            ids, mask = pad_sequences([prompts[i] for i in idx], self.pad, side="left")
            generated = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                do_sample=cfg.do_sample, temperature=cfg.temperature if cfg.do_sample else None,
                top_p=cfg.top_p if cfg.do_sample else None, top_k=0 if cfg.do_sample else None,
                max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.num_samples,
                pad_token_id=self.pad, eos_token_id=self.eos)[:, ids.shape[1]:].cpu().tolist()
            responses = [self._until_eos(g) for g in generated]  # row j: prompt idx[j // n]
            owners = [i for i in idx for _ in range(cfg.num_samples)]
            logps = score_responses(self.model, [prompts[i] for i in owners], responses, self.device)
            for j, (i, response) in enumerate(zip(owners, responses)):
                out["prompt_id"].append(rows[i]["prompt_id"])
                out["model_id"].append(self.model_id)
                out["sample_index"].append(j % cfg.num_samples)
                out["prompt_input_ids"].append(prompts[i])
                out["response_input_ids"].append(response)
                out["response"].append(self.tokenizer.decode(response, skip_special_tokens=True).strip())
                out["response_tokens"].append(len(response))
                out["finished"].append(bool(response) and response[-1] == self.eos)
                out["logp"].append(logps[j])
                out["seed"].append(seed)
        return pa.table(out, schema=pa.schema(GENERATION_COLUMNS))

    def _until_eos(self, tokens: list[int]) -> list[int]:
        return tokens[:tokens.index(self.eos) + 1] if self.eos in tokens else tokens


class SequenceScorer:
    """Ray Data callable class: adds ``<column>`` = log-prob of each generated response under
    another model (the reference, for the KL estimate). Same tokenizer as the generator assumed."""

    def __init__(self, model_id: str, column: str, config):
        self.device = pick_device(config.pool.num_gpus_per_actor)
        self.model = load_causal_lm(model_id, config.dtype, device=self.device).eval()
        self.column, self.micro = column, max(1, config.batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = batch.column("prompt_input_ids").to_pylist()
        responses = batch.column("response_input_ids").to_pylist()
        values = []
        for start in range(0, len(prompts), self.micro):
            values += score_responses(self.model, prompts[start:start + self.micro],
                                      responses[start:start + self.micro], self.device)
        return batch.append_column(self.column, pa.array(values, pa.float64()))


def _pool(config, what: str) -> dict:
    return {"batch_format": "pyarrow", "batch_size": config.batch_size,
            **actor_pool_kwargs(config.pool, what)}


def generate(prompts: ray.data.Dataset, model_id: str, config) -> ray.data.Dataset:
    """Samples for every prompt (lazy). Blocks of one batch each spread prompts over the pool."""
    return prompts.repartition(target_num_rows_per_block=config.batch_size).map_batches(
        Generator, fn_constructor_args=(model_id, config), **_pool(config, "generation"))


def score_samples(samples: ray.data.Dataset, model_id: str, column: str, config) -> ray.data.Dataset:
    """``samples`` + ``column``: each response's log-prob under ``model_id`` (lazy)."""
    return samples.repartition(target_num_rows_per_block=config.batch_size).map_batches(
        SequenceScorer, fn_constructor_args=(model_id, column, config), **_pool(config, "sequence scorer"))
