"""Preference data: sources -> validated pairs -> token ids (see docs/data.md for the columns)."""

from dpo_ray.data.formats import BAD_ROW_REASONS, BadRow, RawPair, extract_pair
from dpo_ray.data.pipeline import PAIR_COLUMNS, DataReport, prepare_pairs, write_pairs
from dpo_ray.data.tokenize import PAIR_SCHEMA, PairTokenizer, load_tokenizer

__all__ = [
    "BAD_ROW_REASONS", "BadRow", "RawPair", "extract_pair", "PAIR_COLUMNS", "DataReport",
    "prepare_pairs", "write_pairs", "PAIR_SCHEMA", "PairTokenizer", "load_tokenizer",
]
