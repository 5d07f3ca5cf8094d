"""Turn one source row into a preference pair (prompt, chosen, rejected), or say why it is bad.

Three formats, detected per row unless ``DataConfig.format`` forces one:

- ``explicit``: ``prompt``, ``chosen`` and ``rejected`` are strings.
- ``implicit``: only ``chosen`` and ``rejected``, each a whole HH-RLHF dialogue
  (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``). The prompt is everything up to and including the
  last ``"\\n\\nAssistant:"``; both dialogues must share it exactly.
- ``conversational``: message lists ``[{"role", "content"}, ...]``; either a ``prompt`` list plus
  ``chosen``/``rejected`` response lists, or ``chosen``/``rejected`` whole conversations that
  share every message but the final assistant one.

Everything here is pure Python on dicts, so each rule has a unit test without Ray.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

# Reasons a row is rejected. Stable strings: they are counted in the skip report.
MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_RESPONSE = "empty_response"
IDENTICAL_RESPONSES = "identical_responses"
PROMPT_MISMATCH = "prompt_mismatch"
NO_ASSISTANT_TURN = "no_assistant_turn"
NO_ROOM_FOR_RESPONSE = "no_room_for_response"
TEMPLATE_NOT_PREFIX = "template_not_prefix"
DUPLICATE_PAIR = "duplicate_pair"  # same pair_id as an earlier row (found by the driver)
BAD_ROW_REASONS = (
    MALFORMED_JSON, MISSING_FIELD, WRONG_TYPE, EMPTY_RESPONSE, IDENTICAL_RESPONSES,
    PROMPT_MISMATCH, NO_ASSISTANT_TURN, NO_ROOM_FOR_RESPONSE, TEMPLATE_NOT_PREFIX, DUPLICATE_PAIR,
)


class BadRow(ValueError):
    """A row that cannot become a training pair. ``reason`` is one of ``BAD_ROW_REASONS``."""

    def __init__(self, reason: str, detail: str, source_file: str = "?", source_row: int = 0):
        self.reason, self.detail = reason, detail
        self.source_file, self.source_row = source_file, source_row
        super().__init__(f"{source_file}, row {source_row}: {reason}: {detail}")

    def __reduce__(self):  # keep the fields when Ray pickles the error back to the driver
        return (BadRow, (self.reason, self.detail, self.source_file, self.source_row))


Messages = list[dict[str, str]]


@dataclass(frozen=True)
class RawPair:
    """One pair before tokenization. Text formats hold strings; conversational holds messages."""

    format: str
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages

    @property
    def pair_id(self) -> str:
        """Content hash of the pair: the same pair gets the same id from JSONL, Parquet or a hub."""
        blob = json.dumps([self.prompt, self.chosen, self.rejected], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _normalised(text: str) -> str:
    return " ".join(text.split())


def _require(row: dict, column: str) -> Any:
    if column not in row or row[column] is None:
        raise BadRow(MISSING_FIELD, f"field {column!r} is missing")
    return row[column]


def _check_messages(value: Any, column: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise BadRow(WRONG_TYPE, f"field {column!r} must be a non-empty list of messages")
    for i, msg in enumerate(value):
        if not (isinstance(msg, dict) and isinstance(msg.get("role"), str)
                and isinstance(msg.get("content"), str)):
            raise BadRow(WRONG_TYPE, f"field {column!r} message {i} needs string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check_responses_differ(chosen: str, rejected: str) -> None:
    if not chosen.strip():
        raise BadRow(EMPTY_RESPONSE, "chosen response is empty")
    if not rejected.strip():
        raise BadRow(EMPTY_RESPONSE, "rejected response is empty")
    if _normalised(chosen) == _normalised(rejected):
        raise BadRow(IDENTICAL_RESPONSES, "chosen and rejected responses are identical "
                     "(ignoring whitespace)")


def detect_format(row: dict, prompt_col: str, chosen_col: str) -> str:
    chosen = row.get(chosen_col)
    if isinstance(row.get(prompt_col), list) or isinstance(chosen, list):
        return "conversational"
    if prompt_col in row:
        return "explicit"
    return "implicit"


def _explicit(row: dict, cfg) -> RawPair:
    prompt, chosen, rejected = (_require(row, c) for c in (cfg.prompt_column, cfg.chosen_column,
                                                           cfg.rejected_column))
    for column, value in ((cfg.prompt_column, prompt), (cfg.chosen_column, chosen),
                          (cfg.rejected_column, rejected)):
        if not isinstance(value, str):
            raise BadRow(WRONG_TYPE, f"field {column!r} must be a string, got {type(value).__name__}")
    _check_responses_differ(chosen, rejected)
    return RawPair("explicit", prompt, chosen, rejected)


def _implicit(row: dict, cfg) -> RawPair:
    chosen, rejected = _require(row, cfg.chosen_column), _require(row, cfg.rejected_column)
    for column, value in ((cfg.chosen_column, chosen), (cfg.rejected_column, rejected)):
        if not isinstance(value, str):
            raise BadRow(WRONG_TYPE, f"field {column!r} must be a string, got {type(value).__name__}")
    marker = cfg.assistant_marker
    cut_c, cut_r = chosen.rfind(marker), rejected.rfind(marker)
    if cut_c < 0 or cut_r < 0:
        raise BadRow(NO_ASSISTANT_TURN, f"no {marker!r} turn in the "
                     f"{'chosen' if cut_c < 0 else 'rejected'} dialogue")
    prompt = chosen[: cut_c + len(marker)]
    if rejected[: cut_r + len(marker)] != prompt:
        raise BadRow(PROMPT_MISMATCH, "chosen and rejected dialogues differ before the last "
                     "assistant turn")
    response_c, response_r = chosen[len(prompt):], rejected[len(prompt):]
    _check_responses_differ(response_c, response_r)
    return RawPair("implicit", prompt, response_c, response_r)


def _conversational(row: dict, cfg) -> RawPair:
    chosen = _check_messages(_require(row, cfg.chosen_column), cfg.chosen_column)
    rejected = _check_messages(_require(row, cfg.rejected_column), cfg.rejected_column)
    prompt_value = row.get(cfg.prompt_column)
    if prompt_value is None:  # whole conversations: split off the final assistant message
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise BadRow(NO_ASSISTANT_TURN, "conversations must end with an assistant message")
        if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
            raise BadRow(PROMPT_MISMATCH, "chosen and rejected conversations differ before the "
                         "last assistant turn" if len(chosen) >= 2 else "no prompt messages")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    elif isinstance(prompt_value, str):
        prompt = [{"role": "user", "content": prompt_value}]
    else:
        prompt = _check_messages(prompt_value, cfg.prompt_column)
    _check_responses_differ("".join(m["content"] for m in chosen),
                            "".join(m["content"] for m in rejected))
    return RawPair("conversational", prompt, chosen, rejected)


_EXTRACT = {"explicit": _explicit, "implicit": _implicit, "conversational": _conversational}


def extract_pair(record: str | None, read_error: str | None, cfg) -> RawPair:
    """Parse and validate one record (JSON text from ``sources``). Raises ``BadRow``."""
    if record is None:
        raise BadRow(MALFORMED_JSON, read_error or "unreadable row")
    row = json.loads(record)
    fmt = cfg.format if cfg.format != "auto" else detect_format(row, cfg.prompt_column,
                                                                 cfg.chosen_column)
    return _EXTRACT[fmt](row, cfg)
