"""The reference stage: find the cached reference log-probs for (data, reference model), or
compute them once on the actor pool and commit them to the cache.

Training calls ``ensure_reference`` when it starts; ``dpo-ray reference`` runs it alone so a
cluster can precompute on cheaper nodes before any training worker starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray

from dpo_ray.console import counted, progress, stage
from dpo_ray.data import DataReport, prepare_pairs
from dpo_ray.reference.cache import CacheCorrupt, ReferenceCache, cache_key, pair_ids_digest
from dpo_ray.reference.scorer import ReferenceScorer, score_pairs

log = logging.getLogger("dpo_ray.reference")


@dataclass
class ReferenceResult:
    dataset: ray.data.Dataset  # pair columns + ref_* columns (docs/data.md)
    key: str
    path: str
    rows: int
    cache_hit: bool
    data_report: DataReport | None = None  # what the data stage read, kept and skipped
    recomputed_because: str | None = None  # why an existing entry was not used

    def summary(self) -> str:
        how = "reused" if self.cache_hit else "computed"
        extra = f" (previous entry unusable: {self.recomputed_because})" if self.recomputed_because else ""
        return f"reference cache {how}: {self.path} ({self.rows} rows, key {self.key}){extra}"


def _covering_entry(cache: ReferenceCache, key: str, expected: list[str]):
    """The committed entry for ``key`` if it verifies and holds exactly the ``expected`` pair ids;
    else (None, why). A bad entry is set aside so that it cannot block every later run."""
    try:
        found = cache.load(key)
        if found is not None and pair_ids_digest(found[2]) != pair_ids_digest(expected):
            have = set(found[2])
            raise CacheCorrupt(f"reference cache {cache.entry(key)} holds {len(found[2])} rows, "
                               f"{len(have & set(expected))} of the {len(expected)} pairs of this "
                               "data")
        return found, None
    except CacheCorrupt as err:
        try:
            moved = cache.quarantine(key)
        except FileNotFoundError:  # another run set it aside first
            moved = "(set aside by another run)"
        log.warning("%s; moved its manifest to %s and recomputing", err, moved)
        print(f"warning: {err}; manifest moved aside to {moved}, recomputing", flush=True)
        return None, str(err)


def ensure_reference(data_config, ref_config, source=None, scorer_cls=ReferenceScorer) -> ReferenceResult:
    """Cached reference values for every pair of ``data_config``'s source (or ``source``).

    The data stage always runs (tokenizing is cheap next to a reference forward pass): its pair
    ids are what a cache entry must cover exactly to count as a hit, and its report shows the
    user what was read and skipped on every run.
    """
    key, inputs = cache_key(data_config, ref_config, source)
    cache = ReferenceCache(ref_config.cache_dir)
    pairs, report = prepare_pairs(data_config, source)
    print(report.summary(), flush=True)
    expected = pairs.select_columns(["pair_id"]).to_pandas()["pair_id"].tolist()
    found, reason = _covering_entry(cache, key, expected)
    if found is not None:
        dataset, manifest, _ = found
        result = ReferenceResult(dataset, key, cache.entry(key), manifest["rows"], cache_hit=True,
                                 data_report=report)
        print(result.summary(), flush=True)
        return result

    with stage("reference", f"scoring {report.pairs} pairs with {ref_config.model} "
               f"({ref_config.pool.max_actors} actors at most)"):
        with progress("reference scoring", report.pairs, "pairs") as bar:
            scored = counted(score_pairs(pairs, ref_config, scorer_cls, rows=report.pairs), bar).materialize()
    manifest = cache.commit(key, scored, inputs, expected_rows=report.pairs)
    dataset, _, _ = cache.load(key)  # hand on what was committed, verified, not the in-memory copy
    result = ReferenceResult(dataset, key, cache.entry(key), manifest["rows"], cache_hit=False,
                             data_report=report, recomputed_because=reason)
    print(result.summary(), flush=True)
    return result
