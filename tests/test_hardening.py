"""Hostile input: every damaged file, odd row and bad setting ends as a named error (one line, no
traceback, exit 2) or a counted skip, and skip-mode counts always balance.

The file cases run twice: each file alone through the reader and tokenizer in this process (fast,
every case), and all of them together through the real Ray Data path in skip mode.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_ray import cli
from dpo_ray.config import DataConfig
from dpo_ray.data import prepare_pairs
from dpo_ray.data.errors import BAD_ROW_REASONS
from dpo_ray.data.sources import PreferenceFileDatasource
from dpo_ray.data.tokenize import PairTokenizer

from conftest import _missing

GOOD = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}


def _good(i: int) -> dict:
    return {"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No {i}."}


def _line(row) -> bytes:
    return json.dumps(row).encode()


def _jsonl(rows) -> bytes:
    return b"\n".join(_line(r) for r in rows) + b"\n"


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _chat(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def hostile_files() -> dict[str, tuple[bytes, int, set[str]]]:
    """name -> (content, good pairs it holds, reasons its bad rows must be counted under).
    Good rows carry distinct texts (a number per file), so no case is a duplicate of another."""
    many = _jsonl([_good(i) for i in range(400)])
    big = gzip.compress(many)
    conv = {"prompt": _chat(("user", "Hi")), "chosen": _chat(("assistant", "Hello!")),
            "rejected": _chat(("assistant", "Go away."))}
    cases = {
        # compression and naming
        "truncated.jsonl.gz": (big[: len(big) // 2], None, {"corrupt_file"}),
        "plain-named.jsonl.gz": (_jsonl([_good(1001), _good(1002)]), 2, set()),
        "gzip-named.jsonl": (gzip.compress(_jsonl([_good(1003)])), 1, set()),
        "UPPER.JSONL": (_jsonl([_good(1004)]), 1, set()),
        # encodings and line endings
        "bom.jsonl": (b"\xef\xbb\xbf" + _jsonl([_good(1005), _good(1006)]), 2, set()),
        "mixed-endings.jsonl": (_line(_good(1007)) + b"\r\n" + _line(_good(1008)) + b"\r"
                                + _line(_good(1009)) + b"\n", 3, set()),
        "bad-utf8.jsonl": (_line(_good(1010)) + b'\n{"prompt": "\xff\xfe", "chosen": "a", '
                           b'"rejected": "b"}\n', 1, {"encoding_error"}),
        "surrogate.jsonl": (_line(_good(1011)) + b'\n{"prompt": "\\ud800", "chosen": "a", '
                            b'"rejected": "b"}\n', 1, {"encoding_error"}),
        "deep.jsonl": (b"[" * 100_000 + b"]" * 100_000 + b"\n" + _line(_good(1012)) + b"\n", 1,
                       {"malformed_json"}),
        "empty.jsonl": (b"", 0, set()),
        "blank-lines.jsonl": (b"  \n\n\t\n", 0, set()),
        "not-objects.jsonl": (b"[1, 2]\n42\n" + _line(_good(1013)) + b"\n", 1, {"malformed_json"}),
        "nulls.jsonl": (_jsonl([{"prompt": None, "chosen": "a", "rejected": "b"},
                                {"prompt": "p", "chosen": None, "rejected": "b"}, _good(1014)]), 1,
                        {"missing_field"}),
        "long-prompt.jsonl": (_jsonl([{**_good(1015), "prompt": "word " * 5000}]), 1, set()),
        "one-token-response.jsonl": (_jsonl([{"prompt": "Yes or no?", "chosen": "Y",
                                              "rejected": "N"}]), 1, set()),
        "duplicate-across-files-a.jsonl": (_jsonl([_good(1016)]), 1, set()),
        "duplicate-across-files-b.jsonl": (_jsonl([_good(1016)]), 0, {"duplicate_pair"}),
        # CSV
        "unterminated.csv": (b"prompt,chosen,rejected\nQ 1017?,\"A,B\nQ2,C,D\n", 0,
                             {"malformed_csv"}),
        "ragged.csv": (b"prompt,chosen,rejected\nQ,A,B,extra\nQ,A\nQ 1018?,A 1018,B 1018\n", 1,
                       {"malformed_csv"}),
        "huge-field.csv": (b"prompt,chosen,rejected\n" + b"x" * 200_000 + b" 1019,A,B\n", 1, set()),
        "excel.csv": (b"\xef\xbb\xbfprompt,chosen,rejected\r\nQ 1020?,\"two\r\nlines\",B\r\n", 1,
                      set()),
        # JSON documents
        "array-with-junk.json": (json.dumps([_good(1021), 7, _good(1022)]).encode(), 2,
                                 {"malformed_json"}),
        "wrapped.json": (json.dumps({"data": [_good(1023)]}).encode(), 0, {"malformed_json"}),
        # Parquet
        "binary-columns.parquet": (_parquet(pa.table({
            "prompt": [b"Q 1024?", b"\xff"], "chosen": [b"A", b"B"], "rejected": [b"C", b"D"]})),
            1, {"encoding_error"}),
        "int-columns.parquet": (_parquet(pa.table({"prompt": [1], "chosen": [2], "rejected": [3]})),
                                0, {"wrong_type"}),
        "not-really.parquet": (b"PAR1 but not really", 0, {"corrupt_file"}),
        # conversational rows with odd shapes
        "chat-odd.jsonl": (_jsonl([
            {**conv, "chosen": _chat(("user", "Hello!"))},                      # user-role response
            {**conv, "prompt": _chat(("wizard", "Hi"))},                        # unknown role
            {"chosen": _chat(("user", "Hi"), ("assistant", "A"), ("user", "B")),
             "rejected": _chat(("user", "Hi"), ("assistant", "C"), ("user", "D"))},  # ends on user
            {**conv, "prompt": _chat(("user", "Hi"), ("user", "Hi again 1025"))},   # two user turns
            {**conv, "prompt": [{"role": "user", "content": [{"type": "text", "text": "Parts 1026"}]}]},
            {**conv, "prompt": [{"role": "user"}]},                             # missing content
            {**conv, "prompt": _chat(("user", "Hi 1027"), ("system", "Be brief."), ("user", "Ok?"))},
            {**conv, "prompt": []},                                             # empty prompt
            {**conv, "prompt": "Plain text prompt 1028"},
            {**conv, "chosen": [["assistant", "nested"]]},                      # wrong shape
        ]), 4, {"bad_roles", "no_assistant_turn", "wrong_type", "empty_prompt"}),
    }
    return cases


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    for name, (content, _, _) in hostile_files().items():
        (folder / name).write_bytes(content)
    (folder / "notes.txt").write_text("not data")  # an unknown type in a directory: listed
    return folder


def _read_and_tokenize(path, tokenizer_dir, **cfg):
    """One file through the datasource reader and the tokenizer, in this process."""
    config = DataConfig(source=str(path), tokenizer=str(tokenizer_dir), **cfg)
    reader = PreferenceFileDatasource([str(path)])
    with pa.OSFile(str(path), "rb") as f:
        tables = list(reader._read_stream(f, str(path)))
    if not tables:
        return []
    return PairTokenizer(config)(pa.concat_tables(tables)).to_pylist()


def test_every_hostile_file_reads_as_pairs_or_named_bad_rows(hostile_dir, smollm2):
    for name, (_, good, reasons) in hostile_files().items():
        rows = _read_and_tokenize(hostile_dir / name, smollm2)
        kept = [r for r in rows if r["skip_reason"] is None]
        seen = {r["skip_reason"] for r in rows if r["skip_reason"]}
        assert seen <= set(BAD_ROW_REASONS), (name, seen)
        for row in rows:  # every bad row says where and why
            assert row["source_row"] is not None and (row["skip_reason"] is None or row["skip_detail"])
        if good is not None and "duplicate" not in name:
            assert len(kept) == good, (name, [(r["source_row"], r["skip_detail"]) for r in rows])
        assert reasons - {"duplicate_pair"} <= seen, (name, seen)


def test_truncated_gzip_keeps_the_rows_before_the_cut_and_names_where(hostile_dir, smollm2):
    rows = _read_and_tokenize(hostile_dir / "truncated.jsonl.gz", smollm2)
    assert 0 < len(rows) < 401
    last = rows[-1]
    assert last["skip_reason"] == "corrupt_file" and "truncated" in last["skip_detail"]
    assert all(r["skip_reason"] is None for r in rows[:-1])  # the intact lines before the cut
    assert last["source_row"] == len(rows)


def test_all_hostile_files_together_through_ray_in_skip_mode(ray_session, hostile_dir, smollm2):
    pairs, report = prepare_pairs(DataConfig(source=str(hostile_dir), tokenizer=str(smollm2),
                                             on_bad_row="skip"))
    assert report.rows_read == report.pairs + sum(report.skipped.values())
    assert report.pairs == pairs.count() > 0
    expected = set().union(*(r for _, _, r in hostile_files().values()))
    assert expected <= set(report.skipped), (expected, report.skipped)
    assert [p.rsplit("/", 1)[-1] for p in report.ignored_files] == ["notes.txt"]
    assert "ignored 1 files of unknown type" in report.summary()


def _run_cli(capsys, *argv):
    started = time.monotonic()
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err, time.monotonic() - started


def _assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: "), err
    first = err.splitlines()[0]
    for fragment in fragments:
        assert fragment in first, (fragment, err)


@pytest.mark.parametrize("name, fragments", [
    ("truncated.jsonl.gz", ["truncated.jsonl.gz, row", "corrupt_file"]),
    ("bad-utf8.jsonl", ["bad-utf8.jsonl, row 2", "encoding_error"]),
    ("unterminated.csv", ["unterminated.csv, row 1", "malformed_csv"]),
    ("empty.jsonl", ["empty.jsonl", "no_rows"]),
    ("wrapped.json", ["wrapped.json, row 1", "malformed_json", "'data'"]),
])
def test_cli_names_file_row_and_reason_without_traceback(ray_session, hostile_dir, smollm2, capsys,
                                                         name, fragments):
    code, _, err, _ = _run_cli(capsys, "data", "--data", hostile_dir / name, "--tokenizer", smollm2)
    _assert_one_line_error(code, err, *fragments)


def test_skip_mode_with_nothing_left_says_so(ray_session, hostile_dir, smollm2, capsys, tmp_path):
    code, _, err, _ = _run_cli(capsys, "data", "--data", hostile_dir / "int-columns.parquet",
                               "--tokenizer", smollm2, "--output", tmp_path / "out",
                               "data.on_bad_row=skip")
    _assert_one_line_error(code, err, "no_pairs_left", "wrong_type=1")
    assert not list((tmp_path / "out").glob(".pairs.tmp-*"))


def test_skip_mode_writes_the_good_rows_and_balanced_counts(ray_session, hostile_dir, smollm2,
                                                           capsys, tmp_path):
    code, out, err, _ = _run_cli(capsys, "data", "--data", hostile_dir / "array-with-junk.json",
                                 "--tokenizer", smollm2, "--output", tmp_path / "out",
                                 "data.on_bad_row=skip", "--json")
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert (report["rows_read"], report["pairs"], report["skipped"]) == (3, 2, {"malformed_json": 1})
    assert pq.read_table(tmp_path / "out" / "pairs").num_rows == 2
    assert not list((tmp_path / "out").glob(".pairs.tmp-*"))


def test_unknown_extension_needs_file_format(ray_session, tmp_path, smollm2, capsys):
    txt = tmp_path / "pairs.txt"
    txt.write_bytes(_jsonl([GOOD]))
    code, _, err, _ = _run_cli(capsys, "data", "--data", txt, "--tokenizer", smollm2)
    _assert_one_line_error(code, err, "pairs.txt", "data.file_format")
    code, out, err, _ = _run_cli(capsys, "data", "--data", txt, "--tokenizer", smollm2,
                                 "data.file_format=jsonl")
    assert code == 0 and "read 1 rows -> 1 pairs" in out, err


def test_no_chat_template_is_a_named_row_error(ray_session, tmp_path, tiny_llama, capsys):
    from transformers import AutoTokenizer

    plain = tmp_path / "no-template"
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = None
    tok.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    data = tmp_path / "chat.jsonl"
    data.write_bytes(_jsonl([{"prompt": _chat(("user", "Hi")), "chosen": _chat(("assistant", "A")),
                              "rejected": _chat(("assistant", "B"))}]))
    code, _, err, _ = _run_cli(capsys, "data", "--data", data, "--tokenizer", plain)
    _assert_one_line_error(code, err, "chat.jsonl, row 1", "no_chat_template")


@pytest.mark.parametrize("override, fragment", [
    ("train.beta=0", "train.beta: Input should be greater than 0"),
    ("train.beta=-0.1", "train.beta"),
    ("train.learning_rate=0", "train.learning_rate"),
    ("train.learning_rate=-1e-5", "train.learning_rate"),
    ("train.per_device_train_batch_size=0", "train.per_device_train_batch_size"),
    ("train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps"),
    ("train.logging_steps=0", "train.logging_steps"),
    ("train.num_train_epochs=0", "train.num_train_epochs"),
    ("train.num_workers=0", "train.num_workers"),
    ("train.eval_fraction=1.5", "train.eval_fraction"),
    ("reference.pool.max_actors=0", "reference.pool.max_actors"),
    ("data.max_length=1", "data.max_length"),
])
def test_bad_settings_are_refused_before_ray_with_field_and_range(override, fragment, tmp_path,
                                                                  capsys):
    # No ray_session here: nothing may start Ray; the refusal comes from the config alone.
    code, _, err, took = _run_cli(capsys, "train", "--data", tmp_path / "x.jsonl", "--model",
                                  tmp_path / "m", override)
    _assert_one_line_error(code, err, fragment)
    assert took < 10


def test_missing_paths_and_bad_yaml_fail_before_ray(tmp_path, capsys, hh_path):
    bad_yaml = tmp_path / "run.yaml"
    bad_yaml.write_text("data:\n  source: [unclosed\n")
    code, _, err, _ = _run_cli(capsys, "train", "--config", bad_yaml)
    _assert_one_line_error(code, err, "run.yaml is not valid YAML")
    code, _, err, _ = _run_cli(capsys, "train", "--data", hh_path, "--model", tmp_path / "nope")
    _assert_one_line_error(code, err, "nope", "no such folder")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code, _, err, _ = _run_cli(capsys, "data", "--data", hh_path, "--tokenizer", tmp_path,
                               "--output", a_file / "out")
    _assert_one_line_error(code, err, "is a file, not a folder")


def test_impossible_gpu_request_fails_within_seconds(ray_session, tmp_path, tiny_llama, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(_jsonl([_good(i) for i in range(4)]))
    code, _, err, took = _run_cli(capsys, "train", "--data", data, "--model", tiny_llama,
                                  f"reference.cache_dir={tmp_path / 'cache'}",
                                  f"train.output_dir={tmp_path / 'runs'}", "train.use_gpu=true")
    _assert_one_line_error(code, err, "train workers needs 2 x", "no node has GPU")
    assert took < 30
    code, _, err, took = _run_cli(capsys, "reference", "--data", data, "--model", tiny_llama,
                                  f"reference.cache_dir={tmp_path / 'cache'}",
                                  "reference.pool.num_gpus_per_actor=1")
    _assert_one_line_error(code, err, "reference scorer actor pool", "GPU")
    assert took < 60


def test_more_workers_than_cpus_fails_and_names_the_count(ray_session):
    from dpo_ray.ray_env import ResourceUnavailable, check_resources

    cpus = int(ray_session.cluster_resources()["CPU"])
    with pytest.raises(ResourceUnavailable, match=f"needs {cpus + 1} x"):
        check_resources("train workers", {"CPU": 1}, cpus + 1)
    check_resources("train workers", {"CPU": 1}, cpus)  # exactly what is there: fine


def test_failed_run_without_checkpoint_does_not_block_its_retry(tmp_path):
    from dpo_ray.config import ReferenceConfig, RunConfig, TrainConfig
    from dpo_ray.training.trainer import _run_dir

    config = RunConfig(data=DataConfig(source="x", tokenizer="t"), reference=ReferenceConfig(model="m"),
                       train=TrainConfig(output_dir=str(tmp_path), run_name="r"))
    failed = tmp_path / "r"
    failed.mkdir()
    (failed / "config.yaml").write_text("from the failed attempt")
    assert _run_dir(config) == (failed, str(failed)) and not (failed / "config.yaml").exists()
    kept = list(tmp_path.glob("r.failed-*"))
    assert len(kept) == 1 and (kept[0] / "config.yaml").exists()  # moved aside, not deleted
    checkpoint = failed / "ray_train" / "checkpoint_1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "dpo_state.json").write_text('{"step": 1}')
    with pytest.raises(FileExistsError, match="train.resume=true"):
        _run_dir(config)  # a run with a checkpoint is never started over silently


@contextlib.contextmanager
def tmpfs(folder, options: str):
    """A real tmpfs mounted at ``folder`` for the test (a full or read-only disk), then unmounted.
    Mounting needs root, as CI and the developers' machines have; elsewhere the test is skipped,
    and under CI a refused mount is a failure (conftest's rule for missing inputs)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        _missing(f"a tmpfs mount ({mounted.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_full_disk_is_a_message_and_leaves_no_staging(ray_session, hh_path, smollm2, tmp_path, capsys):
    with tmpfs(tmp_path / "small-disk", "size=64k") as disk:
        code, _, err, _ = _run_cli(capsys, "data", "--data", hh_path, "--tokenizer", smollm2,
                                   "--output", disk / "out", "data.limit=60", "data.on_bad_row=skip")
        _assert_one_line_error(code, err, "cannot write pairs to", "No space left on device")
        assert not list((disk / "out").glob(".pairs.tmp-*"))


def test_local_head_is_not_mistaken_for_an_autoscaler(ray_session, monkeypatch):
    from dpo_ray.ray_env import _autoscaler_present

    assert not _autoscaler_present()  # a ray.init() head runs a read-only monitor only
    monkeypatch.setenv("DPO_RAY_AUTOSCALER", "1")
    assert _autoscaler_present()


def test_csv_cells_keep_their_crlf_and_parquet_bytes_decode(hostile_dir, smollm2):
    excel = _read_and_tokenize(hostile_dir / "excel.csv", smollm2)
    assert excel[0]["chosen"] == "two\r\nlines" and excel[0]["prompt"] == "Q 1020?"
    binary = _read_and_tokenize(hostile_dir / "binary-columns.parquet", smollm2)
    assert binary[0]["prompt"] == "Q 1024?" and binary[1]["skip_reason"] == "encoding_error"


def test_a_last_held_out_batch_smaller_than_the_world_leaves_some_ranks_nothing():
    import numpy as np

    from dpo_ray.training.loop import RankPairCollate

    one_pair = {"pair_id": np.array(["a" * 32]), "chosen_input_ids": np.array([[1, 2, 3]]),
                "rejected_input_ids": np.array([[1, 2, 4]]), "prompt_length": np.array([2]),
                "ref_chosen_logps": np.array([-1.0]), "ref_rejected_logps": np.array([-2.0])}
    assert RankPairCollate(1, 2, 1, pad_id=0)(one_pair) == []  # rank 1 of 2: no row, no crash
    (batch,) = RankPairCollate(0, 2, 1, pad_id=0)(one_pair)
    assert batch["chosen_input_ids"].tolist() == [[1, 2, 3]]


def test_main_job_refuses_bad_settings_in_one_line():
    import sys
    from pathlib import Path

    main_job = Path(__file__).resolve().parents[1] / "jobs" / "main.py"
    done = subprocess.run([sys.executable, str(main_job), "rounds=0", "samples_per_prompt=1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: invalid SentimentConfig") and "Traceback" not in done.stderr
    assert "rounds" in done.stderr and "samples_per_prompt" in done.stderr


def test_with_an_autoscaler_it_waits_with_messages_then_gives_up(ray_session, monkeypatch, capsys):
    from dpo_ray.config import Placement
    from dpo_ray.ray_env import ResourceUnavailable, check_resources

    monkeypatch.setenv("DPO_RAY_AUTOSCALER", "1")  # as on a cluster whose autoscaler may add GPUs
    with pytest.raises(ResourceUnavailable, match=r"waited \d+ s for the autoscaler"):
        check_resources("train workers", {"CPU": 1, "GPU": 1}, 2, Placement(wait_timeout_s=2))
    assert "waiting for train workers: 2 x {'CPU': 1.0, 'GPU': 1.0}, 0 fit now" in capsys.readouterr().out


def test_read_only_output_dir_is_a_message(ray_session, hh_path, smollm2, tmp_path, capsys):
    with tmpfs(tmp_path / "read-only", "ro,size=64k") as disk:
        code, _, err, took = _run_cli(capsys, "data", "--data", hh_path, "--tokenizer", smollm2,
                                      "--output", disk / "out")
        _assert_one_line_error(code, err, "--output=", "is not writable", "Read-only file system")
        assert took < 10  # refused before any data is read
