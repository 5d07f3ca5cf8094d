"""The data stage through real Ray Data (datasource, actor pool) on real and written files."""

import json
import os
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_ray.config import DataConfig
from dpo_ray.data import PAIR_COLUMNS, BadRow, prepare_pairs, write_pairs
from helpers import write_jsonl

EXPLICIT = [
    {"prompt": "What is 2+2?", "chosen": " 4.", "rejected": " 5."},
    {"prompt": "Name a colour.", "chosen": " Blue.", "rejected": " Seven."},
    {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Rome."},
]


def config(source, tokenizer, **kw):
    return DataConfig(source=str(source), tokenizer=str(tokenizer), **kw)


@pytest.fixture(scope="module")
def hh_pairs(ray_session, hh_path, smollm2):
    pairs, report = prepare_pairs(config(hh_path, smollm2, on_bad_row="skip"))
    return pairs.to_pandas(), report


def test_all_real_hh_pairs_flow_through_ray_data(hh_pairs):
    frame, report = hh_pairs
    assert report.rows_read == 2312
    # The file's known defects (shared/data/README.md), each counted, none silent.
    assert report.skipped == {"empty_response": 4, "prompt_mismatch": 5}
    assert report.pairs == len(frame) == 2312 - 9
    assert report.formats == {"implicit": 2303}
    assert frame["pair_id"].is_unique
    skipped_rows = {ex["source_row"]: ex["reason"] for ex in report.skipped_examples}
    assert len(skipped_rows) == 9
    assert {row for row, why in skipped_rows.items() if why == "empty_response"} == {
        87, 517, 926, 1104}  # chosen answer is a lone space
    assert {1255, 1689, 1951} <= set(skipped_rows)  # "  Human:" turns inside a response
    # Truncation happened (HH prompts reach ~1,000 tokens) and is reported.
    assert report.prompt_truncated == int(frame["prompt_truncated"].sum()) > 0
    assert report.max_sequence_length <= 512


def test_hh_prompts_are_true_prefixes_and_responses_start_where_promised(hh_pairs, tokenizer):
    frame, _ = hh_pairs
    eos = tokenizer.eos_token_id
    for row in frame.itertuples():
        n = row.prompt_length
        prompt_ids = list(row.prompt_input_ids)
        assert list(row.chosen_input_ids[:n]) == prompt_ids == list(row.rejected_input_ids[:n])
        assert n <= 256 and len(row.chosen_input_ids) <= 512
        if not row.prompt_truncated:
            assert tokenizer.decode(prompt_ids) == row.prompt
        assert row.prompt.endswith("\n\nAssistant:")
        for side in ("chosen", "rejected"):
            ids, text = list(getattr(row, f"{side}_input_ids")), getattr(row, side)
            response = tokenizer.decode(ids[n:])
            if getattr(row, f"{side}_truncated"):
                assert text.startswith(response) and ids[-1] != eos
            else:
                assert response == text + tokenizer.eos_token


def test_hh_raise_mode_names_the_first_bad_row(ray_session, hh_path, smollm2):
    with pytest.raises(BadRow) as info:
        prepare_pairs(config(hh_path, smollm2, limit=200))
    err = info.value
    assert (err.source_row, err.reason) == (87, "empty_response")
    assert str(hh_path) in str(err) and "row 87" in str(err)


def test_every_file_format_gives_the_same_pairs(ray_session, smollm2, tmp_path):
    frame = pd.DataFrame(EXPLICIT)
    sources = {
        "jsonl": write_jsonl(tmp_path / "p.jsonl", EXPLICIT),
        "json": tmp_path / "p.json",
        "parquet": tmp_path / "p.parquet",
        "csv": tmp_path / "p.csv",
    }
    sources["json"].write_text(json.dumps(EXPLICIT))
    pq.write_table(pa.Table.from_pandas(frame), sources["parquet"])
    frame.to_csv(sources["csv"], index=False)
    results = {name: prepare_pairs(config(path, smollm2)) for name, path in sources.items()}
    results["DataFrame"] = prepare_pairs(config("unused", smollm2), source=frame)
    expected_ids = None
    for name, (pairs, report) in results.items():
        rows = sorted(pairs.take_all(), key=lambda r: r["source_row"])
        assert [r["source_row"] for r in rows] == [1, 2, 3], name
        assert report.formats == {"explicit": 3}, name
        ids = [(r["pair_id"], list(r["chosen_input_ids"])) for r in rows]
        assert expected_ids is None or ids == expected_ids, name
        expected_ids = ids


def test_conversational_jsonl_and_parquet_with_chat_template(ray_session, smollm2, tokenizer, tmp_path):
    convo = [
        {"prompt": [{"role": "user", "content": "Hi!"}],
         "chosen": [{"role": "assistant", "content": "Hello, how can I help?"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
         "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},
    ]
    jsonl = write_jsonl(tmp_path / "c.jsonl", convo)
    pq.write_table(pa.Table.from_pylist(convo[:1]), tmp_path / "c.parquet")
    pairs, report = prepare_pairs(config(jsonl, smollm2))
    assert report.formats == {"conversational": 2}
    for row in pairs.take_all():
        n = row["prompt_length"]
        assert tokenizer.decode(row["chosen_input_ids"][:n]) == row["prompt"]
        assert row["prompt"].endswith("<|im_start|>assistant\n")
        assert tokenizer.decode(row["chosen_input_ids"][n:]) == row["chosen"]
        assert row["chosen"].endswith("<|im_end|>")
    from_parquet, _ = prepare_pairs(config(tmp_path / "c.parquet", smollm2))
    first = min(pairs.take_all(), key=lambda r: r["source_row"])
    assert from_parquet.take_all()[0]["pair_id"] == first["pair_id"]


def test_directory_and_glob_sources_name_each_file(ray_session, smollm2, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", EXPLICIT[:2])
    write_jsonl(tmp_path / "b.jsonl", EXPLICIT[2:])
    for source in (tmp_path, tmp_path / "*.jsonl"):
        pairs, report = prepare_pairs(config(source, smollm2))
        assert report.pairs == 3
        files = sorted((os.path.basename(r["source_file"]), r["source_row"]) for r in pairs.take_all())
        assert files == [("a.jsonl", 1), ("a.jsonl", 2), ("b.jsonl", 1)]
    with pytest.raises(FileNotFoundError, match="no files match"):
        prepare_pairs(config(tmp_path / "*.parquet", smollm2))


# One line per bad-row kind. Line 1 and 2 are good pairs; the bad one is line 3.
BAD_ROWS = {
    "malformed_json": '{"prompt": "Q", "chosen": "a", ',
    "missing_field": json.dumps({"prompt": "Q", "chosen": "a"}),
    "wrong_type": json.dumps({"prompt": "Q", "chosen": ["a"], "rejected": "b"}),
    "empty_response": json.dumps({"prompt": "Q", "chosen": "a", "rejected": "   "}),
    "identical_responses": json.dumps({"prompt": "Q", "chosen": "Same.", "rejected": " Same. "}),
    "prompt_mismatch": json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: a",
                                   "rejected": "\n\nHuman: ho\n\nAssistant: b"}),
    "no_assistant_turn": json.dumps({"chosen": "plain text", "rejected": "other text"}),
    "no_room_for_response": json.dumps({"prompt": "word " * 40, "chosen": "a", "rejected": "b"}),
    "duplicate_pair": json.dumps(EXPLICIT[0]),  # the same pair as line 1
}
# No max_prompt_length, so a long prompt can fill max_length.
TIGHT = dict(max_length=24, max_prompt_length=None)


# Raise mode, one kind per place a row is judged: the reader (malformed_json), the tokenizer
# actors (missing_field) and the driver (duplicate_pair). Every kind's detection is checked by
# test_skip_mode_counts_every_kind below, and each rule by tests/test_formats.py.
@pytest.mark.parametrize("kind", ["malformed_json", "missing_field", "duplicate_pair"])
def test_each_bad_row_kind_raises_with_file_row_and_reason(ray_session, smollm2, tmp_path, kind):
    path = write_jsonl(tmp_path / f"{kind}.jsonl", EXPLICIT[:2], raw_lines={3: BAD_ROWS[kind]})
    with pytest.raises(BadRow) as info:
        prepare_pairs(config(path, smollm2, **TIGHT))
    message = str(info.value)
    assert str(path) in message and "row 3" in message and kind in message


def test_skip_mode_counts_every_kind(ray_session, smollm2, tmp_path):
    lines = {i: line for i, line in enumerate(BAD_ROWS.values(), start=4)}
    path = write_jsonl(tmp_path / "mixed.jsonl", EXPLICIT, raw_lines=lines)
    pairs, report = prepare_pairs(config(path, smollm2, on_bad_row="skip", **TIGHT))
    assert report.pairs == pairs.count() == 3
    assert report.rows_read == 3 + len(BAD_ROWS)
    assert report.skipped == {kind: 1 for kind in BAD_ROWS}
    assert {(ex["source_row"], ex["reason"]) for ex in report.skipped_examples} == {
        (row, kind) for row, kind in zip(lines, BAD_ROWS)}
    assert f"skipped {len(BAD_ROWS)} rows" in report.summary()


def test_write_pairs_parquet_contract(ray_session, smollm2, tmp_path):
    pairs, report = prepare_pairs(config(write_jsonl(tmp_path / "p.jsonl", EXPLICIT), smollm2))
    out = write_pairs(pairs, report, config(tmp_path / "p.jsonl", smollm2), tmp_path / "run")
    table = pq.read_table(out)
    assert table.column_names == PAIR_COLUMNS and table.num_rows == 3
    assert json.loads((tmp_path / "run" / "data_report.json").read_text())["pairs"] == 3
    assert "max_length: 512" in (tmp_path / "run" / "data_config.yaml").read_text()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".pairs.tmp")]


def _cli(args, ray_session):
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    return subprocess.run([sys.executable, "-m", "dpo_ray", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_data_writes_and_reports(ray_session, smollm2, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", EXPLICIT, raw_lines={2: "{oops"})
    bad = _cli(["data", "--data", str(src), "--tokenizer", str(smollm2)], ray_session)
    assert bad.returncode == 2
    assert f"{src}, row 2: malformed_json" in bad.stderr and "on_bad_row=skip" in bad.stderr
    ok = _cli(["data", "--data", str(src), "--tokenizer", str(smollm2), "--output",
               str(tmp_path / "out"), "data.on_bad_row=skip"], ray_session)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "read 4 rows -> 3 pairs" in ok.stdout and "malformed_json=1" in ok.stdout
    assert pq.read_table(tmp_path / "out" / "pairs").num_rows == 3
    typo = _cli(["data", "--data", str(src), "--tokenizer", str(smollm2), "data.max_lenght=3"],
                ray_session)
    assert typo.returncode == 2 and "max_lenght" in typo.stderr


def test_a_bare_hub_id_is_read_as_a_hub_dataset(ray_session, smollm2, tmp_path, monkeypatch):
    """``Anthropic/hh-rlhf`` with no local path of that name goes to ``datasets.load_dataset``
    (checked by the call, as there is no network here); a local folder of that name wins; a
    missing ``*.jsonl`` stays a missing file."""
    import datasets

    from dpo_ray.data.errors import PreferenceDataError
    from dpo_ray.preflight import check_data_source

    calls = []

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs["split"], kwargs["revision"]))
        return datasets.Dataset.from_list(EXPLICIT)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)
    hub = config("Anthropic/hh-rlhf", smollm2, hf_split="test", hf_revision="v1")
    check_data_source(hub.source, "data.source")  # preflight lets a hub id through
    pairs, report = prepare_pairs(hub)
    assert calls == [("Anthropic/hh-rlhf", "test", "v1")] and report.pairs == 3
    assert {row["source_file"] for row in pairs.take_all()} == {"hf://Anthropic/hh-rlhf:test"}
    # A local folder of that name is read as files, and the hub is not asked.
    (tmp_path / "Anthropic" / "hh-rlhf").mkdir(parents=True)
    write_jsonl(tmp_path / "Anthropic" / "hh-rlhf" / "pairs.jsonl", EXPLICIT[:2])
    assert prepare_pairs(hub)[1].pairs == 2 and len(calls) == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_data_source("data/pairs.jsonl", "data.source")

    def offline(path, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PreferenceDataError, match=r"no local file or folder 'org/missing' exists, "
                       r"so it was read as a hub id; datasets.load_dataset\('org/missing'"):
        prepare_pairs(config("org/missing", smollm2))
