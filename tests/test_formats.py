"""Format detection and validation on plain dicts (no Ray, no tokenizer)."""

import json

import pytest

from dpo_ray.config import DataConfig
from dpo_ray.data.errors import BadRow
from dpo_ray.data.tokenize import extract_pair

CFG = DataConfig(source="unused", tokenizer="unused")


def pair(row, **overrides):
    cfg = CFG if not overrides else DataConfig(source="x", tokenizer="y", **overrides)
    return extract_pair(json.dumps(row), None, cfg)


def reason(row, **overrides):
    with pytest.raises(BadRow) as info:
        pair(row, **overrides)
    return info.value.reason


def test_explicit():
    p = pair({"prompt": "Q?", "chosen": " yes", "rejected": " no"})
    assert (p.format, p.prompt, p.chosen, p.rejected) == ("explicit", "Q?", " yes", " no")


def test_implicit_prompt_is_shared_prefix_through_last_assistant_marker():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: like this"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: go away"
    p = pair({"chosen": chosen, "rejected": rejected})
    assert p.format == "implicit"
    assert p.prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"
    assert (p.chosen, p.rejected) == (" like this", " go away")
    assert p.prompt + p.chosen == chosen and p.prompt + p.rejected == rejected


def test_conversational_prompt_plus_responses_and_whole_conversations_agree():
    user = [{"role": "user", "content": "hi"}]
    a, b = [{"role": "assistant", "content": "hello"}], [{"role": "assistant", "content": "bye"}]
    split = pair({"prompt": user, "chosen": a, "rejected": b})
    whole = pair({"chosen": user + a, "rejected": user + b})
    assert split.format == whole.format == "conversational"
    assert (split.prompt, split.chosen, split.rejected) == (whole.prompt, whole.chosen, whole.rejected)
    assert split.pair_id == whole.pair_id  # same content, same id


def test_pair_id_is_stable_and_content_addressed():
    row = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    assert pair(row).pair_id == pair(dict(reversed(list(row.items())))).pair_id
    assert pair(row).pair_id != pair({**row, "chosen": "c"}).pair_id
    assert len(pair(row).pair_id) == 32


def test_format_override_and_custom_columns():
    row = {"question": "Q", "good": "a", "bad": "b"}
    p = pair(row, format="explicit", prompt_column="question", chosen_column="good",
             rejected_column="bad")
    assert (p.prompt, p.chosen, p.rejected) == ("Q", "a", "b")


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "Q", "chosen": "a"}, "missing_field"),
    ({"prompt": "Q", "chosen": 5, "rejected": "b"}, "wrong_type"),
    ({"prompt": ["not a message"], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "wrong_type"),
    ({"prompt": "Q", "chosen": "  \n", "rejected": "b"}, "empty_response"),
    ({"prompt": "Q", "chosen": "same  answer", "rejected": "same answer\n"}, "identical_responses"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: ho\n\nAssistant: b"},
     "prompt_mismatch"),
    ({"chosen": "just text", "rejected": "\n\nHuman: x\n\nAssistant: y"}, "no_assistant_turn"),
    ({"chosen": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "v"}, {"role": "assistant", "content": "b"}]},
     "prompt_mismatch"),
])
def test_bad_rows_have_a_reason(row, expected):
    assert reason(row) == expected


def test_unparsed_line_is_malformed_json():
    with pytest.raises(BadRow) as info:
        extract_pair(None, "malformed JSON: Expecting value", CFG)
    assert info.value.reason == "malformed_json"
