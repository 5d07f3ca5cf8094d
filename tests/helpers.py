"""Small helpers shared by tests: writing preference files in each supported format."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    """Rows as JSON Lines; ``raw_lines`` {1-based line: text} inserts lines verbatim."""
    lines = [json.dumps(r) for r in rows]
    for lineno, text in sorted((raw_lines or {}).items()):
        lines.insert(lineno - 1, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def records_batch(rows: list[dict], source_file: str = "mem.jsonl") -> pa.Table:
    """A ``RECORD_SCHEMA`` batch as the datasource would emit it (for calling PairTokenizer)."""
    from dpo_ray.data.sources import _canonical, _records_table

    return _records_table(source_file, [(i, _canonical(r), None) for i, r in enumerate(rows, 1)])


def own_ray_processes(fragment: str) -> list:
    """Processes whose command line contains ``fragment`` and that this test session's Ray
    started (descendants of its raylet): a test must never touch another Ray on the machine."""
    import psutil
    import ray
    from ray._private import ray_constants

    node = ray._private.worker._global_node
    raylets = {p.process.pid for p in node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]}
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if not any(fragment in part for part in proc.info["cmdline"] or []):
            continue
        try:
            if raylets & {parent.pid for parent in proc.parents()}:
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found
