"""The data stage: source -> validated, tokenized pairs (a Ray Dataset) + a report.

``prepare_pairs`` is what training and the reference stage call; ``dpo-ray data`` calls it and
writes the pairs as Parquet (the schema is ``PAIR_SCHEMA`` minus the ``skip_*`` columns) with
``data_report.json`` and the resolved ``data_config.yaml`` beside them.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray

from dpo_ray.config import DataConfig, save_config
from dpo_ray.console import counted, progress, stage
from dpo_ray.data.errors import DUPLICATE_PAIR, NO_PAIRS_LEFT, NO_ROWS, PreferenceDataError
from dpo_ray.data.sources import hub_dataset_id, list_source, read_records
from dpo_ray.data.tokenize import PAIR_SCHEMA, tokenize_batch
from dpo_ray.ray_env import keep_order, root_cause, task_pool_kwargs

PAIR_COLUMNS = [name for name in PAIR_SCHEMA.names if not name.startswith("skip_")]
_EXAMPLES_KEPT = 20


@dataclass
class DataReport:
    """What the data stage read, kept, skipped (by reason) and truncated."""

    rows_read: int = 0
    pairs: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[dict] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)
    prompt_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    max_sequence_length: int = 0
    mean_sequence_length: float = 0.0
    # Files under a source directory that were not read (unknown extension): listed, not dropped
    # silently. ``data.file_format`` reads them.
    ignored_files: list[str] = field(default_factory=list)

    def check_balance(self) -> None:
        """Every row read is either a pair or a counted skip; anything else is a bug here."""
        if self.rows_read != self.pairs + sum(self.skipped.values()):
            raise RuntimeError(f"data report does not balance: {self.rows_read} rows read, "
                               f"{self.pairs} pairs, skipped {self.skipped}")

    def summary(self) -> str:
        lines = [f"read {self.rows_read} rows -> {self.pairs} pairs "
                 f"(formats: {self.formats or '-'})"]
        if self.ignored_files:
            shown = ", ".join(self.ignored_files[:5]) + (" ..." if len(self.ignored_files) > 5 else "")
            lines.append(f"ignored {len(self.ignored_files)} files of unknown type (set "
                         f"data.file_format to read them): {shown}")
        lines.append(f"truncated: {self.prompt_truncated} prompts, {self.chosen_truncated} chosen, "
                     f"{self.rejected_truncated} rejected responses")
        lines.append(f"sequence length: mean {self.mean_sequence_length:.1f}, "
                     f"max {self.max_sequence_length}")
        if self.skipped:
            lines.append(f"skipped {sum(self.skipped.values())} rows: "
                         + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())))
            for ex in self.skipped_examples[:5]:
                lines.append(f"  {ex['source_file']}, row {ex['source_row']}: {ex['reason']}: "
                             f"{ex['detail']}")
        return "\n".join(lines)


def _mark_duplicates(stats):
    """A pair_id seen before (in source order) is a ``duplicate_pair``: the reference cache holds
    one row per pair_id, and a silently doubled pair would weigh twice in training.
    Returns ``stats`` in source order with those rows marked."""
    stats = stats.sort_values(["source_file", "source_row"], ignore_index=True)
    kept = stats["skip_reason"].isna()
    first_row = stats[kept].drop_duplicates("pair_id").set_index("pair_id")
    dup = kept & stats["pair_id"].duplicated(keep="first") & stats["pair_id"].notna()
    for i in stats.index[dup]:
        origin = first_row.loc[stats.at[i, "pair_id"]]
        stats.loc[i, ["skip_reason", "skip_detail"]] = [
            DUPLICATE_PAIR, f"same pair as {origin.source_file}, row {origin.source_row}"]
    return stats


def _report(stats) -> DataReport:
    """``stats``: pandas frame of the small columns of every tokenized row (kept and skipped)."""
    skipped = stats[stats["skip_reason"].notna()]
    kept = stats[stats["skip_reason"].isna()]
    lengths = kept[["chosen_length", "rejected_length"]].max(axis=1) if len(kept) else None
    return DataReport(
        rows_read=len(stats),
        pairs=len(kept),
        skipped=dict(Counter(skipped["skip_reason"])),
        skipped_examples=[
            {"source_file": r.source_file, "source_row": int(r.source_row),
             "reason": r.skip_reason, "detail": r.skip_detail}
            for r in skipped.sort_values(["source_file", "source_row"]).head(_EXAMPLES_KEPT)
            .itertuples()
        ],
        formats=dict(Counter(kept["format"])),
        prompt_truncated=int(kept["prompt_truncated"].sum()),
        chosen_truncated=int(kept["chosen_truncated"].sum()),
        rejected_truncated=int(kept["rejected_truncated"].sum()),
        max_sequence_length=int(lengths.max()) if lengths is not None else 0,
        mean_sequence_length=float(lengths.mean()) if lengths is not None else 0.0,
    )


def is_held_out(pair_id: str, fraction: float) -> bool:
    """A pair is held out iff the first 32 bits of its content hash fall below ``fraction``:
    the same pairs in every run, and never in both splits."""
    return int(pair_id[:8], 16) < fraction * 16**8


def split_train_eval(dataset: ray.data.Dataset, fraction: float) -> dict[str, ray.data.Dataset]:
    if fraction <= 0:
        return {"train": dataset}
    return {"train": dataset.filter(lambda row: not is_held_out(row["pair_id"], fraction)),
            "eval": dataset.filter(lambda row: is_held_out(row["pair_id"], fraction))}


def source_name(config: DataConfig, source=None) -> str:
    """How messages name the input: the configured source, or the in-memory object's kind."""
    if source is None:
        return str(config.source)
    return source if isinstance(source, str) else f"<{type(source).__name__}>"


