"""Typed configuration: one dataclass per stage, loaded from YAML plus ``key=value`` overrides.

Pydantic dataclasses give us type checking, an error that names any unknown key, and required
fields that fail before a single Ray task starts. Every run writes its resolved config next to
its outputs (``save_config``) so a result can always be traced to the settings that made it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs

from dpo_ray import storage
from dpo_ray.trl_names import report_to_names, trl_names

STRICT = ConfigDict(extra="forbid", validate_assignment=True)

# Ranges are declared on the fields, so every bad value is refused when the config is built,
# before Ray starts, with the field's name and the allowed range in the message.
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]  # a share of the pairs, 1 excluded
Probability = Annotated[float, Field(gt=0, lt=1)]

Format = Literal["auto", "explicit", "implicit", "conversational"]


def _model_ref(value: str) -> str:
    """A local folder becomes an absolute path here, once, on the machine where it was typed:
    "~/..." would be taken for a hub id by transformers, and a relative "models/x" would be looked
    up from the working directory of each Ray worker (not the user's) and then on the hub."""
    path = os.path.expanduser(value)
    return os.path.abspath(path) if os.path.isdir(path) else path


# A model or tokenizer: a hub id or a folder.
ModelRef = Annotated[str, AfterValidator(_model_ref)]


@dataclass(config=STRICT)
class Placement:
    """Where a stage's actors or workers may run on a cluster, beyond CPUs/GPUs: custom resources
    a node group advertises (``cluster.yaml`` gives ``dpo_train`` / ``dpo_score``), an accelerator
    type (``A100``, ``L4``...), or node labels. Empty = anywhere."""

    # custom resources per actor/worker, e.g. {dpo_score: 1}
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    accelerator_type: str | None = None  # e.g. A100, L4 (Ray's accelerator_type); null = any
    # node labels the node must carry, e.g. {ray.io/market-type: spot}
    label_selector: dict[str, str] = dataclasses.field(default_factory=dict)
    # With an autoscaler, how long to wait for nodes that can hold the request before giving up
    # (without one, a request no node can hold fails at once).
    wait_timeout_s: NonNegative = 600.0

    def ray_data_kwargs(self) -> dict:
        """Keyword arguments for ``Dataset.map_batches`` (only the ones that are set)."""
        out: dict = {}
        if self.resources:
            out["resources"] = dict(self.resources)
        if self.accelerator_type:
            out["accelerator_type"] = self.accelerator_type
        if self.label_selector:
            out["label_selector"] = dict(self.label_selector)
        return out


@dataclass(config=STRICT)
class Tasks:
    """Ray Data tasks, for a stage whose setup is cheap (tokenizing, ``data.tasks``): nothing to
    start before the first batch, and each worker process keeps its tokenizer between tasks.
    ``dpo_ray.ray_env.task_pool_kwargs`` turns it into ``map_batches`` arguments."""

    max_tasks: PositiveInt | None = None  # tasks at once; None = as many as free CPUs allow
    num_cpus_per_task: NonNegative = 1.0  # CPUs Ray reserves for each task
    placement: Placement = dataclasses.field(default_factory=Placement)  # where tasks may run


@dataclass(config=STRICT)
class Pool:
    """A Ray Data actor pool: each actor loads its model once and serves many batches. Every
    model stage is set the same way: ``reference.pool`` (scoring), ``eval.generation.pool`` and
    each judge's ``pool``. ``dpo_ray.ray_env.actor_pool_kwargs`` turns it into ``map_batches``
    arguments."""

    # The pool starts with min_actors and grows to max_actors while batches are queued.
    min_actors: PositiveInt = 1
    max_actors: PositiveInt = 1  # upper bound of the autoscaling pool
    # GPUs per actor > 0 places actors on GPU nodes; a fraction shares one GPU between actors.
    num_cpus_per_actor: NonNegative = 1.0
    num_gpus_per_actor: NonNegative = 0.0  # 0 = CPU only
    placement: Placement = dataclasses.field(default_factory=Placement)

    def __post_init__(self) -> None:
        if self.max_actors < self.min_actors:
            raise ValueError(f"pool.max_actors={self.max_actors} is below min_actors={self.min_actors}")


@dataclass(config=STRICT)
class DataConfig:
    """Where preference pairs come from and how they become token ids.

    Names follow TRL's ``DPOConfig`` where the meaning is the same (``max_length``,
    ``max_prompt_length``).
    """

    # A file, directory, glob or filesystem URI (.jsonl/.jsonl.gz/.json/.parquet/.csv), or
    # ``hf://<dataset id>`` or a bare ``owner/name`` (when no local path has that name) for a
    # Hugging Face hub dataset, loaded with ``datasets.load_dataset``.
    source: str
    # Tokenizer: a local folder or hub id (usually the policy model's).
    tokenizer: ModelRef
    # explicit (prompt/chosen/rejected), implicit (HH-style) or conversational (messages);
    # auto detects it per row
    format: Format = "auto"
    # How files are parsed: by extension (auto; .jsonl/.json/.csv/.parquet in any case, .gz
    # allowed), or this format for every file, e.g. ``jsonl`` for a ``pairs.txt``.
    file_format: Literal["auto", "jsonl", "json", "csv", "parquet"] = "auto"
    prompt_column: str = "prompt"  # column names of explicit / conversational rows
    chosen_column: str = "chosen"  # a response, or a list of chat messages
    rejected_column: str = "rejected"  # a response, or a list of chat messages
    # HH-RLHF style implicit prompts end at the last occurrence of this marker.
    assistant_marker: str = "\n\nAssistant:"
    human_marker: str = "\n\nHuman:"  # a turn boundary of HH-style dialogues
    # prompt + response tokens; the original DPO repo uses 512 / 256.
    max_length: Annotated[int, Field(ge=2)] = 512
    # Prompt tokens kept, cut from the left (the turn being answered survives; in chat prompts at
    # a turn boundary when one fits); every cut is counted in the data report. auto = half of
    # max_length (the DPO repo's 256 of 512); null = no prompt cut, only max_length limits.
    max_prompt_length: PositiveInt | Literal["auto"] | None = "auto"
    # raise: stop at the first bad row, naming file, row and field; skip: drop, count and report
    on_bad_row: Literal["raise", "skip"] = "raise"
    # Only the first N rows of the source (after reading, before validation); None = all.
    limit: PositiveInt | None = None
    # A separate held-out set (a file, folder, glob, URI or hub id, read with the settings above):
    # training's eval_* metrics and pair accuracy are computed on all of it, instead of on a
    # train.eval_fraction split of ``source``. Scored by the reference once, cached like source.
    eval_source: str | None = None
    eval_limit: PositiveInt | None = None  # first N rows of eval_source; None = all
    # Hugging Face hub options, used with hub dataset sources only.
    hf_split: str = "train"
    hf_name: str | None = None  # the dataset's config name
    hf_data_dir: str | None = None  # a data_dir inside the dataset repo
    hf_revision: str | None = None  # a commit, tag or branch
    trust_remote_code: bool = False  # allow a hub dataset's or tokenizer's own code to run
    # Ray Data: rows per tokenizing task, and those tasks' CPUs, concurrency and placement.
    tokenize_batch_size: PositiveInt = 256
    tasks: Tasks = dataclasses.field(default_factory=Tasks)

    @property
    def prompt_limit(self) -> int | None:
        """``max_prompt_length`` as a token count (None: no prompt cut)."""
        return self.max_length // 2 if self.max_prompt_length == "auto" else self.max_prompt_length

    def held_out(self) -> DataConfig | None:
        """The config that reads ``eval_source`` (None without one)."""
        if self.eval_source is None:
            return None
        return dataclasses.replace(self, source=self.eval_source, limit=self.eval_limit,
                                   eval_source=None, eval_limit=None)

    def __post_init__(self) -> None:
        if isinstance(self.max_prompt_length, int) and not 1 <= self.max_prompt_length < self.max_length:
            raise ValueError(
                f"data.max_prompt_length must be in [1, max_length={self.max_length}), "
                f"got {self.max_prompt_length}"
            )


@dataclass(config=STRICT)
class ReferenceConfig:
    """The frozen reference model, the actor pool that scores every pair once, and its cache.

    Nothing here that only changes *how fast* values are computed (pool size, batch sizes) is part
    of the cache key; everything that changes the values is (see ``dpo_ray/reference/cache.py``).
    """

    # A local Hugging Face folder or a hub id (safetensors weights only).
    model: ModelRef
    revision: str | None = None  # a hub commit, tag or branch (part of the cache key)
    # precision the reference scores in (part of the cache key)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False  # allow a hub model's own code to run
    # Local path or filesystem URI (file://, s3://, gs://) every node can reach.
    cache_dir: str = "~/.cache/dpo_ray/reference"
    pool: Pool = dataclasses.field(default_factory=lambda: Pool(max_actors=2))
    # Pairs per actor call; inside a call pairs are sorted by length and run in micro-batches of
    # ``micro_batch_size`` pairs (2x sequences, chosen + rejected in one pass) to keep padding small.
    batch_size: PositiveInt = 64
    micro_batch_size: PositiveInt = 8  # pairs per forward pass inside a call
    # Each pair as one prompt|chosen|rejected sequence (the prompt computed once), packed with no
    # padding; false: chosen and rejected as padded rows. Same values to float rounding
    # (dpo_ray/logps.py); models whose attention cannot take the mask (flash) always pad.
    padding_free: bool = True
    # Log-probs this many vocabulary entries at a time (dpo_ray/logps.py), so the (positions x
    # vocabulary) logits are never whole; 0 = the whole logits at once. Same values to rounding.
    vocab_chunk_size: NonNegativeInt = 8192


@dataclass(config=STRICT)
class LoraConfig:
    """LoRA adapters through the ``peft`` library: only these small matrices are trained, stored
    and checkpointed. The reference values are cached, so no frozen copy of the model is needed at
    all during training: base weights + adapters is the whole memory bill."""

    r: PositiveInt = 16  # rank of the adapter matrices
    alpha: Positive = 32.0  # the update is scaled by alpha / r
    dropout: Fraction = 0.0  # kept as set: train.disable_dropout zeroes the base model's only (TRL zeroes both)
    # Module names to adapt, or "all-linear" (every linear layer but the LM head).
    target_modules: list[str] | str = "all-linear"
    # Also write final_model_merged/: base + adapter folded into one plain Hugging Face model.
    merge: bool = False


Tracker = Literal["mlflow", "tensorboard", "wandb"]


def _rewrite_kwargs(values: Any, rewrite) -> Any:
    """A ``mode="before"`` model validator's input with its keyword arguments passed through
    ``rewrite`` (a pydantic dataclass is validated from its ``__init__`` arguments)."""
    if isinstance(values, ArgsKwargs):
        return ArgsKwargs(values.args, rewrite(values.kwargs or {}))
    return rewrite(values) if isinstance(values, dict) else values


@dataclass(config=STRICT)
class TrainConfig:
    """DPO objective, optimisation, Ray Train scaling and the run directory. Names follow TRL's
    ``DPOConfig`` where the meaning is the same. None of these are inputs of the reference cache:
    changing them reuses the cached reference values."""

    # The policy's starting weights; None = the reference model (the usual DPO set-up).
    model: ModelRef | None = None
    # "dpo" trains the policy on cached reference values; "reward_model" trains a Bradley-Terry
    # scalar-head model (AutoModelForSequenceClassification, 1 label) on the same pairs, with no
    # reference model at all (its rewards/* metrics are the head's scores).
    objective: Literal["dpo", "reward_model"] = "dpo"
    # KL strength: larger keeps the policy closer to the reference (DPO paper: 0.1)
    beta: Positive = 0.1
    # sigmoid (DPO), robust, hinge (SLiC), ipo (TRL's: log-probs averaged over response tokens),
    # ipo_sum (the IPO paper's form on summed log-probs); formulas in dpo_ray/losses.py.
    loss_type: Literal["sigmoid", "robust", "hinge", "ipo", "ipo_sum"] = "sigmoid"
    # Label noise eps. With sigmoid this is cDPO (Mitchell 2023), as TRL 0.x did; TRL 1.x ignores
    # label_smoothing for sigmoid. With robust: the robust DPO loss.
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    # Weight of the SFT term: TRL's token-mean NLL of the chosen responses, the mean taken over
    # the global batch (so it does not depend on the number of workers).
    rpo_alpha: NonNegative = 0.0
    optimizer: Literal["adamw", "rmsprop"] = "adamw"  # the DPO paper used RMSprop; TRL's optim also accepted
    learning_rate: Positive = 5e-7  # peak learning rate (after warmup)
    weight_decay: NonNegative = 0.0  # decoupled weight decay (AdamW)
    max_grad_norm: Positive = 1.0  # gradients are clipped to this global norm
    # An int: steps of linear warmup. A float below 1: that share of the total steps (as in
    # transformers 5 / TRL 1.x; warmup_ratio is accepted as its old name).
    warmup_steps: NonNegativeInt | Annotated[float, Field(ge=0, lt=1)] = 0
    # As in transformers: constant ignores warmup, constant_with_warmup does not.
    lr_scheduler_type: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "linear"
    num_train_epochs: PositiveInt = 1  # passes over the training pairs
    max_steps: int = -1  # > 0 stops after this many optimizer steps (at most num_train_epochs)
    per_device_train_batch_size: PositiveInt = 8  # pairs per worker per micro-batch
    gradient_accumulation_steps: PositiveInt = 1  # micro-batches per optimizer step
    seed: int = 0  # model init, shuffling and dropout
    # Pairs are shuffled within windows of this many global batches (dpo_ray/training/batching.py).
    shuffle_window: PositiveInt = 16
    # Within a window, a batch takes pairs of similar length, so packed rows carry little padding.
    group_by_length: bool = True
    # Precision of the policy's weights (and so of its gradients and Adam state). bfloat16 halves
    # them, but rounds small updates away; with bfloat16 weights and a float32 reference, the
    # step-0 guard compares relative, not absolute, deviations.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # bfloat16 autocast of forward and backward over float32 weights (master weights and AdamW
    # state stay float32). "auto" (as TRL, which turns bf16 on by default): on where the training
    # device computes bfloat16 fast (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), decided
    # in the worker and written to the run's precision.json; false = float32 throughout.
    bf16: bool | Literal["auto"] = "auto"
    # Passed to from_pretrained: "eager", "sdpa", "flash_attention_2"...; None = transformers' default.
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    # As reference.padding_free, for the policy's passes (training and held-out evaluation).
    padding_free: bool = True
    # As reference.vocab_chunk_size, for the policy's passes. Backward recomputes each chunk's
    # logits: one more LM-head matmul (~3-5% of a SmolLM2 step on CPU, measured) for the memory
    # of the logits. FSDP keeps the whole logits (its sharded head is whole only in its forward).
    vocab_chunk_size: NonNegativeInt = 8192
    peft: LoraConfig | None = None  # LoRA adapters instead of full fine-tuning
    # ddp: every worker holds the whole model (Ray Train's prepare_model). fsdp: parameters,
    # gradients and optimizer state are sharded across workers (FSDP2 fully_shard per decoder layer).
    parallel_strategy: Literal["ddp", "fsdp"] = "ddp"
    disable_dropout: bool = True  # as TRL: dropout would make policy and reference differ at step 0
    # Held-out evaluation: this share of pairs (chosen by pair_id hash: stable and disjoint from
    # training) is scored every eval_steps (0 = at the end only) with its cached reference values.
    eval_fraction: Fraction = 0.0
    eval_steps: NonNegativeInt = 0  # held-out evaluation every N steps (0 = at the end only)
    per_device_eval_batch_size: PositiveInt = 8  # held-out pairs per worker per forward
    # Ray Train
    # The train/held-out splits held in Ray's object store for the run ("auto": when their upper
    # bound, pairs x 2 x max_length token ids, fits in a quarter of it), or streamed from the cache
    # every epoch and every evaluation (a re-read costs seconds however few the pairs).
    materialize_datasets: Literal["auto", "always", "never"] = "auto"
    num_workers: PositiveInt = 2  # Ray Train workers (one process each; DDP or FSDP between them)
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: NonNegative = 1.0  # CPUs reserved per worker
    placement: Placement = dataclasses.field(default_factory=Placement)  # of the train workers
    max_failures: Annotated[int, Field(ge=-1)] = 0  # -1 = retry forever
    # Run directory: <output_dir>/<run_name>; a new name per run unless resuming explicitly.
    output_dir: str = "runs"
    run_name: str | None = None  # default: dpo-<timestamp>
    resume: bool = False  # continue the run named run_name from its latest checkpoint
    logging_steps: PositiveInt = 1  # metrics.jsonl, console and trackers every N steps
    save_steps: NonNegativeInt = 0  # 0 = only at the end
    save_total_limit: PositiveInt | None = 2  # checkpoints kept (the latest N); null = all
    # Step-0 guard: when policy == reference weights, every |logp_policy - logp_ref| (nats) and,
    # for the sigmoid loss, |loss - ln 2| must be within this at the first step.
    step0_tolerance: Positive = 1e-3
    # ... and when policy and reference ran in different precisions (e.g. bfloat16 policy, float32
    # cache): the largest |logp_policy - logp_ref| / |logp_ref| allowed. bf16 rounding stays ~1%;
    # a wrong cache, model or tokenizer is off by far more.
    step0_rtol_low_precision: Positive = 0.05
    # Experiment tracking: metrics every logging step (from rank 0), the resolved config as
    # params, metrics.png and the final model as artifacts (see dpo_ray/tracking.py, README).
    report_to: list[Tracker] = dataclasses.field(default_factory=list)
    # MLflow tracking URI; None = $MLFLOW_TRACKING_URI, else a file store in <output_dir>/mlruns.
    tracking_uri: str | None = None
    project: str = "dpo_ray"  # MLflow experiment and W&B project

    @model_validator(mode="before")
    @classmethod
    def _trl_names(cls, values: Any) -> Any:
        return _rewrite_kwargs(values, trl_names)

    def __post_init__(self) -> None:
        if self.lr_scheduler_type == "constant" and self.warmup_steps:
            raise ValueError("train.lr_scheduler_type=constant ignores warmup (as in transformers); "
                             "use constant_with_warmup to warm up")

    @property
    def global_batch_size(self) -> int:
        """Pairs per optimizer step over all workers."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_workers

    def num_warmup_steps(self, total_steps: int) -> int:
        """``warmup_steps`` as a step count for a run of ``total_steps`` (a share is rounded up,
        as transformers rounds ``warmup_ratio``)."""
        if isinstance(self.warmup_steps, float):
            return math.ceil(self.warmup_steps * total_steps)
        return self.warmup_steps


@dataclass(config=STRICT)
class GenerationConfig:
    """Sampling on the generation actor pool (one model per actor, loaded once)."""

    max_new_tokens: PositiveInt = 64  # a sample stops here or at EOS (reports count the ones cut)
    do_sample: bool = True  # False = greedy
    temperature: Positive = 1.0  # the KL estimate is exact only at 1.0 (samples from the model itself)
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0  # nucleus sampling; 1.0 = off
    num_samples: PositiveInt = 1  # samples per prompt
    seed: int = 0  # sampling seed (each prompt draws from its own generator)
    # Text prompts become a user message in the tokenizer's chat template (when it has one);
    # false feeds the text as is (e.g. HH-style "\n\nHuman: ...\n\nAssistant:" prompts).
    chat_template: bool = True
    max_prompt_length: PositiveInt = 256  # prompt tokens kept (from the end)
    # precision of the generation models
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: PositiveInt = 16  # prompts per actor call; sorted by length inside the call
    pool: Pool = dataclasses.field(default_factory=Pool)


@dataclass(config=STRICT)
class JudgeConfig:
    """One judge. ``function``: a builtin lexicon (``vader``, ``textblob``, ``afinn``, ``length``)
    or ``module:callable`` taking (prompt, response) -> score, or (prompt, first, second) ->
    "first" | "second" | "tie". ``reward_model``: a sequence-classification folder (1 label).
    ``llm``: a causal LM asked the pairwise ``template``, in both orders."""

    # function (a lexicon or your callable), reward_model or llm
    kind: Literal["function", "reward_model", "llm"]
    name: str  # builtin name, module:callable, or a model folder / hub id
    label: str | None = None  # how reports call it; default: name
    # Score judges: |score_a - score_b| <= tie_margin is a tie.
    tie_margin: NonNegative = 0.0
    template: str | None = None  # llm judges; None = dpo_ray.eval.judges.PAIRWISE_TEMPLATE
    batch_size: PositiveInt = 16  # samples per judge call
    pool: Pool = dataclasses.field(default_factory=Pool)


@dataclass(config=STRICT)
class EvalConfig:
    """Win-rate evaluation of one or more policies against a baseline on held-out prompts."""

    # JSONL/Parquet/JSON/CSV rows with a ``prompt`` (text or chat messages), or preference rows
    # (the baseline ``chosen`` needs those); see docs/eval.md.
    prompts: str
    judges: list[JudgeConfig]  # one win rate per (policy, judge)
    # Model folders, hub ids or run directories (their final_model/); in a pipeline run, empty
    # means the model just trained.
    policies: list[ModelRef] = dataclasses.field(default_factory=list)
    # "reference" (the reference model's samples), "chosen" (the dataset's chosen responses) or a
    # model folder / hub id.
    baseline: ModelRef = "reference"
    reference: ModelRef | None = None  # for baseline "reference" and the KL estimate; None = no KL
    # Preference rows: keep only pairs held out from training by the same pair_id hash rule as
    # train.eval_fraction (so prompts never overlap the training split).
    held_out_fraction: Probability | None = None
    limit: PositiveInt | None = None  # first N distinct prompts
    on_bad_row: Literal["raise", "skip"] = "raise"  # skip: counted in summary.json
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)
    output_dir: str = "evals"  # eval directories are made under here
    name: str | None = None  # default: eval-<timestamp>
    confidence: Probability = 0.95  # level of the bootstrap confidence intervals
    n_resamples: PositiveInt = 2000  # bootstrap resamples (prompts are resampled, samples stay together)
    bootstrap_seed: int = 0  # seed of the bootstrap resampling
    # Log the summary (win rates, CIs, KL) as metrics and the report as artifacts, in a run named
    # after the eval directory (the pipeline logs into the training run instead); see train.report_to.
    report_to: list[Tracker] = dataclasses.field(default_factory=list)
    tracking_uri: str | None = None  # as train.tracking_uri
    project: str = "dpo_ray"  # MLflow experiment and W&B project

    @model_validator(mode="before")
    @classmethod
    def _report_to(cls, values: Any) -> Any:
        return _rewrite_kwargs(values, report_to_names)


# Train fields a sweep cannot vary: each trial gets its own run directory under the sweep's.
_NOT_SWEPT = {"output_dir", "run_name", "resume"}
_DISTRIBUTIONS = {"uniform", "loguniform", "choice"}


def _sweep_keys(ranges: dict) -> dict:
    for key in ranges:
        top = key.split(".")[0]
        if top not in TrainConfig.__dataclass_fields__ or top in _NOT_SWEPT:
            raise ValueError(f"{key!r} is not a train field a sweep can vary (a sweep varies train.* "
                             "only: the data and reference stay fixed, so one cached reference serves "
                             f"every trial; {', '.join(sorted(_NOT_SWEPT))} are set per trial)")
    return ranges


def _distribution(spec: dict) -> dict:
    if len(spec) != 1 or next(iter(spec)) not in _DISTRIBUTIONS:
        raise ValueError(f"{spec!r}: give exactly one of {sorted(_DISTRIBUTIONS)}, e.g. "
                         "{loguniform: [1.0e-6, 1.0e-4]}")
    (kind, values), = spec.items()
    if kind != "choice":
        if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or values[0] >= values[1]:
            raise ValueError(f"{kind}: expected [low, high] numbers with low < high, got {values!r}")
        if kind == "loguniform" and values[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {values[0]!r}")
    elif not values:
        raise ValueError("choice: expected at least one value")
    return spec


@dataclass(config=STRICT)
class SweepConfig:
    """``dpo-ray sweep``: Ray Tune trials over ``train.*`` fields. Data and reference are shared
    by every trial, so one cached reference pass serves them all.

    Keys name train fields (``beta``, ``learning_rate``, ``peft.r``). Every combination of
    ``grid`` is a trial; with ``random`` each combination is drawn ``num_samples`` times.
    """

    grid: Annotated[dict[str, Annotated[list[Any], Field(min_length=1)]],
                    AfterValidator(_sweep_keys)] = dataclasses.field(default_factory=dict)  # field -> values; every combination is a trial
    random: Annotated[dict[str, Annotated[dict[str, list[Any]], AfterValidator(_distribution)]],
                      AfterValidator(_sweep_keys)] = dataclasses.field(default_factory=dict)  # field -> {uniform|loguniform: [low, high]} or {choice: [...]}
    num_samples: PositiveInt = 1  # draws of `random` per grid combination (repeats when only `grid`)
    metric: str = "eval_loss"  # the trials' last logged value of this picks the best one
    mode: Literal["min", "max"] = "min"  # min: lower metric is better (losses); max: accuracies, margins
    max_concurrent_trials: PositiveInt | None = None  # None = as many as the cluster's CPUs hold, one data task spare
    name: str | None = None  # folder under train.output_dir; default: sweep-<timestamp>
    search_seed: int = 0  # of the random draws (train.seed seeds each trial's training)

    def __post_init__(self) -> None:
        if not self.grid and not self.random:
            raise ValueError("nothing to vary; give sweep.grid (e.g. sweep.grid.beta=[0.05,0.1]) "
                             "or sweep.random")
        both = set(self.grid) & set(self.random)
        if both:
            raise ValueError(f"{sorted(both)} in both grid and random")

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid values, as {field: value}."""
        import itertools

        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*self.grid.values())]

    def corner_points(self) -> list[dict[str, Any]]:
        """Every grid combination with each random field at each end of its range (or each of its
        choices): the settings a config check must accept before any trial runs."""
        points = self.grid_points()
        for key, spec in self.random.items():
            (kind, values), = spec.items()
            points = [{**p, key: v} for p in points for v in values]
        return points


