"""The content-addressed reference cache: a key from everything that changes the values, Parquet
files written by Ray Data, and a manifest written last.

Layout under ``cache_dir`` (a local path or any pyarrow filesystem URI)::

    <key>/manifest.json          written last, atomically: the cache entry exists iff this does
    <key>/attempt-<id>/*.parquet  one directory per scoring attempt; only the manifest's is read

Key inputs (``cache_key``): the scoring-code version, the reference weights (sha256 of
``config.json`` and every ``*.safetensors`` file, or hub id + revision), dtype, the tokenizer's
files (chat template included), the tokenization settings (``max_length``, ``max_prompt_length``,
format, columns, markers, ``limit``), and the data (sha256 of each source file, a DataFrame's
row hashes, or a ``datasets`` fingerprint). Training settings (beta, learning rate, epochs) are
not inputs: changing them reuses the cache.

Interrupted runs: scoring writes into a fresh ``attempt-*`` directory and the manifest is
committed only after the rows are verified (count == pairs, no duplicate ``pair_id``). A crashed
attempt has no manifest pointing at it, so its files are never read; the rerun *recomputes*
rather than resuming.

Concurrent runs: two runs that miss the same key both score, each into its own attempt; the first
to commit wins (on a local or mounted disk the manifest is created with a hard link, which fails
if it exists; object stores have no such primitive, so there the last writer wins, which is still
correct because both attempts hold the same pairs). The loser deletes only its own attempt.
Committed files are never deleted while a manifest points at them, so a reader iterating an entry
cannot lose them; a corrupt entry's manifest is moved aside (``manifest.corrupt-*.json``) rather
than its files, and unreferenced attempts are removed only when older than ``STALE_ATTEMPT_S``. Recompute is chosen because a Ray Data write is not transactional (a
retried write task can leave a partial or doubled file), and proving a partial attempt complete
costs about as much as scoring it again at the sizes where this runs on one node.

Reading verifies every file against the manifest (bytes, sha256, Parquet row count, and the
digest of the sorted ``pair_id`` column); a mismatch, or a manifest that is not valid JSON or
lacks its fields, raises ``CacheCorrupt`` naming the file, and the caller recomputes. The caller
(``stage.ensure_reference``) also proves the entry covers exactly the pairs of the data it was asked
for, so an entry whose manifest and files agree but hold too few pairs is not a hit.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

# Bump when scoring or tokenizing code changes the values it writes. 2: chat prompts cut at a
# turn boundary (dpo_ray/data/tokenize.py rule 4).
SCORING_VERSION = 2
STALE_ATTEMPT_S = 6 * 3600  # an unreferenced attempt this old is a crashed run, not a running one
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_TOKENIZATION_FIELDS = ("format", "file_format", "prompt_column", "chosen_column", "rejected_column",
                        "assistant_marker", "human_marker", "max_length", "max_prompt_length",
                        "limit", "hf_split", "hf_name", "hf_data_dir", "hf_revision")


class CacheCorrupt(RuntimeError):
    """A cache entry whose files do not match its manifest."""


def _sha256_stream(stream, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    while True:
        block = stream.read(chunk)
        if not block:
            return digest.hexdigest()
        digest.update(block)


def _sha256_local(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256_stream(f)


@functools.lru_cache(maxsize=256)
def _sha256_unchanged(path: str, *stat: int) -> str:
    """``stat`` (inode, size, mtime, ctime) is not read: it is part of the memo's key, so a
    rewritten file is hashed again."""
    return _sha256_local(Path(path))


def _model_file_sha256(path: Path) -> str:
    """A model file's sha256, remembered while its inode, size and change times stay: one run
    fingerprints its reference model for the cache key and again to compare it with the policy
    (0.3-0.5 s per pass over SmolLM2's 538 MB). Cache files are always read whole (verify)."""
    stat = path.stat()
    return _sha256_unchanged(str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns,
                             stat.st_ctime_ns)


def model_fingerprint(name_or_path: str, revision: str | None) -> dict:
    """Content hashes of a local model folder, or hub id + revision. A LoRA adapter folder is its
    adapter files plus its base model's fingerprint (the merged weights depend on both)."""
    from dpo_ray.models import ADAPTER_CONFIG, adapter_base

    folder = Path(os.path.expanduser(name_or_path))
    if not folder.is_dir():
        return {"hub_id": name_or_path, "revision": revision or "main"}
    base = adapter_base(name_or_path)
    if base is not None:
        files = [folder / ADAPTER_CONFIG, *sorted(folder.glob("adapter_model*.safetensors"))]
        return {"adapter": {p.name: _model_file_sha256(p) for p in files},
                "base": model_fingerprint(base, None)}
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (only safetensors are loaded)")
    files = [folder / "config.json", *weights]
    return {"files": {p.name: _model_file_sha256(p) for p in files}}


def tokenizer_fingerprint(name_or_path: str) -> dict:
    """Hashes of every non-weight file in a tokenizer folder (vocab, merges, config, template)."""
    folder = Path(os.path.expanduser(name_or_path))
    if not folder.is_dir():
        return {"hub_id": name_or_path}
    return {"files": {p.name: _sha256_local(p) for p in sorted(folder.iterdir())
                      if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES)}}


