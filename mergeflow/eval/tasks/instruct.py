"""The instruction mixture: synthetic format-following tasks for instruction-tuning the small IT
base models, in the same prompt template as the evaluation tasks.

The paper's IT bases were tuned on Flan with the evaluation tasks removed; likewise no task here
shares a task or a category with a held-in or held-out task. The tasks teach the format (read an
instruction, pick one of a few short answers) on questions about the *form* of words and numbers,
never their meaning. Words are WordNet lemmas (the index files' words only, no glosses).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import datasets

from mergeflow.eval.tasks.base import FEATURES, format_prompt
from mergeflow.eval.tasks.lexical import wordnet_words

# A builder returns (text, right answer, wrong answers) for one example.
Build = Callable[[random.Random, list[str]], tuple[str, str, list[str]]]


@dataclass(frozen=True)
class MixtureTask:
    name: str
    category: str
    instruction: str
    build: Build = field(repr=False)


def larger_number(rng: random.Random, words: list[str]) -> tuple[str, str, list[str]]:
    first, second = rng.sample(range(1000), 2)
    return f"{first} or {second}", str(max(first, second)), [str(min(first, second))]


def alphabetical(rng: random.Random, words: list[str]) -> tuple[str, str, list[str]]:
    while True:
        first, second = rng.sample(words, 2)
        if first[0] != second[0]:  # the first letter decides: no long common prefixes to compare
            return f"{first}, {second}", min(first, second), [max(first, second)]


def longer_word(rng: random.Random, words: list[str]) -> tuple[str, str, list[str]]:
    while True:
        first, second = rng.sample(words, 2)
        if abs(len(first) - len(second)) >= 2:
            return f"{first}, {second}", max(first, second, key=len), [min(first, second, key=len)]


def first_letter(rng: random.Random, words: list[str]) -> tuple[str, str, list[str]]:
    word = rng.choice(words)
    others = [letter for letter in string.ascii_lowercase if letter != word[0]]
    return word, word[0], rng.sample(others, 3)


def repeated_word(rng: random.Random, words: list[str]) -> tuple[str, str, list[str]]:
    items = rng.sample(words, 4)
    if rng.random() < 0.5:
        items[rng.randrange(1, 4)] = items[0]
        rng.shuffle(items)
        return ", ".join(items), "yes", ["no"]
    return ", ".join(items), "no", ["yes"]


def count_items(rng: random.Random, words: list[str]) -> tuple[str, str, list[str]]:
    count = rng.randint(2, 6)
    wrong = [str(n) for n in range(1, 8) if n != count and abs(n - count) <= 2]
    return ", ".join(rng.sample(words, count)), str(count), rng.sample(wrong, min(3, len(wrong)))


MIXTURE_TASKS: dict[str, MixtureTask] = {
    task.name: task
    for task in (
        MixtureTask("larger_number", "number comparison", "Which number is larger?", larger_number),
        MixtureTask(
            "alphabetical", "alphabetical order", "Which word comes first alphabetically?", alphabetical
        ),
        MixtureTask("longer_word", "word length", "Which word is longer?", longer_word),
        MixtureTask("first_letter", "first letter", "What letter does this word start with?", first_letter),
        MixtureTask("repeated_word", "repetition", "Does a word appear twice in this list?", repeated_word),
        MixtureTask("count_items", "counting", "How many words are in this list?", count_items),
    )
}


@cache
def mixture_words() -> tuple[str, ...]:
    """Common nouns, verbs and adjectives of 3 to 10 letters."""
    words = {word for pos in ("noun", "verb", "adj") for word in wordnet_words(pos) if len(word) <= 10}
    return tuple(sorted(words))


def instruction_mixture(n: int, seed: int = 0) -> datasets.Dataset:
    """n examples cycling through MIXTURE_TASKS (so each gets n/6), deterministic for a seed."""
    rng = random.Random(f"instruction-mixture|{seed}")
    words = list(mixture_words())
    tasks = list(MIXTURE_TASKS.values())
    rows = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        text, answer, wrong = task.build(rng, words)
        position = rng.randrange(len(wrong) + 1)
        choices = [*wrong[:position], answer, *wrong[position:]]
        rows.append(
            {
                "id": f"mixture/{seed}/{i}/{task.name}",
                "prompt": format_prompt(task.instruction, text),
                "choices": [f" {choice}" for choice in choices],
                "label": position,
            }
        )
    return datasets.Dataset.from_list(rows, features=FEATURES)