def trial_train(train: TrainConfig, params: dict[str, Any], output_dir: str, run_name: str) -> TrainConfig:
    """``train`` with a trial's values (dotted keys for nested fields, e.g. ``peft.r``), writing
    its run to ``output_dir/run_name``. A value the field refuses is a ValueError naming it."""
    tree = config_dict(train)
    for key, value in params.items():
        if "." in key and tree.get(key.split(".")[0]) is None:  # e.g. peft.r with LoRA off: turns it on
            tree[key.split(".")[0]] = {}
        _set_dotted(tree, key, value)
    tree.update(output_dir=output_dir, run_name=run_name, resume=False)
    try:
        return build_config(TrainConfig, tree, section="train")
    except ValueError as err:
        raise ValueError(f"sweep trial {params}: {str(err).split('): ', 1)[-1]}") from None


@dataclass(config=STRICT)
class RunConfig:
    """A whole run: one section per stage, as in ``run.yaml``."""

    data: DataConfig
    reference: ReferenceConfig
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig | None = None  # used by `dpo-ray pipeline` after training
    sweep: SweepConfig | None = None  # used by `dpo-ray sweep`: train fields to vary

    def __post_init__(self) -> None:
        if self.data.eval_source is not None and self.train.eval_fraction > 0:
            raise ValueError("data.eval_source and train.eval_fraction both choose the held-out "
                             "pairs; set one")
        if self.sweep is not None and self.sweep.metric.startswith("eval_") and not self.has_held_out:
            raise ValueError(f"sweep.metric={self.sweep.metric} is a held-out metric, but the runs hold "
                             "no pairs out: set train.eval_fraction or data.eval_source (or a "
                             "training metric such as sweep.metric=loss)")
        if self.sweep is not None:  # every trial's settings are checked now, before Ray starts
            for point in self.sweep.corner_points():
                trial_train(self.train, point, self.train.output_dir, "check")

    @property
    def has_held_out(self) -> bool:
        return self.data.eval_source is not None or self.train.eval_fraction > 0


