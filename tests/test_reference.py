"""The reference stage through a real 2-actor pool and a real on-disk cache."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dpo_ray.assets import tiny_model
from dpo_ray.config import DataConfig, Pool, ReferenceConfig, RunConfig, TrainConfig
from dpo_ray.models import load_causal_lm
from dpo_ray.reference.cache import STALE_ATTEMPT_S
from dpo_ray.reference import (
    CacheCorrupt, ReferenceCache, ReferenceScorer, cache_key, ensure_reference, forward_counts,
)
from helpers import write_jsonl

N_PAIRS = 256  # the first 256 real HH pairs (as the reference issue asks)


def direct_logps(model_path, rows):
    """Independent single-process computation: each sequence alone, unpadded, log_softmax+gather.

    log_softmax runs in float64 on the float32 logits: torch's float32 CPU log_softmax is biased by
    ~1e-5 per token (-9e-4 over a 100-token SmolLM2 response), far above our 1e-4 tolerance, while
    ``sequence_logps`` (logit - logsumexp) stays within ~1e-7 per token of float64.
    """
    model = load_causal_lm(str(model_path)).eval()
    out = {}
    with torch.inference_mode():
        for row in rows:
            values = []
            for side in ("chosen", "rejected"):
                ids = torch.tensor([list(row[f"{side}_input_ids"])])
                n = row["prompt_length"]
                # The full forward; log_softmax at the positions that predict response tokens
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0, n - 1:-1].double(), -1)
                targets = ids[0, n:]
                values.append(float(logprobs.gather(-1, targets[:, None]).sum()))
            out[row["pair_id"]] = values
    return out


def configs(data, model, cache, **data_kw):
    data_cfg = DataConfig(source=str(data), tokenizer=str(model), on_bad_row="skip", **data_kw)
    ref_cfg = ReferenceConfig(model=str(model), cache_dir=str(cache), batch_size=16, micro_batch_size=8,
                              pool=Pool(min_actors=2, max_actors=2, num_cpus_per_actor=0.5))
    return data_cfg, ref_cfg


def assert_matches_direct(result, model_path, n_expected):
    rows = result.dataset.take_all()
    assert len(rows) == n_expected == result.rows
    assert len({r["pair_id"] for r in rows}) == n_expected
    expected = direct_logps(model_path, rows)
    worst = 0.0
    for row in rows:
        exp_c, exp_r = expected[row["pair_id"]]
        worst = max(worst, abs(row["ref_chosen_logps"] - exp_c), abs(row["ref_rejected_logps"] - exp_r))
        assert row["chosen_response_tokens"] == row["chosen_length"] - row["prompt_length"]
    assert worst < 1e-4, f"max |pool - direct| = {worst}"


@pytest.fixture(scope="module")
def tiny_run(ray_session, hh_path, tiny_llama, tmp_path_factory):
    cache = tmp_path_factory.mktemp("refcache")
    data_cfg, ref_cfg = configs(hh_path, tiny_llama, cache, limit=N_PAIRS)
    before = forward_counts()
    result = ensure_reference(data_cfg, ref_cfg)
    after = forward_counts()
    scorers = {actor: pairs for actor, pairs in after["by_actor"].items() if actor not in before["by_actor"]}
    return data_cfg, ref_cfg, result, after["forwards"] - before["forwards"], scorers


def test_two_actor_pool_equals_direct_computation_tiny(tiny_run, tiny_llama):
    _, ref_cfg, result, forwards, scorers = tiny_run
    assert not result.cache_hit and forwards > 0
    # Both actors of the pool scored pairs (with one block in flight per actor, a block cannot
    # queue behind a busy actor while the other idles).
    assert ref_cfg.pool.max_actors == 2 and len(scorers) == 2 and sum(scorers.values()) == result.rows, scorers
    skipped = sum(result.data_report.skipped.values())  # row 87 of the first 256 is empty
    assert_matches_direct(result, tiny_llama, N_PAIRS - skipped)
    # Two actors finish blocks in any order, yet the cache holds the pairs in the source's row
    # order: a pool of another size writes the same order, and training batches follow it.
    source_rows = [row["source_row"] for row in result.dataset.take_all()]
    assert source_rows == sorted(source_rows)


def test_a_growable_pool_scores_a_few_pairs_on_every_actor(ray_session, hh_path, tiny_llama, tmp_path):
    """12 pairs, a pool of 1 to 2 actors: two blocks, one per actor from the start. (Ray Data's
    autoscaler grows a pool only while its actors are busy, and one actor took both blocks.)"""
    data_cfg, ref_cfg = configs(hh_path, tiny_llama, tmp_path, limit=12)
    ref_cfg = dataclasses.replace(ref_cfg, batch_size=64, pool=Pool(min_actors=1, max_actors=2,
                                                                     num_cpus_per_actor=0.5))
    before = forward_counts()["by_actor"]
    result = ensure_reference(data_cfg, ref_cfg, scorer_cls=SlowerScorer)
    scorers = {a: n for a, n in forward_counts()["by_actor"].items() if a not in before}
    assert len(scorers) == 2 and sum(scorers.values()) == result.rows == 12, scorers


def test_second_run_performs_zero_forward_passes(tiny_run):
    data_cfg, ref_cfg, first, _, _ = tiny_run
    before = forward_counts()
    again = ensure_reference(data_cfg, ref_cfg)
    assert forward_counts() == before  # counted on the cluster-wide counter, not timed
    assert again.cache_hit and again.key == first.key and again.rows == first.rows
    assert "reused" in again.summary()


def test_key_ignores_training_settings_and_tracks_everything_that_changes_values(
        tiny_run, smollm2, tmp_path):
    data_cfg, ref_cfg, first, _, _ = tiny_run
    key = lambda d=data_cfg, r=ref_cfg: cache_key(d, r)[0]  # noqa: E731
    # beta, learning rate (and the whole train section) are not inputs
    runs = [RunConfig(data=data_cfg, reference=ref_cfg, train=TrainConfig(beta=b, learning_rate=lr))
            for b, lr in ((0.1, 5e-7), (0.5, 1e-5))]
    assert key(runs[0].data, runs[0].reference) == key(runs[1].data, runs[1].reference) == first.key
    # ... nor is pool sizing
    assert key(r=ReferenceConfig(**{**ref_cfg.__dict__, "pool": Pool(max_actors=7), "batch_size": 3})) == first.key
    # max_length, weights, dtype, tokenizer and data all are
    changed = {
        "max_length": key(d=DataConfig(**{**data_cfg.__dict__, "max_length": 384})),
        "weights": key(r=ReferenceConfig(**{**ref_cfg.__dict__, "model": str(
            tiny_model(smollm2, tmp_path / "other-weights", seed=1))})),
        "dtype": key(r=ReferenceConfig(**{**ref_cfg.__dict__, "dtype": "bfloat16"})),
    }
    tok_dir = tmp_path / "tok"
    shutil.copytree(Path(data_cfg.tokenizer), tok_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    (tok_dir / "chat_template.jinja").write_text("{{ messages }}")
    changed["tokenizer"] = key(d=DataConfig(**{**data_cfg.__dict__, "tokenizer": str(tok_dir)}))
    lines = [json.loads(line) for line in __import__("gzip").open(data_cfg.source, "rt")][:N_PAIRS]
    lines[0]["chosen"] += " (edited)"
    changed["data"] = key(d=DataConfig(**{**data_cfg.__dict__, "source": str(
        write_jsonl(tmp_path / "edited.jsonl", lines))}))
    assert first.key not in changed.values() and len(set(changed.values())) == len(changed)


def test_changed_max_length_recomputes(tiny_run):
    data_cfg, ref_cfg, first, _, _ = tiny_run
    before = forward_counts()["forwards"]
    shorter = DataConfig(**{**data_cfg.__dict__, "max_length": 128, "max_prompt_length": 64,
                            "limit": 32})
    result = ensure_reference(shorter, ref_cfg)
    assert not result.cache_hit and result.key != first.key
    assert forward_counts()["forwards"] > before


class CrashingScorer(ReferenceScorer):
    """The real scorer, except that this actor process dies hard on its 2nd batch while a
    ``crash-once`` file sits beside the cache directory (removed first, so the restarted actor
    carries on)."""

    def __call__(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        marker = Path(self.cfg.cache_dir).parent / "crash-once"
        if self.calls == 2 and marker.exists():
            marker.unlink()
            os._exit(1)
        return super().__call__(batch)


class FailingScorer(ReferenceScorer):
    """Scores one batch, then raises on every later batch: a scoring run that cannot finish."""

    def __call__(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls > 1:
            raise RuntimeError("simulated scoring failure")
        return super().__call__(batch)


def entry_files(cache_dir, key):
    return sorted(p for p in (Path(cache_dir) / key).rglob("*.parquet"))


@pytest.mark.slow
def test_killed_actor_then_rerun_gives_complete_cache(ray_session, hh_path, tiny_llama, tmp_path):
    data_cfg, ref_cfg = configs(hh_path, tiny_llama, tmp_path / "cache", limit=64)
    key = cache_key(data_cfg, ref_cfg)[0]
    # 1. A run that fails part-way leaves no committed entry.
    with pytest.raises(Exception, match="simulated scoring failure"):
        ensure_reference(data_cfg, ref_cfg, scorer_cls=FailingScorer)
    assert ReferenceCache(ref_cfg.cache_dir).manifest(key) is None
    # 2. A leftover partial attempt (as a crash during the write would leave) is never read.
    partial = tmp_path / "cache" / key / "attempt-crashed"
    partial.mkdir(parents=True)
    (partial / "part-0.parquet").write_bytes(b"PAR1 truncated")
    young = tmp_path / "cache" / key / "attempt-still-running"  # a concurrent run's, in progress
    young.mkdir()
    stale = time.time() - STALE_ATTEMPT_S - 60
    os.utime(partial, (stale, stale))
    # 3. Rerun, with an actor killed after its first batch: Ray restarts it and retries.
    marker = tmp_path / "crash-once"
    marker.touch()
    result = ensure_reference(data_cfg, ref_cfg, scorer_cls=CrashingScorer)
    assert not marker.exists()  # the kill really happened
    rows = result.dataset.take_all()
    assert len(rows) == result.rows == result.data_report.pairs
    assert len({r["pair_id"] for r in rows}) == len(rows)
    assert not partial.exists()  # stale attempts are cleaned once an entry is committed
    assert young.exists()  # but never one that another run may still be writing
    manifest = ReferenceCache(ref_cfg.cache_dir).manifest(key)
    assert sum(f["rows"] for f in manifest["files"]) == len(rows)


@pytest.mark.slow
def test_smollm2_pool_equals_direct_computation(ray_session, hh_path, smollm2, tmp_path):
    # 32 pairs keep CI short on 2 cores; benchmarks/reference_scoring.py --check runs all 256.
    data_cfg, ref_cfg = configs(hh_path, smollm2, tmp_path / "cache", limit=32, max_length=256,
                                max_prompt_length=128)
    result = ensure_reference(data_cfg, ref_cfg)
    assert_matches_direct(result, smollm2, result.data_report.pairs)


def cli_run_yaml(ray_session, data, model, tmp_path, limit, extra="", pool="num_cpus_per_actor: 0.5"):
    """A run.yaml for ``dpo-ray`` subprocesses, and their environment (joined to this session's Ray)."""
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data:\n  source: {data}\n  tokenizer: {model}\n  limit: {limit}\n  on_bad_row: skip\n"
        f"reference:\n  model: {model}\n  cache_dir: {tmp_path / 'cache'}\n"
        f"  pool: {{{pool}}}\n{extra}")
    return config, dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)


