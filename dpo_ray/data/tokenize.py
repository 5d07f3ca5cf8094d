"""One source record -> a validated pair (prompt, chosen, rejected) -> token ids, inside Ray Data
``map_batches`` tasks (one tokenizer per worker process, kept between tasks).

**Formats.** Three, detected per row unless ``DataConfig.format`` forces one:

- ``explicit``: ``prompt``, ``chosen`` and ``rejected`` are strings.
- ``implicit``: only ``chosen`` and ``rejected``, each a whole HH-RLHF dialogue
  (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``). The prompt is everything up to and including the
  last ``"\\n\\nAssistant:"``; both dialogues must share it exactly.
- ``conversational``: message lists ``[{"role", "content"}, ...]``; either a ``prompt`` list plus
  ``chosen``/``rejected`` response lists, or ``chosen``/``rejected`` whole conversations that
  share every message but the final assistant one.

Extraction (``extract_pair``) is pure Python on dicts, so each rule has a unit test without Ray.

**Tokenization rules** (each has a test in ``tests/test_tokenize.py``):

1. The prompt is tokenized on its own and each response on its own; the full sequence is
   ``prompt_ids + response_ids``. So the prompt's tokens are a true prefix of both sequences, and
   ``prompt_length`` is exactly where each response starts.
2. Text formats (explicit, implicit): the prompt is tokenized with the tokenizer's special tokens
   (it adds BOS if the model wants one), responses without. Conversational: the chat template is
   rendered as text and tokenized *without* special tokens, because the template writes BOS itself
   when the model wants one. Either way a doubled leading BOS is collapsed to one.
3. EOS is appended once to each response: not again when the response already ends with it (a chat
   template that closes the turn with the EOS token, e.g. SmolLM2's ``<|im_end|>``).
4. Truncation: first the prompt is cut from the *left* to ``max_prompt_length`` (keeping its end,
   the turn being answered, and a leading BOS; where BOS also opens every chat turn, the cut
   falls on the earliest turn boundary that fits); then each response is cut from the *right* so that
   prompt + response <= ``max_length``. A cut response loses its EOS: it did not end there.
   A prompt that leaves no room for one response token is a bad row (``no_room_for_response``).
   Every cut is counted (``*_truncated`` columns) and reported.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from dpo_ray.data.errors import (
    BAD_ROLES, CHAT_TEMPLATE_ERROR, EMPTY_PROMPT, EMPTY_RESPONSE, IDENTICAL_RESPONSES, MISSING_FIELD,
    NO_ASSISTANT_TURN, NO_CHAT_TEMPLATE, NO_ROOM_FOR_RESPONSE, PROMPT_MISMATCH, TEMPLATE_NOT_PREFIX,
    WRONG_TYPE, BadRow, read_error_reason,
)

ROLES = ("system", "user", "assistant", "tool", "developer")

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


def extract_pair(record: str | None, read_error: str | None, cfg) -> RawPair:
    """Parse and validate one record (JSON text from ``sources``). Raises ``BadRow``."""
    if record is None:
        raise BadRow(*read_error_reason(read_error))
    row = json.loads(record)
    fmt = cfg.format if cfg.format != "auto" else detect_format(row, cfg.prompt_column,
                                                                 cfg.chosen_column)
    return _EXTRACT[fmt](row, cfg)


# The tokenized-pairs contract (docs/data.md). Later stages add columns, never change these.
PAIR_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("format", pa.string()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("prompt_input_ids", pa.list_(pa.int32())),
        ("chosen_input_ids", pa.list_(pa.int32())),
        ("rejected_input_ids", pa.list_(pa.int32())),
        ("prompt_length", pa.int32()),
        ("chosen_length", pa.int32()),
        ("rejected_length", pa.int32()),
        ("prompt_truncated", pa.bool_()),
        ("chosen_truncated", pa.bool_()),
        ("rejected_truncated", pa.bool_()),
        # Only in the stage's internal output with on_bad_row=skip; dropped before hand-off.
        ("skip_reason", pa.string()),
        ("skip_detail", pa.string()),
    ]
)


def render_conversation(tokenizer, prompt: list[dict], response: list[dict]) -> tuple[str, str]:
    """Render a chat as (prompt_text, response_text) with ``prompt_text + response_text`` equal
    to the template applied to the whole conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise BadRow(NO_CHAT_TEMPLATE, f"conversational row, but tokenizer "
                     f"{tokenizer.name_or_path!r} has no chat template to render it with")
    try:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    except Exception as err:  # the template is user code (Jinja): it may refuse any message shape
        raise BadRow(CHAT_TEMPLATE_ERROR, f"the chat template refused these messages: "
                     f"{type(err).__name__}: {err}") from None
    if not full_text.startswith(prompt_text):
        raise BadRow(TEMPLATE_NOT_PREFIX, "the chat template renders the prompt differently when a "
                     "response follows, so the prompt would not be a prefix")
    # Trailing whitespace after the closing turn token (e.g. "<|im_end|>\n") is template layout,
    # not part of the answer; stripping it lets rule 3 see the EOS the template wrote.
    return prompt_text, full_text[len(prompt_text):].rstrip()


