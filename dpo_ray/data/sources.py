"""Read preference data from files, DataFrames or Hugging Face datasets into a Ray Dataset.

Every source becomes the same three columns, so that validation downstream can always say
*where* a bad row came from:

========== ====== ==========================================================================
column     type   meaning
========== ====== ==========================================================================
source_file string the file (or ``<DataFrame>`` / ``hf://id:split``) the row was read from
source_row  int64  1-based line number (JSONL) or data row number (JSON array, Parquet, CSV)
record      string the row as canonical JSON; null when the line could not be parsed
read_error  string why the line could not be parsed (malformed JSON); null otherwise
========== ====== ==========================================================================

Rows are kept as JSON text rather than typed Arrow columns on purpose: a file where one row has
a number in ``chosen`` and another a string must still reach validation, which then names the
row, instead of failing inside Arrow's schema unification with no row number.
"""

from __future__ import annotations

import glob
import io
import json
import os
from typing import Iterator

import pyarrow as pa
import ray
from ray.data.datasource import FileBasedDatasource

RECORD_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("record", pa.string()),
        ("read_error", pa.string()),
    ]
)
EXTENSIONS = ("jsonl", "jsonl.gz", "json", "json.gz", "parquet", "csv", "csv.gz")
_CHUNK = 1024  # rows per emitted block: small enough to stream, large enough to be cheap


def _records_table(path: str, rows: list[tuple[int, str | None, str | None]]) -> pa.Table:
    return pa.table(
        {
            "source_file": [path] * len(rows),
            "source_row": [r[0] for r in rows],
            "record": [r[1] for r in rows],
            "read_error": [r[2] for r in rows],
        },
        schema=RECORD_SCHEMA,
    )


def _canonical(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=True, default=str)


def _iter_jsonl(lines: Iterator[str], path: str) -> Iterator[pa.Table]:
    chunk: list[tuple[int, str | None, str | None]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # blank lines hold no record; line numbers stay physical
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            chunk.append((lineno, _canonical(row), None))
        except ValueError as err:
            chunk.append((lineno, None, f"malformed JSON: {err}"))
        if len(chunk) >= _CHUNK:
            yield _records_table(path, chunk)
            chunk = []
    if chunk:
        yield _records_table(path, chunk)


def _iter_rows(rows: Iterator[dict], path: str) -> Iterator[pa.Table]:
    chunk = []
    for index, row in enumerate(rows, start=1):
        chunk.append((index, _canonical(row), None))
        if len(chunk) >= _CHUNK:
            yield _records_table(path, chunk)
            chunk = []
    if chunk:
        yield _records_table(path, chunk)


class PreferenceFileDatasource(FileBasedDatasource):
    """Streams JSONL/JSON/Parquet/CSV files (gzip by extension) into ``RECORD_SCHEMA`` blocks."""

    _FILE_EXTENSIONS = list(EXTENSIONS)

    def _open_input_source(self, filesystem, path: str, **open_args):
        if path.endswith(".parquet"):  # Parquet needs random access, not a stream
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(f)
            rows = (row for batch in parquet.iter_batches(batch_size=_CHUNK) for row in batch.to_pylist())
            yield from _iter_rows(rows, path)
            return
        text = io.TextIOWrapper(io.BufferedReader(f), encoding="utf-8")
        if path.endswith((".csv", ".csv.gz")):
            import csv

            yield from _iter_rows(csv.DictReader(text), path)
            return
        if path.endswith((".json", ".json.gz")):
            content = text.read()
            try:
                loaded = json.loads(content)
            except ValueError:
                loaded = None  # not one JSON document: read it as JSON Lines below
            if isinstance(loaded, list):
                if not all(isinstance(r, dict) for r in loaded):
                    bad = next(i for i, r in enumerate(loaded, 1) if not isinstance(r, dict))
                    yield _records_table(path, [(bad, None, "malformed JSON: array item is not an object")])
                    return
                yield from _iter_rows(iter(loaded), path)
                return
            yield from _iter_jsonl(iter(content.splitlines()), path)
            return
        yield from _iter_jsonl(text, path)


def source_files(source: str) -> list[str]:
    """The files a path, directory, glob or URI stands for, sorted: the exact list that is read
    (and that the reference cache hashes). Hidden files (``.``/``_`` prefixes) are left out."""
    from pyarrow import fs as pafs

    if "://" not in source and any(ch in source for ch in "*?["):
        paths = sorted(os.path.abspath(p) for p in glob.glob(source, recursive=True)
                       if os.path.isfile(p))
        if not paths:
            raise FileNotFoundError(f"no files match {source!r}")
        return paths
    filesystem, root = pafs.FileSystem.from_uri(source if "://" in source else os.path.abspath(source))
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data source {source!r} does not exist")
    if info.type == pafs.FileType.File:
        return [source if "://" in source else root]
    entries = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    scheme = source.split("://")[0] + "://" if "://" in source else ""
    paths = sorted(
        scheme + e.path
        for e in entries
        if e.type == pafs.FileType.File and e.path.endswith(EXTENSIONS)
        and not any(part.startswith((".", "_")) for part in e.path[len(root):].split("/") if part)
    )
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(EXTENSIONS)} files under {source!r}")
    return paths


def _with_row_records(ds: ray.data.Dataset, name: str) -> ray.data.Dataset:
    """For in-memory sources carrying a ``__row`` column: turn each row into a record."""

    def to_records(batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        return _records_table(name, [(r.pop("__row") + 1, _canonical(r), None) for r in rows])

    return ds.map_batches(to_records, batch_format="pyarrow", batch_size=_CHUNK, zero_copy_batch=True)


def read_records(source, config) -> ray.data.Dataset:
    """Any supported source -> a Ray Dataset with ``RECORD_SCHEMA`` (lazy; nothing runs yet).

    ``source`` is ``config.source`` by default; a pandas DataFrame or ``datasets.Dataset`` object
    may be passed instead from Python.
    """
    import pandas as pd

    if isinstance(source, pd.DataFrame):
        frame = source.reset_index(drop=True).assign(__row=range(len(source)))
        ds = _with_row_records(ray.data.from_pandas(frame), "<DataFrame>")
    elif type(source).__module__.startswith("datasets"):
        ds = _from_hf(source, f"hf://{getattr(source, 'info', None) and source.info.dataset_name}")
    elif isinstance(source, str) and source.startswith("hf://"):
        import datasets

        hub_id = source[len("hf://"):]
        hf = datasets.load_dataset(
            hub_id, name=config.hf_name, data_dir=config.hf_data_dir, split=config.hf_split,
            revision=config.hf_revision, trust_remote_code=config.trust_remote_code,
        )
        ds = _from_hf(hf, f"{source}:{config.hf_split}")
    elif isinstance(source, str):
        ds = ray.data.read_datasource(
            PreferenceFileDatasource(source_files(source), file_extensions=list(EXTENSIONS))
        )
    else:
        raise TypeError(f"unsupported data source of type {type(source).__name__}")
    if config.limit is not None:
        ds = ds.limit(config.limit)
    return ds


def _from_hf(hf_dataset, name: str) -> ray.data.Dataset:
    indexed = hf_dataset.map(lambda _, idx: {"__row": idx}, with_indices=True)
    return _with_row_records(ray.data.from_huggingface(indexed), name)
