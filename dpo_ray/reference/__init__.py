"""Reference log-probs: scored once on an actor pool, cached by content, reused by every run."""

from dpo_ray.reference.cache import CacheCorrupt, ReferenceCache, cache_key
from dpo_ray.reference.scorer import (
    REFERENCE_COLUMNS, ReferenceScorer, forward_counts, score_pairs,
)
from dpo_ray.reference.stage import ReferenceResult, ensure_reference

__all__ = [
    "CacheCorrupt", "ReferenceCache", "cache_key", "REFERENCE_COLUMNS", "ReferenceScorer",
    "forward_counts", "score_pairs", "ReferenceResult", "ensure_reference",
]
