"""The reference stage: find the cached reference log-probs for (data, reference model), or
compute them once on the actor pool and commit them to the cache.

Training calls ``ensure_reference`` when it starts; ``dpo-ray reference`` runs it alone so a
cluster can precompute on cheaper nodes before any training worker starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray

from dpo_ray.data import DataReport, prepare_pairs
from dpo_ray.reference.cache import CacheCorrupt, ReferenceCache, cache_key
from dpo_ray.reference.scorer import ReferenceScorer, score_pairs

log = logging.getLogger("dpo_ray.reference")


@dataclass
class ReferenceResult:
    dataset: ray.data.Dataset  # pair columns + ref_* columns (docs/data.md)
    key: str
    path: str
    rows: int
    cache_hit: bool
    data_report: DataReport | None = None  # only when the data stage ran
    recomputed_because: str | None = None  # why an existing entry was not used

    def summary(self) -> str:
        how = "reused" if self.cache_hit else "computed"
        extra = f" (previous entry unusable: {self.recomputed_because})" if self.recomputed_because else ""
        return f"reference cache {how}: {self.path} ({self.rows} rows, key {self.key}){extra}"


def ensure_reference(data_config, ref_config, source=None, scorer_cls=ReferenceScorer) -> ReferenceResult:
    """Cached reference values for every pair of ``data_config``'s source (or ``source``)."""
    key, inputs = cache_key(data_config, ref_config, source)
    cache = ReferenceCache(ref_config.cache_dir)
    reason = None
    try:
        found = cache.load(key)
    except CacheCorrupt as err:
        reason = str(err)
        moved = cache.quarantine(key)
        log.warning("%s; moved it to %s and recomputing", err, moved)
        print(f"warning: {err}; moved aside to {moved}, recomputing", flush=True)
        found = None
    if found is not None:
        dataset, manifest = found
        result = ReferenceResult(dataset, key, cache.entry(key), manifest["rows"], cache_hit=True)
        print(result.summary(), flush=True)
        return result

    pairs, report = prepare_pairs(data_config, source)
    print(report.summary(), flush=True)
    scored = score_pairs(pairs, ref_config, scorer_cls).materialize()
    manifest = cache.commit(key, scored, inputs, expected_rows=report.pairs)
    dataset, _ = cache.load(key)  # hand on what was committed, verified, not the in-memory copy
    result = ReferenceResult(dataset, key, cache.entry(key), manifest["rows"], cache_hit=False,
                             data_report=report, recomputed_because=reason)
    print(result.summary(), flush=True)
    return result
