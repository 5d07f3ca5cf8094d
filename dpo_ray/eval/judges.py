"""Judges: compare two responses to a prompt -> "a", "b" or "tie" (and scores where they exist).

Two shapes of judge, one interface (``compare``):
- score judges give each response a number (a lexicon, a reward model); the higher wins, a
  difference within ``tie_margin`` is a tie. Order cannot matter.
- pairwise judges see both responses (an LLM asked "A or B?", a user callable). Order can matter
  (position bias), so every pair is asked in both orders and only a verdict that survives the swap
  counts; disagreement is a tie. A judge that always picks whatever is shown first thus scores
  every pair a tie (win rate 0.5), not a win.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable

import torch

PAIRWISE_TEMPLATE = (
    "Which response answers the prompt better? Reply with one letter, A or B.\n\n"
    "Prompt:\n{prompt}\n\nResponse A:\n{first}\n\nResponse B:\n{second}")


def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return lambda prompt, response: analyzer.polarity_scores(response)["compound"]


def _textblob():
    from textblob import TextBlob

    return lambda prompt, response: TextBlob(response).sentiment.polarity


def _afinn():
    from afinn import Afinn

    afinn = Afinn()
    return lambda prompt, response: afinn.score(response)


# Positive sentiment of the response (the prompt is context only); `length` counts characters,
# a baseline that exposes length bias.
BUILTIN_FUNCTIONS: dict[str, Callable] = {
    "vader": _vader, "textblob": _textblob, "afinn": _afinn,
    "length": lambda: (lambda prompt, response: float(len(response))),
}


# The package behind each builtin lexicon, all in the [demo] extra.
BUILTIN_PACKAGES = {"vader": "vaderSentiment", "textblob": "textblob", "afinn": "afinn"}


def check_function_judges(judges) -> None:
    """Before any actor starts: a builtin lexicon judge whose package is missing is a
    ``ValueError`` that names the extra to install."""
    for judge in judges:
        package = BUILTIN_PACKAGES.get(judge.name) if judge.kind == "function" else None
        if package and importlib.util.find_spec(package) is None:
            raise ValueError(f"judge {judge.name!r} needs the {package} package: "
                             "pip install 'dpo-ray[demo]'")


def load_function(name: str) -> Callable:
    """A builtin's scorer, or ``module:attribute`` (an object importable on every node)."""
    if name in BUILTIN_FUNCTIONS:
        return BUILTIN_FUNCTIONS[name]()
    module, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(f"function judge {name!r}: use one of {sorted(BUILTIN_FUNCTIONS)} or "
                         "'module:callable'")
    return getattr(importlib.import_module(module), attr)


class Judge:
    """Base: ``compare(prompts, a, b)`` -> verdicts and per-order details, batched."""

    pairwise = False  # score judges override ``scores``; pairwise ones ``prefer``

    def __init__(self, tie_margin: float = 0.0):
        self.tie_margin = tie_margin

    def scores(self, prompts: list[str], responses: list[str]) -> list[float]:
        raise NotImplementedError

    def prefer(self, prompts: list[str], first: list[str], second: list[str]) -> list[str]:
        """"first" | "second" | "tie" for each pair, as shown (pairwise judges)."""
        raise NotImplementedError

    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> dict[str, list]:
        if not self.pairwise:
            score_a, score_b = self.scores(prompts, a), self.scores(prompts, b)
            verdicts = ["a" if sa - sb > self.tie_margin else "b" if sb - sa > self.tie_margin
                        else "tie" for sa, sb in zip(score_a, score_b)]
            return {"verdict": verdicts, "score_a": score_a, "score_b": score_b}
        a_first = self.prefer(prompts, a, b)  # "first" means a
        b_first = self.prefer(prompts, b, a)  # "first" means b
        verdicts = ["a" if (x, y) == ("first", "second") else "b" if (x, y) == ("second", "first")
                    else "tie" for x, y in zip(a_first, b_first)]
        return {"verdict": verdicts, "verdict_a_first": a_first, "verdict_b_first": b_first}


