"""Tokenize validated pairs inside Ray Data ``map_batches`` (one tokenizer per actor).

Rules (each has a test in ``tests/test_tokenize.py``):

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
   the turn being answered, and a leading BOS); then each response is cut from the *right* so that
   prompt + response <= ``max_length``. A cut response loses its EOS: it did not end there.
   A prompt that leaves no room for one response token is a bad row (``no_room_for_response``).
   Every cut is counted (``*_truncated`` columns) and reported.
"""

from __future__ import annotations

import pyarrow as pa

from dpo_ray.data.formats import (
    CHAT_TEMPLATE_ERROR, NO_CHAT_TEMPLATE, NO_ROOM_FOR_RESPONSE, TEMPLATE_NOT_PREFIX, BadRow, RawPair,
    extract_pair,
)

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
    """Ray Data callable class: ``RECORD_SCHEMA`` batch -> ``PAIR_SCHEMA`` batch.

    One tokenizer per actor (loaded in ``__init__``). A bad row never raises here: it is emitted
    with ``skip_reason``/``skip_detail`` set, and the driver decides (raise on the first bad row in
    source order, or count and drop). Raising inside the actor would lose the row's details: Ray
    re-raises a ``UserCodeException`` on the driver without the original exception.
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
                prompt_ids, response, self.cfg.max_length, self.cfg.max_prompt_length, self.bos_id)
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
