"""What can be wrong with preference data: one error type and its reason codes.

Every bad row, in every stage, is a ``PreferenceDataError`` with one ``reason`` from
``BAD_ROW_REASONS`` and the file and row it came from: raised (``data.on_bad_row=raise``) or
counted in the data report (``skip``).
"""

from __future__ import annotations

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


def read_error_reason(read_error: str | None) -> tuple[str, str]:
    """``sources`` writes read errors as ``"<reason>: <detail>"`` -> (reason, detail)."""
    reason, sep, detail = (read_error or "").partition(": ")
    if sep and reason in BAD_ROW_REASONS:
        return reason, detail
    return MALFORMED_JSON, read_error or "unreadable row"
