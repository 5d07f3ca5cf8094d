"""Evaluation prompts from a file: prompt-only rows or preference rows (whose ``chosen`` can be the
baseline, as in the DPO paper's HH protocol). Read through the data stage's reader, so the same
formats work and a bad row is named by file and row.

Columns: ``prompt_id`` (sha256 of the prompt, 16 hex), ``prompt_json`` (the prompt as JSON: text
or chat messages), ``prompt_text`` (what judges read), ``chosen`` (or null), ``source_file``,
``source_row``.
"""

from __future__ import annotations

import hashlib
import json

import pandas as pd

from dpo_ray.config import DataConfig
from dpo_ray.data.errors import BadRow, read_error_reason
from dpo_ray.data.tokenize import extract_pair
from dpo_ray.data.sources import read_records


def _text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt.strip()
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _response_text(response) -> str:
    return response if isinstance(response, str) else "\n".join(m["content"] for m in response)


def prompt_id(prompt) -> str:
    return hashlib.sha256(json.dumps(prompt, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


def load_prompts(source: str, held_out_fraction: float | None = None, limit: int | None = None,
                 on_bad_row: str = "raise", data: DataConfig | None = None) -> tuple[pd.DataFrame, dict]:
    """Distinct prompts in file order, and counts (rows, pairs kept as held out, duplicates).

    ``held_out_fraction`` keeps only preference rows whose pair is held out from training by the
    rule training uses (``train.eval_fraction``), so no evaluated prompt's pair was trained on.
    """
    data = data or DataConfig(source=source, tokenizer="-")
    records = read_records(source, data).to_pandas().sort_values(["source_file", "source_row"])
    rows, counts = [], {"rows": len(records), "not_held_out": 0, "duplicate_prompts": 0, "skipped": {}}
    for rec in records.itertuples():
        try:
            rows += _prompt_row(rec, data, held_out_fraction, counts)
        except BadRow as bad:
            if on_bad_row == "raise":
                raise
            counts["skipped"][bad.reason] = counts["skipped"].get(bad.reason, 0) + 1
    frame = pd.DataFrame(rows, columns=["prompt_id", "prompt_json", "prompt_text", "chosen",
                                        "source_file", "source_row"])
    distinct = frame.drop_duplicates("prompt_id")
    counts["duplicate_prompts"] = len(frame) - len(distinct)
    if limit is not None:
        distinct = distinct.head(limit)
    if distinct.empty:
        raise ValueError(f"{source}: no prompts to evaluate ({counts})")
    counts["prompts"] = len(distinct)
    return distinct.reset_index(drop=True), counts


def _prompt_row(rec, data: DataConfig, held_out_fraction: float | None, counts: dict) -> list[dict]:
    """The prompt of one record (none when its pair is not held out). Raises ``BadRow``."""
    from dpo_ray.data.pipeline import is_held_out

    if pd.notna(rec.read_error):
        raise BadRow(*read_error_reason(rec.read_error), rec.source_file, rec.source_row)
    row = json.loads(rec.record)
    if data.chosen_column in row and data.rejected_column in row:
        try:
            pair = extract_pair(rec.record, None, data)
        except BadRow as bad:
            raise BadRow(bad.reason, bad.detail, rec.source_file, rec.source_row) from None
        if held_out_fraction is not None and not is_held_out(pair.pair_id, held_out_fraction):
            counts["not_held_out"] += 1
            return []
        prompt, chosen = pair.prompt, _response_text(pair.chosen)
    elif isinstance(row.get(data.prompt_column), (str, list)) and row[data.prompt_column]:
        prompt, chosen = row[data.prompt_column], None
    else:
        raise BadRow("missing_field", f"no text or messages in {data.prompt_column!r} and no "
                     f"{data.chosen_column!r}/{data.rejected_column!r} pair",
                     rec.source_file, rec.source_row)
    return [{"prompt_id": prompt_id(prompt), "prompt_json": json.dumps(prompt),
             "prompt_text": _text(prompt), "chosen": chosen,
             "source_file": rec.source_file, "source_row": int(rec.source_row)}]