class FunctionJudge(Judge):
    """Any Python callable: (prompt, response) -> score, or (prompt, first, second) -> verdict."""

    def __init__(self, fn: Callable, tie_margin: float = 0.0):
        super().__init__(tie_margin)
        self.fn = fn
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY,
                                                                         p.POSITIONAL_OR_KEYWORD)]
        if len(params) not in (2, 3):
            raise ValueError(f"a function judge takes (prompt, response) or (prompt, first, second);"
                             f" {fn!r} takes {len(params)} arguments")
        self.pairwise = len(params) == 3

    def scores(self, prompts, responses):
        return [float(self.fn(p, r)) for p, r in zip(prompts, responses)]

    def prefer(self, prompts, first, second):
        out = [self.fn(p, x, y) for p, x, y in zip(prompts, first, second)]
        bad = {v for v in out if v not in ("first", "second", "tie")}
        if bad:
            raise ValueError(f"pairwise judge {self.fn!r} returned {sorted(map(str, bad))}; "
                             "expected 'first', 'second' or 'tie'")
        return out


class RewardModelJudge(Judge):
    """A Bradley-Terry reward model (``AutoModelForSequenceClassification``, one label) trained by
    ``train.objective=reward_model``. Sequences are built as in training: the prompt's tokens
    (with special tokens), then the response's, then EOS."""

    def __init__(self, path: str, tie_margin: float = 0.0, device: str = "cpu", batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from dpo_ray import storage

        super().__init__(tie_margin)
        path = storage.local_model(path)  # a reward model in object storage: this node's copy
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, use_safetensors=True).to(device).eval()
        self.device, self.batch_size = device, batch_size

    @torch.inference_mode()
    def score_ids(self, sequences: list[list[int]]) -> list[float]:
        from dpo_ray.logps import pad_sequences

        pad = self.model.config.pad_token_id
        out = []
        for start in range(0, len(sequences), self.batch_size):
            ids, mask = pad_sequences(sequences[start:start + self.batch_size], pad_id=pad)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            out.extend(logits[:, 0].double().cpu().tolist())
        return out

    def scores(self, prompts, responses):
        tok = self.tokenizer
        return self.score_ids([tok(p).input_ids + tok(r, add_special_tokens=False).input_ids
                               + [tok.eos_token_id] for p, r in zip(prompts, responses)])


class LLMJudge(Judge):
    """A causal LM asked ``template`` as a user turn; its verdict is whichever of the next tokens
    "A" / "B" it finds more likely (no free text to parse, deterministic)."""

    pairwise = True

    def __init__(self, path: str, template: str | None = None, device: str = "cpu", batch_size: int = 8):
        from transformers import AutoTokenizer

        from dpo_ray.models import load_causal_lm

        super().__init__()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = load_causal_lm(path, device=device).eval()
        self.template = template or PAIRWISE_TEMPLATE
        self.device, self.batch_size = device, batch_size
        self.letters = [self.tokenizer(x, add_special_tokens=False).input_ids[0] for x in ("A", "B")]

    def _prompt_ids(self, prompt: str, first: str, second: str) -> list[int]:
        text = self.template.format(prompt=prompt, first=first, second=second)
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                return_dict=True)["input_ids"]
        return self.tokenizer(text + "\nAnswer:").input_ids

    @torch.inference_mode()
    def prefer(self, prompts, first, second):
        from dpo_ray.logps import model_forward_logits, pad_sequences

        sequences = [self._prompt_ids(p, x, y) for p, x, y in zip(prompts, first, second)]
        out = []
        for start in range(0, len(sequences), self.batch_size):
            # Left padding: the next-token logits of every row sit at the last position.
            ids, mask = pad_sequences(sequences[start:start + self.batch_size], pad_id=0, side="left")
            logits = model_forward_logits(self.model, ids.to(self.device), mask.to(self.device))
            a, b = logits[:, -1, self.letters[0]], logits[:, -1, self.letters[1]]
            out.extend("first" if x > y else "second" if y > x else "tie"
                       for x, y in zip(a.tolist(), b.tolist()))
        return out


def build_judge(config, device: str = "cpu") -> Judge:
    """A ``JudgeConfig`` -> a judge (called inside each judge actor)."""
    if config.kind == "function":
        return FunctionJudge(load_function(config.name), config.tie_margin)
    if config.kind == "reward_model":
        return RewardModelJudge(config.name, config.tie_margin, device, config.batch_size)
    return LLMJudge(config.name, config.template, device, config.batch_size)
