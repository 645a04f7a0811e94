"""The log-likelihood scorer against a naive per-choice computation, a model with a known
answer, and the paper's normalisation on hand-computed numbers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import random_llama

from mergeflow.errors import DataError
from mergeflow.eval.metrics import TaskInfo, normalise, summary
from mergeflow.eval.scoring import accuracy, choice_logprobs, encode
from mergeflow.zoo.tokenizer import train_tokenizer

TEXTS = [
    "the movie was wonderful and the acting was great",
    "the service was terrible and the food was cold",
    "Answer: positive negative neutral yes no maybe Paris London Berlin",
    "Which city is the capital of France? Answer: Paris",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def llama(tokenizer):
    return random_llama(len(tokenizer)).eval()


def naive_logprob(model, tokenizer, prompt: str, choice: str) -> float:
    """One unbatched forward per choice over the full vocabulary."""
    prompt_ids, choice_ids = encode(tokenizer, prompt), encode(tokenizer, choice)
    ids = torch.tensor([prompt_ids + choice_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(logprobs[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(choice_ids))


MIXED_PROMPTS = [
    "Sentiment of: the movie was wonderful\nAnswer:",
    "Capital?\nAnswer:",
    "Which city is the capital of France? the acting was great and the food was cold\nAnswer:",
]
# One instruction in front of every prompt, as in a task: its tokens are run once and cached.
SHARED_PROMPTS = [
    "Which city is the capital of France?\nthe movie was wonderful\nAnswer:",
    "Which city is the capital of France?\nAnswer:",
    "Which city is the capital of France?\nthe acting was great and the food was cold\nAnswer:",
]


@pytest.mark.parametrize("prompts", [MIXED_PROMPTS, SHARED_PROMPTS], ids=["mixed", "shared-instruction"])
def test_batched_scores_equal_naive_per_choice_scores(llama, tokenizer, prompts):
    choices = [
        [" positive", " negative"],  # likely single tokens: one forward scores both
        [" Paris", " London Berlin", " maybe no"],  # multi-token choices
        [" yes", " no", " the service was terrible"],
    ]
    expected = [
        [naive_logprob(llama, tokenizer, p, option) for option in options]
        for p, options in zip(prompts, choices, strict=True)
    ]
    # One row per batch, and all rows in one padded batch.
    for budget in (40, 4096):
        scores = choice_logprobs(llama, tokenizer, prompts, choices, max_batch_tokens=budget)
        for got, want in zip(scores, expected, strict=True):
            assert got == pytest.approx(want, abs=1e-4)


class BigramLM(torch.nn.Module):
    """Next-token logits depend only on the current token: a model whose answer is known."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.embed = torch.nn.Embedding.from_pretrained(torch.eye(table.shape[0]))
        self.lm_head = torch.nn.Linear(table.shape[0], table.shape[1], bias=False)
        self.lm_head.weight.data = table.T.clone()
        self.model = lambda input_ids, **_: SimpleNamespace(last_hidden_state=self.embed(input_ids))


def test_scorer_picks_the_known_answer(tokenizer):
    vocab = len(tokenizer)
    colon = encode(tokenizer, "Answer:")[-1]
    paris = encode(tokenizer, " Paris")
    assert len(paris) == 1
    table = torch.zeros(vocab, vocab)
    table[colon, paris[0]] = 5.0  # after ':' the model strongly prefers " Paris"
    model = BigramLM(table)
    dataset = {
        "prompt": ["Capital of France?\nAnswer:", "Capital of France?\nAnswer:"],
        "choices": [[" London", " Paris"], [" Paris", " London"]],
        "label": [1, 0],
    }
    assert accuracy(model, tokenizer, dataset) == 1.0
    scores = choice_logprobs(model, tokenizer, dataset["prompt"], dataset["choices"])
    expected_paris = 5.0 - math.log(math.exp(5.0) + vocab - 1)
    assert scores[0][1] == pytest.approx(expected_paris, abs=1e-5)
    dataset["label"] = [0, 1]
    assert accuracy(model, tokenizer, dataset) == 0.0


def test_an_empty_choice_is_a_clear_error(llama, tokenizer):
    with pytest.raises(DataError, match="encodes to no tokens"):
        choice_logprobs(llama, tokenizer, ["Q\nAnswer:"], [[" yes", ""]])


TASKS = {
    "sentiment": TaskInfo("sentiment", "held_in"),
    "qa": TaskInfo("closed-book QA", "held_in"),
    "completion": TaskInfo("sentence completion", "held_out"),
}


def test_normalisation_divides_held_in_by_the_expert_and_held_out_by_the_base():
    raw = {
        ("base", "sentiment"): 0.5,
        ("base", "qa"): 0.25,
        ("base", "completion"): 0.4,
        ("expert-sentiment", "sentiment"): 0.9,
        ("expert-qa", "qa"): 0.5,
        ("merged", "sentiment"): 0.81,
        ("merged", "qa"): 0.45,
        ("merged", "completion"): 0.5,
    }
    table = normalise(raw, TASKS, base="base", experts={"sentiment": "expert-sentiment", "qa": "expert-qa"})
    merged = table[table.model == "merged"].set_index("task")
    assert merged.loc["sentiment", "normalised"] == pytest.approx(0.9)
    assert merged.loc["qa", "normalised"] == pytest.approx(0.9)
    assert merged.loc["completion", "normalised"] == pytest.approx(1.25)
    assert list(merged.loc["completion", ["category", "kind"]]) == ["sentence completion", "held_out"]
    assert table[table.model == "expert-qa"].normalised.item() == pytest.approx(1.0)
    headline = summary(table)
    assert headline.loc["merged", ("normalised", "held_in")] == pytest.approx(0.9)
    assert headline.loc["merged", ("normalised", "held_out")] == pytest.approx(1.25)


def test_normalisation_names_the_missing_reference():
    with pytest.raises(DataError, match="needs the score of base on completion"):
        normalise({("merged", "completion"): 0.5}, TASKS, base="base", experts={})
    with pytest.raises(DataError, match="held-in task 'qa' has no expert"):
        normalise({("merged", "qa"): 0.5}, TASKS, base="base", experts={})