def test_cli_reference_twice_reuses(ray_session, hh_path, tiny_llama, tmp_path):
    config, env = cli_run_yaml(ray_session, hh_path, tiny_llama, tmp_path, 16, "train:\n  beta: 0.1\n")

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "dpo_ray", "reference", "--config", str(config),
                               "--output", str(tmp_path / "out"), *extra], capture_output=True,
                              text=True, env=env, timeout=300)

    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    assert "reference cache computed" in first.stdout
    before = forward_counts()
    second = run("train.beta=0.5")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reference cache reused" in second.stdout and "(16 rows" in second.stdout
    assert forward_counts() == before
    written = json.loads((tmp_path / "out" / "reference.json").read_text())
    assert written["cache_hit"] and pq.read_table(written["path"] + "/" + json.loads(
        (Path(written["path"]) / "manifest.json").read_text())["files"][0]["path"]).num_rows > 0


def _manifest_path(ref_cfg, key):
    return Path(ref_cfg.cache_dir) / key / "manifest.json"


@pytest.mark.slow
def test_broken_manifests_are_set_aside_and_recomputed_never_stuck(ray_session, hh_path, tiny_llama,
                                                                    tmp_path):
    """Every kind of broken manifest is refused with its reason (checked on the cache directly,
    the good manifest put back after each); a run over one sets it aside, recomputes and
    commits, and the next run is a hit again."""
    data_cfg, ref_cfg = configs(hh_path, tiny_llama, tmp_path / "cache", limit=16)
    first = ensure_reference(data_cfg, ref_cfg)
    cache, manifest = ReferenceCache(ref_cfg.cache_dir), _manifest_path(ref_cfg, first.key)
    original = manifest.read_text()
    good = json.loads(original)
    broken = [("{not json", "not valid JSON"),
              (json.dumps({k: v for k, v in good.items() if k != "files"}), "lists no files"),
              (json.dumps({**good, "files": []}), "lists no files"),
              (json.dumps({**good, "files": [{"path": good["files"][0]["path"]}]}), "without path, rows")]
    for damage, why in broken:
        manifest.write_text(damage)
        with pytest.raises(CacheCorrupt, match=why):
            cache.load(first.key)
        manifest.write_text(original)
    manifest.write_text(broken[0][0])
    again = ensure_reference(data_cfg, ref_cfg)
    assert not again.cache_hit and "not valid JSON" in again.recomputed_because
    assert again.rows == first.rows
    assert ensure_reference(data_cfg, ref_cfg).cache_hit  # and the next run is a hit again
    assert len(list((tmp_path / "cache" / first.key).glob("manifest.corrupt-*.json"))) == 1


@pytest.mark.slow
def test_consistent_entry_over_too_few_pairs_is_not_a_hit(ray_session, hh_path, tiny_llama, tmp_path):
    from dpo_ray.reference.cache import _sha256_local, pair_ids_digest

    data_cfg, ref_cfg = configs(hh_path, tiny_llama, tmp_path / "cache", limit=64)
    first = ensure_reference(data_cfg, ref_cfg)
    # Rewrite the entry as 48 of its pairs, with a manifest that agrees with the files exactly.
    files = entry_files(ref_cfg.cache_dir, first.key)
    table = pa.concat_tables([pq.read_table(f) for f in files]).slice(0, 48)
    for f in files[1:]:
        f.unlink()
    pq.write_table(table, files[0])
    manifest = json.loads(_manifest_path(ref_cfg, first.key).read_text())
    rel = str(files[0].relative_to(Path(ref_cfg.cache_dir) / first.key))
    manifest.update(rows=48, pair_ids_sha256=pair_ids_digest(table.column("pair_id").to_pylist()),
                    files=[{"path": rel, "rows": 48, "bytes": files[0].stat().st_size,
                            "sha256": _sha256_local(files[0])}])
    _manifest_path(ref_cfg, first.key).write_text(json.dumps(manifest))
    ReferenceCache(ref_cfg.cache_dir).load(first.key)  # consistent in itself ...
    again = ensure_reference(data_cfg, ref_cfg)  # ... but not a cover of this data
    assert not again.cache_hit and again.rows == first.rows > 48
    assert f"holds 48 rows, 48 of the {first.rows} pairs" in again.recomputed_because


@pytest.mark.slow
def test_two_runs_scoring_one_cache_at_once_both_succeed(ray_session, hh_path, tiny_llama, tmp_path):
    config, env = cli_run_yaml(ray_session, hh_path, tiny_llama, tmp_path, 24,
                               "  batch_size: 8\n", pool="num_cpus_per_actor: 0.5, max_actors: 1")
    runs = [subprocess.Popen([sys.executable, "-m", "dpo_ray", "reference", "--config", str(config)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    outputs = [run.communicate(timeout=400) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
        assert "(24 rows" in out
        assert "reference cache computed" in out  # both scored: the commit race really ran
    key = next((tmp_path / "cache").iterdir()).name
    entry = ReferenceCache(str(tmp_path / "cache")).load(key)
    assert entry[1]["rows"] == 24 and len(set(entry[2])) == 24
    attempts = [p for p in (tmp_path / "cache" / key).iterdir() if p.name.startswith("attempt-")]
    assert len(attempts) == 1  # the run that lost the commit removed its own attempt


@pytest.mark.slow
def test_reader_keeps_its_files_while_the_entry_is_recommitted(ray_session, hh_path, tiny_llama,
                                                               tmp_path):
    data_cfg, ref_cfg = configs(hh_path, tiny_llama, tmp_path / "cache", limit=16)
    first = ensure_reference(data_cfg, ref_cfg)
    reader = first.dataset  # lazy: reads the committed files when consumed
    _manifest_path(ref_cfg, first.key).write_text("{not json")
    again = ensure_reference(data_cfg, ref_cfg)
    assert not again.cache_hit
    rows = reader.take_all()  # the old files are still there for a reader that was on them
    assert sorted(r["pair_id"] for r in rows) == sorted(r["pair_id"] for r in again.dataset.take_all())


class SlowScorer(ReferenceScorer):
    """The real scorer, slowed so that a SIGKILL from outside lands mid-pass."""

    DELAY_S = 1.0

    def __call__(self, batch):
        time.sleep(self.DELAY_S)
        return super().__call__(batch)


class SlowerScorer(SlowScorer):
    """A block takes longer than a second actor needs to start, as a real model's blocks do (a
    tiny model's first block is done before the other actor is up, and then it takes the second)."""

    DELAY_S = 5.0


@pytest.mark.slow
def test_scorer_killed_from_outside_gives_the_uninterrupted_values(ray_session, hh_path, tiny_llama,
                                                                  tmp_path):
    import signal
    import threading

    from helpers import own_ray_processes

    data_cfg, ref_cfg = configs(hh_path, tiny_llama, tmp_path / "plain", limit=64)
    plain = {r["pair_id"]: r for r in ensure_reference(data_cfg, ref_cfg).dataset.take_all()}
    ref_killed = ReferenceConfig(**{**ref_cfg.__dict__, "cache_dir": str(tmp_path / "killed")})
    killed = []

    def kill_one_scorer():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            procs = own_ray_processes("SlowScorer")
            if procs:
                time.sleep(1.5)  # let it finish a batch or so first
                for proc in own_ray_processes("SlowScorer")[:1]:
                    proc.send_signal(signal.SIGKILL)
                    killed.append(proc.pid)
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_one_scorer, daemon=True)
    watcher.start()
    result = ensure_reference(data_cfg, ref_killed, scorer_cls=SlowScorer)
    watcher.join(timeout=5)
    assert killed, "no scoring actor was killed"
    rows = result.dataset.take_all()
    assert len(rows) == len(plain) == result.rows and {r["pair_id"] for r in rows} == set(plain)
    for row in rows:
        for column in ("ref_chosen_logps", "ref_rejected_logps"):
            assert row[column] == pytest.approx(plain[row["pair_id"]][column], abs=1e-6)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {"truncate": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
          "flip a byte": _flip_a_byte, "delete": Path.unlink}


@pytest.mark.slow
def test_damaged_cache_files_are_detected_and_recomputed(ray_session, hh_path, tiny_llama, tmp_path):
    """Each kind of damage to a committed file fails verification, naming the file (and the file
    put back verifies again); a run over a damaged entry sets its manifest aside and recomputes.
    One entry serves every kind: a scoring pass costs ~9 s here, a verification milliseconds."""
    data_cfg, ref_cfg = configs(hh_path, tiny_llama, tmp_path / "cache", limit=16)
    first = ensure_reference(data_cfg, ref_cfg)
    cache = ReferenceCache(ref_cfg.cache_dir)
    victim = entry_files(ref_cfg.cache_dir, first.key)[0]
    original = victim.read_bytes()
    for damage in DAMAGE.values():
        damage(victim)
        with pytest.raises(CacheCorrupt, match=victim.name):
            cache.load(first.key)
        victim.write_bytes(original)
        cache.load(first.key)
    _flip_a_byte(victim)
    before = forward_counts()["forwards"]
    again = ensure_reference(data_cfg, ref_cfg)
    assert not again.cache_hit and forward_counts()["forwards"] > before
    assert victim.name in again.recomputed_because
    assert list((tmp_path / "cache" / first.key).glob("manifest.corrupt-*.json"))  # kept aside
    assert again.rows == first.rows == again.dataset.count()
    cache.load(first.key)  # the recomputed entry verifies
