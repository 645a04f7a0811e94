"""What every task shares: the prompt template, the split rule and how choices are drawn.

A task's builder turns its source into `Item`s (one per underlying source item, named by `key`);
`build_splits` turns items into multiple-choice examples:

1. order items by sha256(key) (round-robin over answers first when the task is balanced), drop
   items whose prompt was already seen, then fill test (200), validation (100 to 300) and train
   (the rest, at most 2000) in that order: splits are disjoint in keys and prompts and never
   depend on the order the builder produced items in;
2. give each item its wrong choices, with a random generator seeded by (task, key), from the
   item's own candidates, else the task's fixed labels, else the answers of other items of the
   *same split* (so no test answer is ever a wrong choice in training);
3. put the right answer at a position dealt by a seeded shuffle of the split, equally often at
   every position, so always picking one position scores exactly at chance level.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets

from mergeflow.errors import DataError

TEST_SIZE = 200
# Validation grows from 100 to 300 examples with the items a full training split leaves over,
# never taking one from training. 100 examples tell accuracies apart only to about +-0.065 when
# comparing two models near chance (the zoo's gate: an expert must beat its base by 0.05); 300
# to about +-0.037.
MIN_VALIDATION_SIZE = 100
MAX_VALIDATION_SIZE = 300
MIN_TRAIN_SIZE = 50
MAX_TRAIN_SIZE = 2000
SPLITS = ("train", "validation", "test")
MAX_INPUT_WORDS = 40
MAX_ANSWER_WORDS = 12

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")),
        "label": datasets.Value("int64"),
    }
)


@dataclass(frozen=True)
class Item:
    """One source item as a question: `text` goes into the prompt, `answer` is the right choice
    (without the leading space)."""

    key: str  # names the source item, e.g. "wordnet:noun:02084071"; the split follows from it
    text: str
    answer: str
    pool: str = ""  # items of the same pool (and split) lend each other wrong answers
    exclude: frozenset[str] = frozenset()  # also right, so never a wrong choice (lowercase)
    candidates: tuple[str, ...] = ()  # the item's own wrong choices, when it has them


@dataclass(frozen=True)
class TaskSpec:
    name: str
    category: str  # distinct across held-in tasks; no held-out task shares one with a held-in task
    kind: Literal["held_in", "held_out"]
    source: str  # human-readable: package, version, file(s)
    instruction: str  # first line of every prompt
    description: str  # one or two sentences for the docs card
    build: Callable[[], list[Item]] = field(repr=False)
    num_choices: int = 4
    labels: tuple[str, ...] = ()  # a fixed answer set (classification); else answers vary
    balance: bool = False  # order items round-robin over answers, so splits are balanced


def format_prompt(instruction: str, text: str) -> str:
    """The one prompt template of every task and of the instruction mixture."""
    return f"{instruction}\n{text}\nAnswer:"


def normalize_space(text: str) -> str:
    return " ".join(text.split())


def truncate_words(text: str, limit: int = MAX_INPUT_WORDS) -> str:
    """At most `limit` words; a cut text ends in '...'. Short prompts keep evaluation fast."""
    words = text.split()
    return " ".join(words) if len(words) <= limit else " ".join(words[:limit]) + " ..."


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_plain_word(word: str) -> bool:
    """Lowercase letters only, 3+ of them: the words a task asks about or offers as choices."""
    return len(word) >= 3 and word.isascii() and word.isalpha() and word.islower()


def read_lines(path: Path, final_newline: bool = True) -> list[str]:
    """A source text file's lines (without '\\r'). A file that is missing, not UTF-8, holds a NUL
    byte, or (where the pinned file ends with one) lacks its final newline raises DataError
    naming the file and line."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(
            f"{path}: cannot read ({error.strerror}); delete {path.parent} to extract it again"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {error.start}); the file is corrupt") from None
    if not text:
        raise DataError(f"{path}:1: empty file")
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise DataError(f"{path}:{line}: NUL byte in a text file; the file is corrupt")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    elif final_newline:
        raise DataError(f"{path}:{len(lines)}: last line has no newline; the file is truncated")
    return [line.rstrip("\r") for line in lines]


