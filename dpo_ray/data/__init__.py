"""Preference data: sources -> validated pairs -> token ids (see docs/data.md for the columns)."""

from dpo_ray.data.errors import BAD_ROW_REASONS, BadRow, PreferenceDataError
from dpo_ray.data.pipeline import (
    PAIR_COLUMNS, DataReport, is_held_out, prepare_pairs, split_train_eval, write_pairs)
from dpo_ray.data.tokenize import PAIR_SCHEMA, PairTokenizer, RawPair, extract_pair, load_tokenizer

__all__ = [
    "BAD_ROW_REASONS", "BadRow", "PreferenceDataError", "RawPair", "extract_pair", "PAIR_COLUMNS", "DataReport",
    "is_held_out", "prepare_pairs", "split_train_eval", "write_pairs", "PAIR_SCHEMA", "PairTokenizer", "load_tokenizer",
]
