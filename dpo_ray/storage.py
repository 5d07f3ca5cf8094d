"""Run and eval directories on a local disk or in object storage (``s3://``, ``gs://``, any
pyarrow filesystem URI).

A local path (``file://`` allowed) is used as it is; on a cluster it must be mounted on every node.
An object-store URI is *staged*: each process writes into a local mirror of it,
``<cache>/staging/<scheme>/<bucket>/<key>`` (``$DPO_RAY_CACHE``, default ``~/.cache/dpo_ray``), and
``publish`` uploads what changed. The mirror's layout follows the URI's, so a folder inside a
staged folder is the staging of the URI inside it: the pipeline's eval directory inside its run
directory is one tree, on whichever node writes it. Checkpoints do not pass through here: Ray
Train writes them to the URI itself (``RunConfig.storage_path``).

Models given as URIs (a run's ``final_model`` on S3) are downloaded once per node and content
(``local_model``), into a folder that appears whole or not at all.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs


def cache_dir() -> Path:
    """``$DPO_RAY_CACHE`` or ``~/.cache/dpo_ray``: exported models, downloads, staged outputs."""
    return Path(os.environ.get("DPO_RAY_CACHE", Path.home() / ".cache" / "dpo_ray")).absolute()


def is_remote(path: str | os.PathLike) -> bool:
    """An object-store URI (``s3://``, ``gs://``, ...), as opposed to a path or ``file://``."""
    path = str(path)
    return "://" in path and not path.startswith("file://")


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for a path or a URI (``Path`` would turn ``s3://b`` into ``s3:/b``)."""
    base = str(base)
    if not is_remote(base):
        return str(Path(local_path(base), *parts))
    return "/".join([base.rstrip("/"), *parts])


def local_path(path: str | os.PathLike) -> Path:
    """A local path or ``file://`` URI as an absolute ``Path``."""
    path = str(path)
    return Path(path.removeprefix("file://")).expanduser().absolute()


def local_dir(path: str | os.PathLike) -> Path:
    """Where this process reads and writes ``path``: the folder itself, or a URI's local mirror."""
    if not is_remote(path):
        return local_path(path)
    scheme, rest = str(path).split("://", 1)
    return cache_dir() / "staging" / scheme / rest.strip("/")


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a path or URI. S3 credentials and endpoint come
    from the usual AWS variables (``AWS_ENDPOINT_URL`` for an S3-compatible store) or the URI's
    query (``?endpoint_override=...``)."""
    path = str(path)
    return pafs.FileSystem.from_uri(path if is_remote(path) else str(local_path(path)))


def exists(path: str | os.PathLike) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def read_text(path: str | os.PathLike) -> str | None:
    """A small file's text, or None when there is none."""
    fs, inner = filesystem(path)
    try:
        with fs.open_input_stream(inner) as stream:
            return stream.read().decode()
    except FileNotFoundError:
        return None


def names(base: str | os.PathLike) -> list[str]:
    """The names directly under a folder or URI prefix (files and folders); [] when absent."""
    fs, inner = filesystem(base)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def _files(fs: pafs.FileSystem, inner: str) -> list[tuple[str, pafs.FileInfo]]:
    """(path relative to ``inner``, info) of every file under it; [] when there is no folder."""
    selector = pafs.FileSelector(inner, recursive=True, allow_not_found=True)
    return [(info.path[len(inner.rstrip("/")) + 1:], info) for info in fs.get_file_info(selector)
            if info.type == pafs.FileType.File]


def find(base: str | os.PathLike, pattern: str) -> list[str]:
    """Files under ``base`` whose path relative to it matches the glob ``pattern`` (``*`` also
    crosses ``/``), as paths or URIs like ``base``."""
    return sorted(join(base, relative) for relative, _ in _files(*filesystem(base))
                  if fnmatch.fnmatch(relative, pattern))


def check_writable(uri: str, field: str) -> None:
    """Write and delete a marker object: a missing bucket or credentials fail before any work."""
    fs, inner = filesystem(uri)
    marker = f"{inner.rstrip('/')}/.dpo_ray-write-check-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(marker) as stream:
            stream.write(b"ok")
        fs.delete_file(marker)
    except OSError as err:
        raise PermissionError(f"{field}={uri!r} is not writable: {err}") from None


# (local file, destination) -> (size, mtime_ns) when this process last uploaded it.
_published: dict[tuple[str, str], tuple[int, int]] = {}


def publish(local: Path, uri: str, exclude: tuple[str, ...] = ()) -> int:
    """Upload the files under ``local`` that changed since this process last published them to
    ``uri`` (same relative paths). A no-op for a local ``uri`` (``local`` is the folder itself).
    ``exclude``: glob patterns of relative paths to leave out. Returns the number uploaded."""
    if not is_remote(uri):
        return 0
    fs, inner = filesystem(uri)
    uploaded = 0
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        relative = path.relative_to(local).as_posix()
        if any(fnmatch.fnmatch(relative, pattern) for pattern in exclude):
            continue
        stat = path.stat()
        key = (str(path), f"{uri}/{relative}")
        if _published.get(key) == (stat.st_size, stat.st_mtime_ns):
            continue
        pafs.copy_files(str(path), f"{inner.rstrip('/')}/{relative}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        _published[key] = (stat.st_size, stat.st_mtime_ns)
        uploaded += 1
    return uploaded


def pull(uri: str, local: Path, exclude: tuple[str, ...] = ()) -> int:
    """Download every file under ``uri`` into ``local`` (``exclude``: glob patterns of relative
    paths to skip, e.g. checkpoints). Returns the number of files."""
    fs, inner = filesystem(uri)
    count = 0
    for relative, info in _files(fs, inner):
        if any(fnmatch.fnmatch(relative, p) for p in exclude):
            continue
        target = Path(local) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(info.path, str(target), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        count += 1
    return count


def atomic_folder(final: Path, build) -> Path:
    """Build a folder in a temporary sibling and rename it into place: never half a folder."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        build(staging)
        staging.rename(final)
    except OSError:
        if not final.exists():  # a concurrent builder won the race only if final now exists
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def local_model(name_or_path: str) -> str:
    """A model or tokenizer named by a URI, downloaded into ``<cache>/downloads/``; anything else
    as given (a folder, a hub id). The download is keyed by the URI and its files' sizes and
    modification times, so a model re-written at the same URI is fetched again, and actors on one
    node that ask together share one complete copy."""
    if not is_remote(name_or_path):
        return name_or_path
    fs, inner = filesystem(name_or_path)
    listing = sorted((relative, i.size, i.mtime_ns) for relative, i in _files(fs, inner))
    if not listing:
        raise FileNotFoundError(f"{name_or_path}: no files there (is it a model folder?)")
    digest = hashlib.sha256(repr((name_or_path, listing)).encode()).hexdigest()[:16]
    final = cache_dir() / "downloads" / f"{inner.rstrip('/').rsplit('/', 1)[-1]}-{digest}"
    return str(atomic_folder(final, lambda folder: pull(name_or_path, folder)))