def build_splits(spec: TaskSpec, items: Iterable[Item]) -> datasets.DatasetDict:
    dataset = {}
    for split, split_items in assign_splits(spec, items).items():
        pools = answer_pools(split_items)
        # A seeded shuffle deals each item a slot; position = slot mod its number of choices puts
        # the right answer equally often at every position, where independent draws would leave
        # e.g. 61/39 on 100 two-choice examples.
        slots = list(range(len(split_items)))
        random.Random(f"{spec.name}|{split}|positions").shuffle(slots)
        rows = [example(spec, item, pools, slot) for item, slot in zip(split_items, slots, strict=True)]
        dataset[split] = datasets.Dataset.from_list(rows, features=FEATURES)
    return datasets.DatasetDict({split: dataset[split] for split in SPLITS})


def assign_splits(spec: TaskSpec, items: Iterable[Item]) -> dict[str, list[Item]]:
    by_key: dict[str, Item] = {}
    for item in items:
        by_key.setdefault(item.key, item)  # one example per source item
    ordered = sorted(by_key.values(), key=lambda item: key_hash(item.key))
    if spec.balance:
        ordered = round_robin(ordered)
    unique: list[Item] = []
    seen: set[str] = set()
    for item in ordered:
        if item.text not in seen:  # the prompt is instruction + text: same text, same prompt
            seen.add(item.text)
            unique.append(item)
    needed = TEST_SIZE + MIN_VALIDATION_SIZE + MIN_TRAIN_SIZE
    if len(unique) < needed:
        raise DataError(
            f"task {spec.name}: {len(unique)} distinct examples from {spec.source}, need at least {needed}"
        )
    validation_end = TEST_SIZE + validation_size(len(unique))
    return {
        "test": unique[:TEST_SIZE],
        "validation": unique[TEST_SIZE:validation_end],
        "train": unique[validation_end : validation_end + MAX_TRAIN_SIZE],
    }


def validation_size(distinct: int) -> int:
    """Validation examples of a task with `distinct` usable items: what test and a full
    training split leave over, within [MIN_VALIDATION_SIZE, MAX_VALIDATION_SIZE]."""
    left_over = distinct - TEST_SIZE - MAX_TRAIN_SIZE
    return min(MAX_VALIDATION_SIZE, max(MIN_VALIDATION_SIZE, left_over))


def round_robin(items: list[Item]) -> list[Item]:
    """Interleave answers (each in hash order) so every prefix, and so every split, is balanced
    for as long as the rarest answer lasts."""
    queues: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        queues[item.answer].append(item)
    interleaved = []
    for rank in range(max(len(q) for q in queues.values())):
        interleaved += [queues[answer][rank] for answer in sorted(queues) if rank < len(queues[answer])]
    return interleaved


def answer_pools(split_items: list[Item]) -> dict[str, list[str]]:
    """Each pool's distinct answers in the split, sorted; "" holds the whole split's."""
    pools: dict[str, dict[str, str]] = defaultdict(dict)
    for item in split_items:
        pools[item.pool].setdefault(item.answer.lower(), item.answer)
        pools[""].setdefault(item.answer.lower(), item.answer)
    return {pool: sorted(answers.values()) for pool, answers in pools.items()}


def example(spec: TaskSpec, item: Item, pools: dict[str, list[str]], slot: int) -> dict:
    rng = random.Random(f"{spec.name}|{item.key}")  # per item: no other item changes its draw
    wanted = spec.num_choices - 1
    taken = {item.answer.lower()} | item.exclude
    if item.candidates:
        options = sorted(set(item.candidates))
    elif spec.labels:
        options = sorted(spec.labels)
    else:
        options = pools[item.pool]
        # A pool too small for every wrong choice borrows from the whole split.
        if len(options) - len(taken) < wanted:
            options = pools[""]
    # Sampling enough to survive removing every right answer keeps this O(choices), not O(split).
    drawn = rng.sample(options, min(len(options), wanted + len(taken)))
    wrong: list[str] = []
    for option in drawn:
        if option.lower() not in taken and len(wrong) < wanted:
            taken.add(option.lower())  # also no two wrong choices that differ only in case
            wrong.append(option)
    if not wrong:
        raise DataError(f"task {spec.name}: no wrong choice for {item.key} in {spec.source}")
    position = slot % (len(wrong) + 1)
    choices = [*wrong[:position], item.answer, *wrong[position:]]
    return {
        "id": f"{spec.name}/{item.key}",
        "prompt": format_prompt(spec.instruction, item.text),
        "choices": [f" {choice}" for choice in choices],
        "label": position,
    }
