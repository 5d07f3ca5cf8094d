"""What a person running a job sees: a line when a stage starts and one when it ends, and a
progress bar with an ETA while it runs. Ray's own output stays out of the console (see
``dpo_ray.ray_env.init_ray``) unless ``--verbose`` / ``DPO_RAY_VERBOSE=1``.

Actor pools report their progress to one small counter actor; a thread on the driver reads it and
draws a tqdm bar. On a terminal that is a live bar; in a log file (CI, ``ray job logs``) it is a
plain line every ``LOG_EVERY_S`` seconds and one at the end, so logs stay readable.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

VERBOSE_ENV = "DPO_RAY_VERBOSE"
LOG_EVERY_S = 15.0
_POLL_S = 0.5


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


@contextmanager
def stage(name: str, what: str) -> Iterator[None]:
    """``[name] what`` when the stage starts, ``[name] done in 12.3 s`` (or ``failed``) at its end."""
    print(f"[{name}] {what}", flush=True)
    started = time.perf_counter()
    try:
        yield
    except BaseException:
        print(f"[{name}] failed after {time.perf_counter() - started:.1f} s", flush=True)
        raise
    print(f"[{name}] done in {time.perf_counter() - started:.1f} s", flush=True)


class _Counts:
    """The counter actor: how many items each running bar has seen."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, key: str, n: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def get(self, key: str) -> int:
        return self.counts.get(key, 0)


_COUNTER: tuple = (None, None)  # (actor, the Ray job it belongs to)


def _counter():
    """One counter actor per driver, held here for the driver's lifetime: an actor lives as long
    as a handle to it does, so a per-bar handle would let it die under the next bar."""
    import ray

    global _COUNTER
    actor, job = _COUNTER
    current = ray.get_runtime_context().get_job_id()
    if actor is None or job != current:  # first use, or a new Ray session in this process
        actor = ray.remote(num_cpus=0)(_Counts).remote()
        _COUNTER = (actor, current)
    return actor


class Progress:
    """Handed to an actor pool's callable class (it pickles): ``add(n)`` after each batch."""

    def __init__(self, actor, key: str):
        self.actor, self.key = actor, key

    def add(self, n: int) -> None:
        self.actor.add.remote(self.key, n)  # fire and forget: never slows the batch down


class _Bar:
    """A tqdm bar on a terminal, else a line per ``LOG_EVERY_S`` and at the end."""

    def __init__(self, desc: str, total: int | None, unit: str):
        from tqdm import tqdm

        self.tty = sys.stdout.isatty()
        self.desc, self.total, self.unit, self.n = desc, total, unit, 0
        self.postfix = ""
        self.started = self.logged = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=sys.stdout,
                        dynamic_ncols=True) if self.tty else None

    def update(self, n: int, postfix: str = "", force: bool = False) -> None:
        self.postfix = postfix or self.postfix
        if self.bar is not None:
            self.bar.update(n - self.bar.n)
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
            return
        changed, self.n = n != self.n, n
        now = time.perf_counter()
        if force or (changed and now - self.logged >= LOG_EVERY_S):
            self.logged = now
            print(self.line(), flush=True)

    def line(self) -> str:
        from tqdm import tqdm

        meter = tqdm.format_meter(self.n, self.total, time.perf_counter() - self.started,
                                  prefix=self.desc, unit=f" {self.unit}", ncols=0)
        return meter + (f" {self.postfix}" if self.postfix else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(self.line(), flush=True)


@contextmanager
def progress(desc: str, total: int | None, unit: str) -> Iterator[Progress | None]:
    """A bar fed by actors: yields the ``Progress`` to pass to the pool's callable class.
    ``total`` None: counts and rate, no ETA (e.g. rows of files not yet read)."""
    import ray

    actor = _counter()
    handle = Progress(actor, f"{desc}-{uuid.uuid4().hex[:8]}")
    bar = _Bar(desc, total, unit)
    try:
        with _polling(lambda: bar.update(ray.get(actor.get.remote(handle.key)))):
            yield handle
    finally:
        bar.close()


@contextmanager
def _polling(poll) -> Iterator[None]:
    """``poll()`` every ``_POLL_S`` seconds on a thread while the block runs, and once after."""
    done = threading.Event()

    def loop() -> None:
        while not done.wait(_POLL_S):
            poll()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        poll()


def counted(dataset, bar: Progress):
    """``dataset`` with each block's rows reported to ``bar`` as they leave the pool before it
    (a zero-CPU step Ray Data fuses into that pool's operator; rows pass unchanged)."""
    return dataset.map_batches(_count_rows, fn_kwargs={"bar": bar}, batch_format=None,
                               batch_size=None, zero_copy_batch=True)


def _count_rows(batch, bar: Progress):
    bar.add(len(batch))
    return batch


@contextmanager
def follow_steps(metrics_file: str | Path, total_steps: int) -> Iterator[None]:
    """A bar over training steps, read from the ``metrics.jsonl`` rank 0 appends to (the
    workers' own output does not reach the console); loss and accuracy as its postfix. In object
    storage the file is the one rank 0 uploads after each logged step, read whole each time."""
    from dpo_ray import storage

    bar = _Bar("training", total_steps, "steps")
    remote = storage.is_remote(metrics_file)
    path = None if remote else storage.local_path(metrics_file)

    def tail(offset: int) -> bytes:
        """The file from byte ``offset`` on (a local file is read from there)."""
        if remote:
            return (storage.read_text(metrics_file) or "").encode()[offset:]
        if not path.exists():
            return b""
        with path.open("rb") as f:
            f.seek(offset)
            return f.read()

    offset = len(tail(0))  # a resumed run's old steps

    def read() -> None:
        nonlocal offset
        try:
            new = tail(offset)
        except OSError:  # a store that does not answer now is asked again at the next poll
            return
        complete = new[: new.rfind(b"\n") + 1]  # a line being written is read next time
        offset += len(complete)
        for line in complete.decode().splitlines():
            record = json.loads(line)
            postfix = f"loss {record['loss']:.4f}"
            if "rewards/accuracies" in record:
                postfix += f" acc {record['rewards/accuracies']:.2f}"
            if "eval_loss" in record:
                postfix += f" eval_loss {record['eval_loss']:.4f}"
            bar.update(int(record["step"]), postfix, force=not bar.tty)

    try:
        with _polling(read):
            yield
    finally:
        if bar.bar is not None:  # in a log every step was already a line of its own
            bar.close()