C = TypeVar("C")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["data.max_length=256", "beta=0.1"]`` -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({err})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def merge_trees(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, nested sections merged key by key (overrides, recipe sizes)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping; a file that is not one is a ``ValueError`` naming it."""
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return loaded


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None,
                section: str | None = None, defaults: dict | None = None) -> C:
    """Build ``cls`` from ``defaults`` (a tree, e.g. a recipe's size), a YAML file over them
    (optionally one ``section`` of it) and overrides over both.

    Errors name the offending key, e.g. ``data.max_lenght: Unexpected keyword argument``.
    """
    tree = read_yaml(path) if path is not None else {}
    if section is not None:
        tree = tree.get(section, {}) or {}
    overrides_tree = parse_overrides(overrides or [])
    if section is not None and section in overrides_tree:
        overrides_tree = merge_trees(
            {k: v for k, v in overrides_tree.items() if k != section}, overrides_tree[section]
        )
    tree = merge_trees(defaults or {}, tree)
    return build_config(cls, merge_trees(tree, overrides_tree), str(path or "no file"), section)


def build_config(cls: type[C], tree: dict, origin: str = "no file", section: str | None = None) -> C:
    """``cls(**tree)``, with every validation problem named by its dotted key, the allowed range
    and the value, in one ``ValueError`` (e.g. ``train.beta: Input should be greater than 0``)."""
    try:
        return cls(**tree)
    except ValidationError as err:
        where = f"{section}." if section else ""
        problems = "; ".join(
            f"{where}{'.'.join(str(p) for p in e['loc']) + ': ' if e['loc'] else ''}"
            f"{e['msg'].removeprefix('Value error, ')}"
            + (f" (got {e['input']!r})" if e["type"] != "missing"
               and not isinstance(e.get("input"), (dict, list, ArgsKwargs)) else "")
            for e in err.errors()
        )
        raise ValueError(f"invalid {cls.__name__} ({origin}): {problems}") from None
    except TypeError as err:  # unknown keys surface as TypeError for some pydantic paths
        raise ValueError(f"invalid {cls.__name__} ({origin}): {err}") from None


def local_dir(path: str, field: str) -> Path:
    """A sweep's or recipe's output directory: a path (``file://`` allowed). On a cluster it must
    be mounted on every node (NFS/EFS/...): trials and rounds write into it with ordinary file
    operations from several nodes. (A single run's ``train.output_dir`` and ``eval.output_dir``
    also take object-store URIs: ``dpo_ray/storage.py``.)"""
    if storage.is_remote(path):
        raise ValueError(f"{field}={path!r}: sweeps and recipes need a path every node mounts (NFS, "
                         "EFS, a FUSE-mounted bucket); object-store URIs work for a single run's "
                         "train.output_dir and eval.output_dir, reference.cache_dir and data")
    return storage.local_path(path)


def config_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_dict(config), sort_keys=False))
