"""Fixed costs of a stage, paid however few the pairs: tokenizing on an actor pool against tasks
that keep their tokenizer, and a reference cache entry read by Ray Data's two Parquet readers.
Not a test; it prints numbers.

    python benchmarks/stage_overheads.py --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz
    python benchmarks/stage_overheads.py --data ... --pairs 256 --repeats 3

One local Ray session. The tiny Llama's cache entry is scored once (``--pairs`` HH pairs, 16
per file); then each variant runs ``--repeats`` times, alternating, and the median is printed.
The first repeat of each includes starting Ray worker processes; later ones find them warm.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from dpo_ray.assets import smollm2_path, tiny_model
    from dpo_ray.config import DataConfig, ReferenceConfig
    from dpo_ray.data import prepare_pairs
    from dpo_ray.data.sources import read_records
    from dpo_ray.data.tokenize import PairTokenizer
    from dpo_ray.ray_env import init_ray
    from dpo_ray.reference import ensure_reference
    from dpo_ray.reference.cache import ReferenceCache, read_parquet_files

    init_ray()
    work = Path(tempfile.mkdtemp(prefix="stage-overheads-"))
    model = tiny_model(smollm2_path(), work / "tiny", arch="llama")
    data = DataConfig(source=args.data, tokenizer=str(model), limit=args.pairs, on_bad_row="skip",
                      max_length=128)
    reference = ReferenceConfig(model=str(model), cache_dir=str(work / "cache"), batch_size=16)
    entry = ensure_reference(data, reference)
    manifest = ReferenceCache(reference.cache_dir).manifest(entry.key)
    paths = [str(Path(entry.path) / f["path"]) for f in manifest["files"]]

    def actor_pool() -> int:  # the data stage's tokenizing before: an actor per stage
        return read_records(args.data, data).map_batches(
            PairTokenizer, fn_constructor_args=(data,), batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=1, max_size=1), num_cpus=1).materialize().count()

    def tasks() -> int:  # prepare_pairs now: tasks, the tokenizer kept per worker process
        return prepare_pairs(data)[1].rows_read

    def parquet_v2() -> int:  # Ray 2.60's default reader (read_parquet_files restores it)
        assert DataContext.get_current().use_datasource_v2
        return ray.data.read_parquet(paths).materialize().count()

    def parquet_v1() -> int:  # what ReferenceCache.load uses
        return read_parquet_files(paths).materialize().count()

    times: dict[str, list[float]] = {}
    rows: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, run in (("tokenize: actor pool", actor_pool), ("tokenize: tasks", tasks),
                          ("cache read: Parquet V2", parquet_v2), ("cache read: Parquet V1", parquet_v1)):
            started = time.perf_counter()
            rows[name] = run()
            times.setdefault(name, []).append(time.perf_counter() - started)
    print(f"{args.pairs} HH pairs, cache entry of {len(paths)} files; seconds per run "
          f"(median of {args.repeats}; first run; rows)")
    for name, measured in times.items():
        print(f"  {name:24s} {statistics.median(measured):6.2f}   {measured[0]:6.2f}   {rows[name]}")
    for slow, fast in (("tokenize: actor pool", "tokenize: tasks"),
                       ("cache read: Parquet V2", "cache read: Parquet V1")):
        ratio = statistics.median(times[slow]) / statistics.median(times[fast])
        print(f"  {fast} is {ratio:.1f}x faster than {slow.split(': ')[1]}")


if __name__ == "__main__":
    main()