def prepare_pairs(config: DataConfig, source=None) -> tuple[ray.data.Dataset, DataReport]:
    """Read, validate and tokenize every pair. Returns the kept pairs (materialized) and a report.

    The tokenized dataset is materialized once so that counting skips and handing the pairs on
    do not run the pipeline twice (Ray Data re-executes lazy pipelines on every consumption).
    With ``on_bad_row="raise"`` every row is still validated first, then ``BadRow`` is raised for
    the first bad row in source order (file, row, reason) with the count of all bad rows, so one
    run shows the whole extent of the problem and the message does not depend on scheduling.
    """
    keep_order()  # pairs (and the reference cache after them) in the source's row order
    records = read_records(config.source if source is None else source, config)
    tokenized = records.map_batches(
        tokenize_batch,
        fn_args=(config,),
        batch_format="pyarrow",
        batch_size=config.tokenize_batch_size,
        **task_pool_kwargs(config.tasks, "tokenizer"),
    )
    with stage("data", f"reading and tokenizing {source_name(config, source)}"), \
            progress("tokenizing", config.limit, "rows") as bar:  # the row count is known once read
        tokenized = counted(tokenized, bar).materialize()
    stats = tokenized.select_columns(
        ["pair_id", "source_file", "source_row", "format", "skip_reason", "skip_detail", "chosen_length",
         "rejected_length", "prompt_truncated", "chosen_truncated", "rejected_truncated"]
    ).to_pandas()
    where = source_name(config, source)
    if stats.empty:
        raise PreferenceDataError(NO_ROWS, "no rows to read (empty files, or only blank lines)", where)
    stats = _mark_duplicates(stats)
    report = _report(stats)
    read_from = config.source if source is None else source
    if isinstance(read_from, str) and hub_dataset_id(read_from) is None:
        report.ignored_files = list_source(read_from, config.file_format)[1]
    report.check_balance()
    counts = ", ".join(f"{k}={v}" for k, v in sorted(report.skipped.items()))
    if report.skipped and config.on_bad_row == "raise":
        first = report.skipped_examples[0]
        total = sum(report.skipped.values())
        more = f" [{total} bad rows in all: {counts}]" if total > 1 else ""
        raise PreferenceDataError(first["reason"], first["detail"] + more, first["source_file"],
                                  first["source_row"])
    if report.pairs == 0:
        first = report.skipped_examples[0]
        raise PreferenceDataError(NO_PAIRS_LEFT, f"every one of {report.rows_read} rows was "
                                  f"skipped ({counts}); first: {first['source_file']}, row "
                                  f"{first['source_row']}: {first['reason']}: {first['detail']}",
                                  where)
    pairs = tokenized
    if report.skipped:
        bad = stats[stats["skip_reason"].notna()]
        dropped = set(zip(bad["source_file"], bad["source_row"].astype(int)))
        pairs = tokenized.filter(
            lambda row: (row["source_file"], row["source_row"]) not in dropped).materialize()
    return pairs.select_columns(PAIR_COLUMNS), report


def write_pairs(pairs: ray.data.Dataset, report: DataReport, config: DataConfig,
                output_dir: str | os.PathLike) -> Path:
    """Write pairs as Parquet under ``output_dir/pairs`` atomically, plus report and config.

    Files go to a temporary sibling directory first and are renamed into place only when every
    block is written, so a crash never leaves a half-written ``pairs/`` that looks complete.
    """
    out = Path(output_dir).expanduser().absolute()
    staging = out / f".pairs.tmp-{uuid.uuid4().hex[:8]}"
    final = out / "pairs"
    try:
        out.mkdir(parents=True, exist_ok=True)
        pairs.write_parquet(str(staging))
        staging.mkdir(exist_ok=True)  # Ray writes no directory for an empty dataset
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        (out / "data_report.json").write_text(json.dumps(asdict(report), indent=2))
        save_config(config, out / "data_config.yaml")
    except OSError as err:  # disk full, read-only, a file where a folder should be
        cause = root_cause(err)
        raise OSError(getattr(cause, "errno", None),
                      f"cannot write pairs to {out}: {getattr(cause, 'strerror', None) or cause}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