def truncate_pair(prompt_ids: list[int], response_ids: list[int], max_length: int,
                  max_prompt_length: int | None, bos_id: int | None
                  ) -> tuple[list[int], list[int], bool, bool]:
    """Apply rule 4 to one (prompt, response). Returns (prompt, response, prompt_cut, response_cut).

    Shapes: lists of token ids; ``len(prompt) + len(response) <= max_length`` on return.
    """
    prompt_cut = max_prompt_length is not None and len(prompt_ids) > max_prompt_length
    if prompt_cut:
        # Where the BOS token also opens every chat turn (ChatML with <|im_start|> as BOS, as in
        # SmolLM2), a BOS kept in front of a left cut would head a turn whose role was cut off:
        # cut at the earliest turn that fits instead, or plainly when not even the last one does.
        turns = [i for i, token in enumerate(prompt_ids) if token == bos_id and i > 0]
        if turns:
            fits = [i for i in turns if len(prompt_ids) - i <= max_prompt_length]
            prompt_ids = prompt_ids[fits[0]:] if fits else prompt_ids[-max_prompt_length:]
        else:
            keep_bos = bos_id is not None and prompt_ids[0] == bos_id
            tail = prompt_ids[len(prompt_ids) - (max_prompt_length - int(keep_bos)):]
            prompt_ids = ([bos_id] if keep_bos else []) + tail
    room = max_length - len(prompt_ids)
    if room < 1:
        raise BadRow(NO_ROOM_FOR_RESPONSE, f"prompt has {len(prompt_ids)} tokens and max_length "
                     f"is {max_length}: no room for a response")
    response_cut = len(response_ids) > room
    return prompt_ids, response_ids[:room], prompt_cut, response_cut


def _collapse_double_bos(ids: list[int], bos_id: int | None) -> list[int]:
    if bos_id is not None and len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id:
        return ids[1:]
    return ids


def _with_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids if ids and ids[-1] == eos_id else ids + [eos_id]


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} has no EOS token; DPO needs one to end responses")
    return tokenizer


class PairTokenizer:
    """``RECORD_SCHEMA`` batch -> ``PAIR_SCHEMA`` batch, with the tokenizer loaded once in
    ``__init__`` (the data stage's tasks call it through ``tokenize_batch``).

    A bad row never raises here: it is emitted with ``skip_reason``/``skip_detail`` set, and the
    driver decides (raise on the first bad row in source order, or count and drop). Raising inside
    a Ray task would lose the row's details: Ray re-raises a ``UserCodeException`` on the driver
    without the original exception.
    """

    def __init__(self, config):
        self.cfg = config
        self.tok = load_tokenizer(config.tokenizer, config.trust_remote_code)
        self.bos_id, self.eos_id = self.tok.bos_token_id, self.tok.eos_token_id

    def _texts(self, pair: RawPair) -> tuple[str, str, str, bool]:
        """-> (prompt_text, chosen_text, rejected_text, prompt_has_special_tokens)."""
        if pair.format != "conversational":
            return pair.prompt, pair.chosen, pair.rejected, True
        prompt_text, chosen_text = render_conversation(self.tok, pair.prompt, pair.chosen)
        _, rejected_text = render_conversation(self.tok, pair.prompt, pair.rejected)
        return prompt_text, chosen_text, rejected_text, False

    def _tokenize_one(self, pair: RawPair) -> dict:
        prompt_text, chosen_text, rejected_text, special = self._texts(pair)
        prompt_ids = self.tok(prompt_text, add_special_tokens=special)["input_ids"]
        prompt_ids = _collapse_double_bos(prompt_ids, self.bos_id)
        out = {"pair_id": pair.pair_id, "format": pair.format, "prompt": prompt_text,
               "chosen": chosen_text, "rejected": rejected_text}
        for side, text in (("chosen", chosen_text), ("rejected", rejected_text)):
            response = _with_eos(self.tok(text, add_special_tokens=False)["input_ids"], self.eos_id)
            kept_prompt, response, prompt_cut, response_cut = truncate_pair(
                prompt_ids, response, self.cfg.max_length, self.cfg.prompt_limit, self.bos_id)
            out[f"{side}_input_ids"] = kept_prompt + response
            out[f"{side}_length"] = len(kept_prompt) + len(response)
            out[f"{side}_truncated"] = response_cut
        out.update(prompt_input_ids=kept_prompt, prompt_length=len(kept_prompt),
                   prompt_truncated=prompt_cut)
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for src in batch.to_pylist():
            where = (src["source_file"], src["source_row"])
            try:
                row = self._tokenize_one(extract_pair(src["record"], src["read_error"], self.cfg))
                row.update(skip_reason=None, skip_detail=None)
            except BadRow as bad:
                row = {"skip_reason": bad.reason, "skip_detail": bad.detail}
            row.update(source_file=where[0], source_row=where[1])
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)


# Per worker process: Ray reuses a worker process for many tasks, so the tokenizer is loaded by
# the first task that needs it there and reused by the next (the data stage of a small run took
# ~4 s on an actor pool, mostly starting the actor's process; ~0.2 s on warm tasks).
_TOKENIZERS: dict[tuple, PairTokenizer] = {}
_TOKENIZERS_KEPT = 4


def tokenize_batch(batch: pa.Table, config) -> pa.Table:
    """Ray Data task: ``PairTokenizer(config)(batch)``, the tokenizer cached in this process.

    The cache key is the whole config plus the tokenizer folder's file names, sizes and mtimes, so
    a tokenizer rewritten at the same path is loaded again."""
    key = (repr(config), _folder_stamp(str(config.tokenizer)))
    tokenizer = _TOKENIZERS.get(key)
    if tokenizer is None:
        while len(_TOKENIZERS) >= _TOKENIZERS_KEPT:
            _TOKENIZERS.pop(next(iter(_TOKENIZERS)))  # the oldest
        tokenizer = _TOKENIZERS[key] = PairTokenizer(config)
    return tokenizer(batch)


def _folder_stamp(name_or_path: str) -> tuple:
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return ()  # a hub id: its files live in the hub cache, keyed by revision
    stats = ((f.name, f.stat()) for f in folder.iterdir() if f.is_file())
    return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats))
