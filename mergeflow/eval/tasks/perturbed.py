"""Tasks on VADER's edited sentences (movie and product reviews, news) where half the sentences
are left as written and half get a seeded edit: their words shuffled (word_order) or three of
their words misspelled (spelling). Both held-in.

Tweets are left out: their spelling and word order are too often irregular as written. Which
sentences are edited, and how, follows from each sentence's key alone, so items never depend
on the order they are built in.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from mergeflow.eval.tasks.base import MAX_INPUT_WORDS, Item, key_hash
from mergeflow.eval.tasks.sentiment import ratings

CORPORA = ("movie", "amazon", "nyt")
MIN_WORDS = 6
MISSPELLED_WORDS = 3
# A word we misspell: letters only and long enough to keep its first and last letters in place.
MIN_MISSPELLED_LENGTH = 5


def _sentences() -> Iterator[tuple[str, list[str]]]:
    for corpus in CORPORA:
        for row_id, _, text in ratings(corpus):
            # Without its final mark, a shuffled sentence does not show a '.' in its middle.
            words = text.rstrip(".!?").split()
            if MIN_WORDS <= len(words) <= MAX_INPUT_WORDS:
                yield f"vader:{corpus}:{row_id}", words


def _edited(key: str) -> bool:
    return int(key_hash(key)[:8], 16) % 2 == 1


def word_order_items() -> list[Item]:
    """A sentence as written ("yes"), or its words in a seeded shuffle ("no")."""
    items = []
    for key, words in _sentences():
        if len(set(words)) < 2:
            continue  # no shuffle can change it
        if not _edited(key):
            items.append(Item(key=key, text=" ".join(words), answer="yes"))
            continue
        rng = random.Random(f"word_order|{key}")
        shuffled = list(words)
        while shuffled == words:
            rng.shuffle(shuffled)
        items.append(Item(key=key, text=" ".join(shuffled), answer="no"))
    return items


def _swap_positions(word: str) -> list[int]:
    """Each k where the inner letters k and k + 1 differ, so swapping them changes the word."""
    return [k for k in range(1, len(word) - 2) if word[k] != word[k + 1]]


def _misspell(word: str, rng: random.Random) -> str:
    """Swap two neighbouring inner letters that differ ("receive" -> "recieve")."""
    k = rng.choice(_swap_positions(word))
    return word[:k] + word[k + 1] + word[k] + word[k + 2 :]


def _can_misspell(word: str) -> bool:
    return word.isalpha() and len(word) >= MIN_MISSPELLED_LENGTH and bool(_swap_positions(word))


def spelling_items() -> list[Item]:
    """A sentence as written ("yes"), or with three of its words misspelled ("no"). Only
    sentences with at least three words we can misspell, so that length tells nothing."""
    items = []
    for key, words in _sentences():
        candidates = [i for i, word in enumerate(words) if _can_misspell(word)]
        if len(candidates) < MISSPELLED_WORDS:
            continue
        if not _edited(key):
            items.append(Item(key=key, text=" ".join(words), answer="yes"))
            continue
        rng = random.Random(f"spelling|{key}")
        edited = list(words)
        for i in rng.sample(candidates, MISSPELLED_WORDS):
            edited[i] = _misspell(edited[i], rng)
        items.append(Item(key=key, text=" ".join(edited), answer="no"))
    return items
