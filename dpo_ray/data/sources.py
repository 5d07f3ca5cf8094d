"""Read preference data from files, DataFrames or Hugging Face datasets into a Ray Dataset.

Every source becomes the same three columns, so that validation downstream can always say
*where* a bad row came from:

========== ====== ==========================================================================
column     type   meaning
========== ====== ==========================================================================
source_file string the file (or ``<DataFrame>`` / ``hf://id:split``) the row was read from
source_row  int64  1-based line number (JSONL) or data row number (JSON array, Parquet, CSV)
record      string the row as canonical JSON; null when the line could not be parsed
read_error  string why the row could not be read, as ``"<reason>: <detail>"``; null otherwise
========== ====== ==========================================================================

Rows are kept as JSON text rather than typed Arrow columns on purpose: a file where one row has
a number in ``chosen`` and another a string must still reach validation, which then names the
row, instead of failing inside Arrow's schema unification with no row number.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import io
import json
import os
import re
import sys
import zlib
from typing import Iterable, Iterator

import pyarrow as pa
import ray
from ray.data.datasource import FileBasedDatasource

from dpo_ray.data.errors import (
    CORRUPT_FILE, ENCODING_ERROR, MALFORMED_CSV, MALFORMED_JSON, UNREADABLE_SOURCE, WRONG_TYPE,
    PreferenceDataError,
)

RECORD_SCHEMA = pa.schema(
    [
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("record", pa.string()),
        ("read_error", pa.string()),
    ]
)
FILE_FORMATS = ("jsonl", "json", "csv", "parquet")
EXTENSIONS = ("jsonl", "jsonl.gz", "json", "json.gz", "parquet", "csv", "csv.gz")
# "owner/name", as hub dataset ids are written (Anthropic/hh-rlhf, trl-lib/ultrafeedback_binarized).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_CHUNK = 1024  # rows per emitted block: small enough to stream, large enough to be cheap
_GZIP_MAGIC = b"\x1f\x8b"
# Decompression failures: a truncated stream (EOFError), bad bytes (zlib.error, BadGzipFile).
_STREAM_ERRORS = (EOFError, OSError, zlib.error)
Row = tuple[int, "str | None", "str | None"]  # (source_row, record, read_error)


def file_format(path: str, hint: str = "auto") -> str | None:
    """jsonl/json/csv/parquet for ``path``: the hint when set, else the extension (any case,
    ``.gz`` allowed). None for an unknown extension."""
    if hint != "auto":
        return hint
    name = path.lower().removesuffix(".gz")
    return next((fmt for fmt in FILE_FORMATS if name.endswith("." + fmt)), None)


def _records_table(path: str, rows: list[Row]) -> pa.Table:
    return pa.table(
        {
            "source_file": [path] * len(rows),
            "source_row": [r[0] for r in rows],
            "record": [r[1] for r in rows],
            "read_error": [r[2] for r in rows],
        },
        schema=RECORD_SCHEMA,
    )


def _json_default(value):
    """Values JSON has no type for: bytes (Parquet binary columns) must be UTF-8 text."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8")  # UnicodeDecodeError -> the row's encoding_error
    return str(value)  # dates, decimals: as text (validation then names a wrong type)


def _canonical(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=True, default=_json_default)


def _record(row) -> tuple[str | None, str | None]:
    """One parsed row -> (canonical JSON, None) or (None, "<reason>: <detail>")."""
    if not isinstance(row, dict):
        return None, f"{MALFORMED_JSON}: expected a JSON object, got {type(row).__name__}"
    try:
        text = _canonical(row)
    except UnicodeDecodeError as err:
        return None, f"{ENCODING_ERROR}: a bytes value is not UTF-8 text ({err.reason} at byte {err.start})"
    except RecursionError:
        return None, f"{MALFORMED_JSON}: nested too deep to process"
    except (TypeError, ValueError) as err:
        return None, f"{WRONG_TYPE}: {err}"
    try:
        text.encode("utf-8")  # Arrow strings are UTF-8: a lone surrogate would fail the whole block
    except UnicodeEncodeError as err:
        return None, (f"{ENCODING_ERROR}: {ascii(text[err.start])} is not valid Unicode text (bytes "
                      "that are not UTF-8, or a lone surrogate escape such as \\ud800)")
    return text, None


def _chunks(rows: Iterable[Row], path: str) -> Iterator[pa.Table]:
    chunk: list[Row] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= _CHUNK:
            yield _records_table(path, chunk)
            chunk = []
    if chunk:
        yield _records_table(path, chunk)


def _describe(err: BaseException) -> str:
    if isinstance(err, EOFError):
        return "the compressed stream ends early (truncated file?)"
    return f"{type(err).__name__}: {err}"


