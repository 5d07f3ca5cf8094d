"""Tokenization rules with the real SmolLM2 tokenizer and chat template (docs: data/tokenize.py).

``PairTokenizer`` is called directly on record batches here; the Ray path is in test_pipeline.py.
"""

import pytest

from dpo_ray.config import DataConfig
from dpo_ray.data.errors import BadRow
from dpo_ray.data.tokenize import PairTokenizer, render_conversation, truncate_pair
from helpers import records_batch

USER = [{"role": "user", "content": "Say something nice."}]
GOOD = [{"role": "assistant", "content": "You are wonderful."}]
BAD = [{"role": "assistant", "content": "No."}]


def tokenize(tokenizer_path, rows, **cfg):
    config = DataConfig(source="mem", tokenizer=str(tokenizer_path), **cfg)
    return PairTokenizer(config)(records_batch(rows)).to_pylist()


def test_response_starts_after_prompt_and_eos_appended_once(smollm2, tokenizer):
    row = tokenize(smollm2, [{"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}])[0]
    eos = tokenizer.eos_token_id
    for side in ("chosen", "rejected"):
        ids = row[f"{side}_input_ids"]
        assert ids[: row["prompt_length"]] == row["prompt_input_ids"]  # true prefix
        assert ids[-1] == eos and ids[-2] != eos  # exactly one EOS at the end
        assert len(ids) == row[f"{side}_length"]
        assert tokenizer.decode(ids[row["prompt_length"]:]) == row[side] + tokenizer.eos_token
    assert row["prompt_length"] == len(tokenizer("Q: 2+2?\nA:")["input_ids"])


def test_response_already_ending_with_eos_is_not_doubled(smollm2, tokenizer):
    row = tokenize(smollm2, [{"prompt": "Q", "chosen": " yes<|im_end|>", "rejected": " no"}])[0]
    assert row["chosen_input_ids"][-2:] != [tokenizer.eos_token_id] * 2
    assert row["chosen_input_ids"][-1] == tokenizer.eos_token_id


def test_conversational_uses_chat_template_and_prompt_is_token_prefix(smollm2, tokenizer):
    row = tokenize(smollm2, [{"prompt": USER, "chosen": GOOD, "rejected": BAD}])[0]
    expected_prompt = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert row["prompt"] == expected_prompt
    assert row["chosen"] == "You are wonderful.<|im_end|>"
    full = tokenizer.apply_chat_template(USER + GOOD, tokenize=False)
    assert (row["prompt"] + row["chosen"]).strip() == full.strip()
    ids = row["chosen_input_ids"]
    assert ids[: row["prompt_length"]] == row["prompt_input_ids"]
    assert tokenizer.decode(ids) == row["prompt"] + row["chosen"]
    assert ids.count(tokenizer.eos_token_id) == 3  # system, user and assistant turns; no extra EOS
    assert ids[-1] == tokenizer.eos_token_id


def test_no_double_bos_when_template_and_tokenizer_both_add_one(smollm2, tmp_path):
    from transformers import AutoTokenizer

    # A tokenizer that prepends BOS on its own, while SmolLM2's chat template also starts with
    # the BOS token (<|im_start|>): the classic double-BOS set-up.
    bos_tok = AutoTokenizer.from_pretrained(smollm2, add_bos_token=True)
    assert bos_tok("hi")["input_ids"][0] == bos_tok.bos_token_id
    bos_tok.save_pretrained(tmp_path)
    bos = bos_tok.bos_token_id
    chat = tokenize(tmp_path, [{"prompt": USER, "chosen": GOOD, "rejected": BAD}])[0]
    text = tokenize(tmp_path, [{"prompt": "<|im_start|>user\nhi", "chosen": "a", "rejected": "b"}])[0]
    for row in (chat, text):
        assert row["prompt_input_ids"][0] == bos and row["prompt_input_ids"][1] != bos


def test_truncation_cuts_prompt_left_keeping_bos_then_responses_right():
    prompt, response = [1, 10, 11, 12, 13, 14], [20, 21, 22, 23, 2]
    kept_prompt, kept_response, prompt_cut, response_cut = truncate_pair(
        prompt, response, max_length=7, max_prompt_length=4, bos_id=1)
    assert kept_prompt == [1, 12, 13, 14]  # BOS + the last 3: the end of the prompt survives
    assert kept_response == [20, 21, 22]  # cut from the right to fill 7 - 4 = 3
    assert prompt_cut and response_cut
    assert truncate_pair([5, 6], [7, 2], 10, 4, 1) == ([5, 6], [7, 2], False, False)
    with pytest.raises(BadRow, match="no room"):
        truncate_pair([5, 6, 7], [8], max_length=3, max_prompt_length=None, bos_id=None)


def test_a_chat_prompt_is_cut_at_a_turn_boundary_not_behind_an_orphaned_header(smollm2, tokenizer):
    """SmolLM2's BOS is <|im_start|>, which also opens every turn: a cut keeps whole turns."""
    messages = [{"role": "user", "content": "Tell me a long story about " + "dragons " * 30},
                {"role": "assistant", "content": "Once upon a time " + "there was fire. " * 20},
                {"role": "user", "content": "Shorter please."}]
    row = tokenize(smollm2, [{"chosen": messages + [{"role": "assistant", "content": "Ok."}],
                              "rejected": messages + [{"role": "assistant", "content": "No."}]}],
                   max_length=128, max_prompt_length=40)[0]
    assert row["prompt_truncated"]
    text = tokenizer.decode(row["prompt_input_ids"])
    assert text.startswith("<|im_start|>user\nShorter please.<|im_end|>"), text
    assert text.endswith("<|im_start|>assistant\n")
    # Not even the last turn fits: a plain left cut, with no header in front of it.
    assert truncate_pair([1, 5, 6, 1, 7, 8, 9, 10], [2], 20, 3, 1)[0] == [8, 9, 10]
    assert truncate_pair([1, 5, 6, 1, 7, 8], [2], 20, 3, 1)[0] == [1, 7, 8]


def test_truncation_is_counted_per_side(smollm2):
    long_answer = " word" * 40
    row = tokenize(smollm2, [{"prompt": "x " * 30, "chosen": long_answer, "rejected": " short"}],
                   max_length=24, max_prompt_length=8)[0]
    assert row["prompt_truncated"] and row["chosen_truncated"] and not row["rejected_truncated"]
    assert row["prompt_length"] == 8 and row["chosen_length"] == 24
    assert row["chosen_input_ids"][-1] != 2  # a cut response does not end in EOS


def test_template_that_is_not_prefix_preserving_is_rejected(tokenizer):
    import copy

    odd = copy.deepcopy(tokenizer)
    # Renders differently depending on whether an assistant message follows.
    odd.chat_template = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}"
                         "{% if messages|length > 1 %}!{% endif %}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    with pytest.raises(BadRow, match="template_not_prefix"):
        render_conversation(odd, USER, GOOD)


def test_bad_row_is_emitted_with_its_reason_and_place(smollm2):
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "Q", "chosen": "a"}]
    good, bad = tokenize(smollm2, rows)
    assert good["skip_reason"] is None and good["chosen_input_ids"]
    assert (bad["source_file"], bad["source_row"], bad["skip_reason"]) == (
        "mem.jsonl", 2, "missing_field")
    assert "'rejected'" in bad["skip_detail"] and bad["chosen_input_ids"] is None
