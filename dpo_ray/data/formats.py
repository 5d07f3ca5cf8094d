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

# Reasons a row is rejected. Stable strings: they are counted in the skip report, and each has an
# example line in docs/data.md.
MALFORMED_JSON = "malformed_json"
MALFORMED_CSV = "malformed_csv"  # unterminated quote, a row with more or fewer fields than the header
ENCODING_ERROR = "encoding_error"  # bytes that are not UTF-8, or a lone surrogate such as "\\ud800"
CORRUPT_FILE = "corrupt_file"  # a truncated or damaged gzip/Parquet file: the rest of it is unreadable
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_RESPONSE = "empty_response"
IDENTICAL_RESPONSES = "identical_responses"
PROMPT_MISMATCH = "prompt_mismatch"
NO_ASSISTANT_TURN = "no_assistant_turn"
NO_ROOM_FOR_RESPONSE = "no_room_for_response"
TEMPLATE_NOT_PREFIX = "template_not_prefix"
BAD_ROLES = "bad_roles"  # a message role the conversation cannot have there (a user-role response)
EMPTY_PROMPT = "empty_prompt"
NO_CHAT_TEMPLATE = "no_chat_template"  # conversational rows with a tokenizer that has no template
CHAT_TEMPLATE_ERROR = "chat_template_error"  # the template itself refused the messages
DUPLICATE_PAIR = "duplicate_pair"  # same pair_id as an earlier row (found by the driver)
BAD_ROW_REASONS = (
    MALFORMED_JSON, MALFORMED_CSV, ENCODING_ERROR, CORRUPT_FILE, MISSING_FIELD, WRONG_TYPE,
    EMPTY_RESPONSE, EMPTY_PROMPT, IDENTICAL_RESPONSES, PROMPT_MISMATCH, NO_ASSISTANT_TURN,
    BAD_ROLES, NO_ROOM_FOR_RESPONSE, TEMPLATE_NOT_PREFIX, NO_CHAT_TEMPLATE, CHAT_TEMPLATE_ERROR,
    DUPLICATE_PAIR,
)
# Not row reasons: the whole input is unusable. Always raised, never skipped.
NO_ROWS = "no_rows"  # an empty source (or only blank lines)
NO_PAIRS_LEFT = "no_pairs_left"  # skip mode dropped every row
UNREADABLE_SOURCE = "unreadable_source"  # a file that cannot be opened, an unknown file type
ROLES = ("system", "user", "assistant", "tool", "developer")


class PreferenceDataError(ValueError):
    """Bad preference data: ``reason`` (a ``BAD_ROW_REASONS`` code, or a whole-input code such as
    ``no_rows``), a human ``detail``, and where: ``source_file`` and 1-based ``source_row``
    (0 = the file as a whole). The CLI prints it as one line and exits 2."""

    def __init__(self, reason: str, detail: str, source_file: str = "?", source_row: int = 0):
        self.reason, self.detail = reason, detail
        self.source_file, self.source_row = source_file, source_row
        where = f"{source_file}, row {source_row}" if source_row else source_file
        super().__init__(f"{where}: {reason}: {detail}")

    def __reduce__(self):  # keep the fields when Ray pickles the error back to the driver
        return (type(self), (self.reason, self.detail, self.source_file, self.source_row))


BadRow = PreferenceDataError  # the name the row validators use


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


def _content_text(content: Any, column: str, i: int) -> str:
    """A message's content: a string, or OpenAI-style text parts ``[{"type": "text", "text": ...}]``
    joined (the form many chat datasets use). Anything else (images, numbers) is refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content):
        return "".join(p["text"] for p in content)
    what = "missing" if content is None else type(content).__name__
    raise BadRow(WRONG_TYPE, f"field {column!r} message {i}: 'content' must be a string or a list "
                 f"of text parts, got {what}")


def _check_messages(value: Any, column: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise BadRow(WRONG_TYPE, f"field {column!r} must be a non-empty list of messages")
    messages = []
    for i, msg in enumerate(value):
        if not (isinstance(msg, dict) and isinstance(msg.get("role"), str)):
            raise BadRow(WRONG_TYPE, f"field {column!r} message {i} needs a string 'role' and "
                         "'content'")
        if msg["role"] not in ROLES:
            raise BadRow(BAD_ROLES, f"field {column!r} message {i} has role {msg['role']!r}; "
                         f"roles are {', '.join(ROLES)}")
        messages.append({"role": msg["role"], "content": _content_text(msg.get("content"), column, i)})
    return messages


def _check_prompt_messages(prompt: Messages, column: str) -> None:
    """The prompt must give the assistant something to answer: it ends on a user (or tool) turn."""
    if prompt[-1]["role"] not in ("user", "tool"):
        raise BadRow(BAD_ROLES, f"{column!r} ends with a {prompt[-1]['role']!r} message; the "
                     "prompt must end with the user turn being answered")


def _check_response_messages(response: Messages, column: str) -> None:
    roles = {m["role"] for m in response}
    if roles != {"assistant"}:
        raise BadRow(BAD_ROLES, f"field {column!r}: a response must be assistant messages only, "
                     f"got roles {sorted(roles)}")


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
    if not prompt.strip():
        raise BadRow(EMPTY_PROMPT, f"field {cfg.prompt_column!r} is empty: the first response "
                     "token would have no context")
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
        if len(chosen) < 2 or len(rejected) < 2:
            raise BadRow(EMPTY_PROMPT, "a whole conversation needs at least one message before "
                         "the final assistant message")
        if chosen[:-1] != rejected[:-1]:
            raise BadRow(PROMPT_MISMATCH, "chosen and rejected conversations differ before the "
                         "last assistant turn")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    elif isinstance(prompt_value, str):
        if not prompt_value.strip():
            raise BadRow(EMPTY_PROMPT, f"field {cfg.prompt_column!r} is empty")
        prompt = [{"role": "user", "content": prompt_value}]
    elif isinstance(prompt_value, list) and not prompt_value:
        raise BadRow(EMPTY_PROMPT, f"field {cfg.prompt_column!r} is an empty message list")
    else:
        prompt = _check_messages(prompt_value, cfg.prompt_column)
    _check_prompt_messages(prompt, cfg.prompt_column)
    _check_response_messages(chosen, cfg.chosen_column)
    _check_response_messages(rejected, cfg.rejected_column)
    _check_responses_differ("".join(m["content"] for m in chosen),
                            "".join(m["content"] for m in rejected))
    return RawPair("conversational", prompt, chosen, rejected)


_EXTRACT = {"explicit": _explicit, "implicit": _implicit, "conversational": _conversational}


def read_error_reason(read_error: str | None) -> tuple[str, str]:
    """``sources`` writes read errors as ``"<reason>: <detail>"`` -> (reason, detail)."""
    reason, sep, detail = (read_error or "").partition(": ")
    if sep and reason in BAD_ROW_REASONS:
        return reason, detail
    return MALFORMED_JSON, read_error or "unreadable row"


def extract_pair(record: str | None, read_error: str | None, cfg) -> RawPair:
    """Parse and validate one record (JSON text from ``sources``). Raises ``BadRow``."""
    if record is None:
        raise BadRow(*read_error_reason(read_error))
    row = json.loads(record)
    fmt = cfg.format if cfg.format != "auto" else detect_format(row, cfg.prompt_column,
                                                                 cfg.chosen_column)
    return _EXTRACT[fmt](row, cfg)