def data_fingerprint(source, data_config) -> dict:
    import pandas as pd

    from dpo_ray.data.sources import hub_dataset_id, source_files

    if isinstance(source, pd.DataFrame):
        rows = pd.util.hash_pandas_object(source.astype(str), index=False).to_numpy()
        return {"dataframe_sha256": hashlib.sha256(rows.tobytes()).hexdigest()}
    if type(source).__module__.startswith("datasets"):
        return {"hf_fingerprint": source._fingerprint}
    if (hub_id := hub_dataset_id(source)) is not None:  # hf://owner/name and owner/name alike
        return {"hub_dataset": f"hf://{hub_id}"}
    hashes = []
    for path in source_files(source, data_config.file_format):
        filesystem, inner = pafs.FileSystem.from_uri(path if "://" in path else os.path.abspath(path))
        with filesystem.open_input_stream(inner) as stream:
            hashes.append(_sha256_stream(stream))
    return {"file_sha256": hashes}


def cache_key(data_config, ref_config, source=None) -> tuple[str, dict]:
    """-> (key, inputs). ``inputs`` is what the key hashes; it is stored in the manifest."""
    data_dict = asdict(data_config)
    inputs = {
        "scoring_version": SCORING_VERSION,
        "model": model_fingerprint(ref_config.model, ref_config.revision),
        "dtype": ref_config.dtype,
        "tokenizer": tokenizer_fingerprint(data_config.tokenizer),
        "tokenization": {k: data_dict[k] for k in _TOKENIZATION_FIELDS},
        "data": data_fingerprint(data_config.source if source is None else source, data_config),
    }
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24], inputs