def _jsonl_rows(raw_lines: Iterator[bytes]) -> Iterator[Row]:
    """JSON Lines from raw byte lines. Each line is decoded on its own, so one line of bad bytes
    is one bad row. A UTF-8 BOM on the first line (Windows editors) is dropped; CR, CRLF and LF
    all end a line. Blank lines hold no record; line numbers stay physical."""
    lineno = 0
    while True:
        try:
            raw = next(raw_lines)
        except StopIteration:
            return
        except _STREAM_ERRORS as err:
            yield (lineno + 1, None, f"{CORRUPT_FILE}: {_describe(err)} after line {lineno}; the "
                   "rest of the file cannot be read")
            return
        for piece in raw.splitlines() or [b""]:
            lineno += 1
            if lineno == 1 and piece.startswith(codecs.BOM_UTF8):
                piece = piece[len(codecs.BOM_UTF8):]
            if not piece.strip():
                continue
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError as err:
                yield (lineno, None, f"{ENCODING_ERROR}: byte {piece[err.start]:#04x} at offset "
                       f"{err.start} of the line is not UTF-8")
                continue
            try:
                yield (lineno, *_record(json.loads(text)))
            except RecursionError:
                yield (lineno, None, f"{MALFORMED_JSON}: nested deeper than the JSON parser allows")
            except ValueError as err:
                yield (lineno, None, f"{MALFORMED_JSON}: {err}")


def _json_rows(binary) -> Iterator[Row]:
    """A ``.json`` file: one JSON array of row objects, else read as JSON Lines."""
    try:
        content = binary.read()
    except _STREAM_ERRORS as err:
        yield (0, None, f"{CORRUPT_FILE}: {_describe(err)}")
        return
    try:
        loaded = json.loads(content.decode("utf-8-sig"))
    except RecursionError:
        yield (1, None, f"{MALFORMED_JSON}: nested deeper than the JSON parser allows")
        return
    except ValueError:  # not one JSON document (or not UTF-8 as a whole): line by line
        loaded = None
    if isinstance(loaded, list):
        for index, item in enumerate(loaded, start=1):
            yield (index, *_record(item))
        return
    if isinstance(loaded, dict):
        wrapped = [k for k, v in loaded.items() if isinstance(v, list) and v
                   and all(isinstance(r, dict) for r in v)]
        if wrapped:
            yield (1, None, f"{MALFORMED_JSON}: the file is one JSON object holding rows under "
                   f"{wrapped[0]!r}; write the rows as a JSON array or as JSON Lines")
        else:
            yield (1, *_record(loaded))
        return
    yield from _jsonl_rows(iter(content.splitlines()))


def _csv_rows(binary) -> Iterator[Row]:
    """CSV with a header row. Fields may be any size (Python's csv stops at 128 kB by default);
    CRLF inside a quoted cell is kept; an Excel BOM is dropped; bytes that are not UTF-8 make that
    row an ``encoding_error`` (kept as surrogates by ``surrogateescape`` and found in ``_record``).
    Rows are numbered by data row (the header is not a row)."""
    csv.field_size_limit(sys.maxsize)
    text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text, strict=True)
    header, index, last_error_line = None, 0, -1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            if reader.line_num == last_error_line:  # the reader cannot get past this point
                return
            last_error_line = reader.line_num
            index += 1
            yield (index, None, f"{MALFORMED_CSV}: {err} (line {reader.line_num})")
            continue
        except _STREAM_ERRORS as err:
            yield (index + 1, None, f"{CORRUPT_FILE}: {_describe(err)} after data row {index}; "
                   "the rest of the file cannot be read")
            return
        if not fields:
            continue  # a blank line
        if header is None:
            header = fields
            continue
        index += 1
        if len(fields) != len(header):
            yield (index, None, f"{MALFORMED_CSV}: {len(fields)} fields, the header has "
                   f"{len(header)} (line {reader.line_num})")
            continue
        yield (index, *_record(dict(zip(header, fields))))


def _parquet_rows(f) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(f).iter_batches(batch_size=_CHUNK)
    except (pa.ArrowException, OSError) as err:
        yield (0, None, f"{CORRUPT_FILE}: not a readable Parquet file ({err})")
        return
    index = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            yield (index + 1, None, f"{CORRUPT_FILE}: {err} after row {index}; the rest of the "
                   "file cannot be read")
            return
        for row in batch.to_pylist():
            index += 1
            yield (index, *_record(row))


class PreferenceFileDatasource(FileBasedDatasource):
    """Streams JSONL/JSON/Parquet/CSV files into ``RECORD_SCHEMA`` blocks. Gzip is recognised by
    its magic bytes, not the name, so ``x.jsonl`` holding gzip bytes and ``x.jsonl.gz`` holding
    plain text both read. Nothing in a file raises: every problem becomes a row whose
    ``read_error`` is ``"<reason>: <detail>"``, so the driver names the file and row (and skip
    mode can count it) instead of Ray reporting a stack trace from a read task."""

    def __init__(self, paths, file_format_hint: str = "auto", **kwargs):
        super().__init__(paths, **kwargs)
        self._hint = file_format_hint

    def _open_input_source(self, filesystem, path: str, **open_args):
        return filesystem.open_input_file(path)  # raw bytes: we sniff compression ourselves

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        fmt = file_format(path, self._hint)
        if fmt == "parquet":
            yield from _chunks(_parquet_rows(f), path)
            return
        magic = f.read(2)
        f.seek(0)
        binary = gzip.GzipFile(fileobj=f, mode="rb") if magic == _GZIP_MAGIC else io.BufferedReader(f)
        if fmt == "csv":
            rows = _csv_rows(binary)
        elif fmt == "json":
            rows = _json_rows(binary)
        else:
            rows = _jsonl_rows(iter(binary))
        yield from _chunks(rows, path)