class ReferenceCache:
    """Reads and commits cache entries under ``root`` (local path or URI)."""

    def __init__(self, root: str):
        root = root if "://" in root else os.path.abspath(os.path.expanduser(root))
        self.uri = root
        self.fs, self.base = pafs.FileSystem.from_uri(root)
        self.fs.create_dir(self.base, recursive=True)

    def _uri(self, *parts: str) -> str:
        inner = "/".join([self.base.rstrip("/"), *parts])
        return inner if "://" not in self.uri else self.uri.split("://")[0] + "://" + inner

    def entry(self, key: str) -> str:
        return self._uri(key)

    def manifest(self, key: str) -> dict | None:
        """The committed manifest, None when there is none; ``CacheCorrupt`` when it is unreadable
        or lacks its fields (a hand-edited or half-copied file must not be trusted or stick)."""
        path = f"{self.base}/{key}/manifest.json"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        where = f"reference cache {self.entry(key)}: manifest.json"
        try:
            with self.fs.open_input_stream(path) as f:
                manifest = json.loads(f.read())
        except (ValueError, UnicodeDecodeError) as err:
            raise CacheCorrupt(f"{where} is not valid JSON ({err})") from None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, list) or not files or not isinstance(manifest.get("rows"), int):
            raise CacheCorrupt(f"{where} lists no files or no row count")
        if not all(isinstance(e, dict) and {"path", "rows", "bytes", "sha256"} <= set(e)
                   for e in files):
            raise CacheCorrupt(f"{where} has a file entry without path, rows, bytes or sha256")
        return manifest

    def verify(self, key: str, manifest: dict) -> list[str]:
        """Every listed file present with the recorded size, sha256 and Parquet row count, and the
        pair ids matching the recorded digest. Returns the entry's pair ids."""
        total, ids = 0, []
        for entry in manifest["files"]:
            path = f"{self.base}/{key}/{entry['path']}"
            info = self.fs.get_file_info(path)
            where = f"reference cache {self.entry(key)}: {entry['path']}"
            if info.type == pafs.FileType.NotFound:
                raise CacheCorrupt(f"{where} is missing")
            if info.size != entry["bytes"]:
                raise CacheCorrupt(f"{where} has {info.size} bytes, manifest says {entry['bytes']}")
            with self.fs.open_input_stream(path) as f:
                if _sha256_stream(f) != entry["sha256"]:
                    raise CacheCorrupt(f"{where} content differs from its manifest checksum")
            with self.fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=["pair_id"])
            if table.num_rows != entry["rows"]:
                raise CacheCorrupt(f"{where} has {table.num_rows} rows, manifest says {entry['rows']}")
            ids.extend(table.column("pair_id").to_pylist())
            total += table.num_rows
        if total != manifest["rows"]:
            raise CacheCorrupt(f"reference cache {self.entry(key)}: {total} rows in files, "
                               f"manifest says {manifest['rows']}")
        if "pair_ids_sha256" in manifest and pair_ids_digest(ids) != manifest["pair_ids_sha256"]:
            raise CacheCorrupt(f"reference cache {self.entry(key)}: the files' pair ids differ "
                               "from the manifest's digest")
        return ids

    def load(self, key: str) -> tuple[ray.data.Dataset, dict, list[str]] | None:
        """The verified entry as a Dataset, its manifest and pair ids; None when not committed."""
        manifest = self.manifest(key)
        if manifest is None:
            return None
        ids = self.verify(key, manifest)
        paths = [self._uri(key, e["path"]) for e in manifest["files"]]
        return read_parquet_files(paths), manifest, ids

    def quarantine(self, key: str) -> str:
        """Set a corrupt entry aside: its manifest is moved (so it is never read again, and is
        kept for inspection); its files stay until they are stale, in case a reader is on them."""
        target = f"{self.base}/{key}/manifest.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.json"
        self.fs.move(f"{self.base}/{key}/manifest.json", target)
        return self._uri(*target[len(self.base) + 1:].split("/"))

    def commit(self, key: str, scored: ray.data.Dataset, inputs: dict, expected_rows: int) -> dict:
        """Write ``scored`` into a new attempt directory, verify it, then write the manifest.

        Raises if the written rows are not exactly one per ``pair_id`` and ``expected_rows`` of them.
        """
        attempt = f"attempt-{uuid.uuid4().hex[:12]}"
        scored.write_parquet(self._uri(key, attempt))
        selector = pafs.FileSelector(f"{self.base}/{key}/{attempt}", recursive=True)
        files = sorted(i.path for i in self.fs.get_file_info(selector)
                       if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
        entries, ids = [], []
        for path in files:
            with self.fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=["pair_id"])
            with self.fs.open_input_stream(path) as f:
                digest = _sha256_stream(f)
            ids.extend(table.column("pair_id").to_pylist())
            entries.append({"path": path[len(f"{self.base}/{key}/"):], "rows": table.num_rows,
                            "bytes": self.fs.get_file_info(path).size, "sha256": digest})
        if len(ids) != expected_rows or len(set(ids)) != len(ids):
            raise RuntimeError(f"reference scoring wrote {len(ids)} rows ({len(set(ids))} distinct "
                               f"pair_id) for {expected_rows} pairs; not committing {attempt}")
        schema = pq.read_schema(self.fs.open_input_file(files[0])) if files else None
        manifest = {
            "key": key, "rows": len(ids), "files": entries, "inputs": inputs,
            "pair_ids_sha256": pair_ids_digest(ids),
            "schema": {f.name: str(f.type) for f in schema} if schema else {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if not self._publish(key, manifest):  # another run committed this key first: use theirs
            self.fs.delete_dir(f"{self.base}/{key}/{attempt}")
            return self.manifest(key)
        self._drop_stale_attempts(key, keep=attempt)
        return manifest

    def _publish(self, key: str, manifest: dict) -> bool:
        """Write ``manifest.json`` unless one exists. False when another run got there first."""
        final = f"{self.base}/{key}/manifest.json"
        tmp = f"{self.base}/{key}/.manifest-{uuid.uuid4().hex[:8]}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(manifest, indent=2).encode())
        if isinstance(self.fs, pafs.LocalFileSystem):
            try:
                os.link(tmp, final)  # atomic create-if-absent: the commit point
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if self.fs.get_file_info(final).type != pafs.FileType.NotFound:
            self.fs.delete_file(tmp)
            return False
        self.fs.move(tmp, final)  # the commit point
        return True

    def _drop_stale_attempts(self, key: str, keep: str) -> None:
        """Remove attempts no manifest points at and that no live run can still be writing."""
        now = time.time()
        for info in self.fs.get_file_info(pafs.FileSelector(f"{self.base}/{key}")):
            name = info.path.rsplit("/", 1)[-1]
            if (info.type == pafs.FileType.Directory and name.startswith("attempt-") and name != keep
                    and info.mtime is not None and now - info.mtime.timestamp() > STALE_ATTEMPT_S):
                self.fs.delete_dir(info.path)


def pair_ids_digest(ids: list[str]) -> str:
    """sha256 of the sorted pair ids: what an entry covers, independent of row order."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def read_parquet_files(paths: list[str]) -> ray.data.Dataset:
    """``ray.data.read_parquet`` on known files, with Ray Data's first Parquet reader. The newer one
    (datasource V2, the default in Ray 2.60) first lists the files in a task that takes ~2.4 s
    however few they are; the first reader loads a small entry in ~0.3 s
    (``benchmarks/stage_overheads.py``). The choice is read when the dataset is built."""
    from ray.data import DataContext

    context = DataContext.get_current()
    default, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(paths)
    finally:
        context.use_datasource_v2 = default