def list_source(source: str, hint: str = "auto") -> tuple[list[str], list[str]]:
    """(files read, files ignored) for a path, directory, glob or URI, both sorted. A directory
    is searched recursively for known extensions (any case) unless ``hint`` names a format;
    hidden files (``.``/``_`` prefixes) are left out. An explicitly named file of unknown type is
    an error that names ``data.file_format``."""
    from pyarrow import fs as pafs

    if "://" not in source and any(ch in source for ch in "*?["):
        named = sorted(os.path.abspath(p) for p in glob.glob(source, recursive=True)
                       if os.path.isfile(p))
        if not named:
            raise FileNotFoundError(f"no files match {source!r}")
        for path in named:
            _require_known_type(path, hint)
        return named, []
    try:
        filesystem, root = pafs.FileSystem.from_uri(
            source if "://" in source else os.path.abspath(os.path.expanduser(source)))
        info = filesystem.get_file_info(root)
    except (pa.ArrowException, OSError) as err:
        raise PreferenceDataError(UNREADABLE_SOURCE, f"cannot open: {err}", source) from None
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data source {source!r} does not exist")
    if info.type == pafs.FileType.File:
        path = source if "://" in source else root
        _require_known_type(path, hint)
        return [path], []
    entries = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    scheme = source.split("://")[0] + "://" if "://" in source else ""
    visible = sorted(
        scheme + e.path for e in entries
        if e.type == pafs.FileType.File
        and not any(part.startswith((".", "_")) for part in e.path[len(root):].split("/") if part))
    paths = [p for p in visible if file_format(p, hint)]
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(EXTENSIONS)} files under {source!r} "
                                "(set data.file_format to read other names)")
    return paths, [p for p in visible if p not in set(paths)]


def _require_known_type(path: str, hint: str) -> None:
    if file_format(path, hint) is None:
        raise PreferenceDataError(UNREADABLE_SOURCE, "unknown file type: name it .jsonl, .json, "
                                  ".csv or .parquet (optionally .gz), or set data.file_format "
                                  "to jsonl, json, csv or parquet", path)


def source_files(source: str, hint: str = "auto") -> list[str]:
    """The files a path, directory, glob or URI stands for, sorted: the exact list that is read
    (and that the reference cache hashes)."""
    return list_source(source, hint)[0]


def _with_row_records(ds: ray.data.Dataset, name: str) -> ray.data.Dataset:
    """For in-memory sources carrying a ``__row`` column: turn each row into a record."""

    def to_records(batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        return _records_table(name, [(r.pop("__row") + 1, *_record(r)) for r in rows])

    return ds.map_batches(to_records, batch_format="pyarrow", batch_size=_CHUNK, zero_copy_batch=True)


def hub_dataset_id(source: str) -> str | None:
    """The Hugging Face hub id ``source`` names, else None: ``hf://owner/name``, or a bare
    ``owner/name`` when no local file or folder of that name exists and it has no data file
    extension (``data/pairs.jsonl`` that is missing stays a missing file)."""
    if source.startswith("hf://"):
        return source[len("hf://"):]
    if (_HUB_ID.match(source) and not os.path.exists(os.path.expanduser(source))
            and not source.lower().endswith(tuple(f".{ext}" for ext in EXTENSIONS))):
        return source
    return None


def _load_hub_dataset(hub_id: str, source: str, config):
    import datasets

    try:
        return datasets.load_dataset(
            hub_id, name=config.hf_name, data_dir=config.hf_data_dir, split=config.hf_split,
            revision=config.hf_revision, trust_remote_code=config.trust_remote_code)
    except Exception as err:  # noqa: BLE001 - the hub's many error types, one message that says what was tried
        tried = ("" if source.startswith("hf://") else
                 f"no local file or folder {source!r} exists, so it was read as a hub id; ")
        raise PreferenceDataError(UNREADABLE_SOURCE, f"{tried}datasets.load_dataset({hub_id!r}, "
                                  f"split={config.hf_split!r}) failed: {err}", source) from None


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
    elif isinstance(source, str) and (hub_id := hub_dataset_id(source)) is not None:
        hf = _load_hub_dataset(hub_id, source, config)
        ds = _from_hf(hf, f"hf://{hub_id}:{config.hf_split}")
    elif isinstance(source, str):
        ds = ray.data.read_datasource(PreferenceFileDatasource(
            source_files(source, config.file_format), file_format_hint=config.file_format))
    else:
        raise TypeError(f"unsupported data source of type {type(source).__name__}")
    if config.limit is not None:
        ds = ds.limit(config.limit)
    return ds


def _from_hf(hf_dataset, name: str) -> ray.data.Dataset:
    indexed = hf_dataset.map(lambda _, idx: {"__row": idx}, with_indices=True)
    return _with_row_records(ray.data.from_huggingface(indexed), name)
