"""Word-level tasks: analogies and similarity from gensim's word lists, definitions, hypernyms,
meronyms, word senses and parts of speech from WordNet.

WordNet tasks ask only about common words: one lowercase word, with a sense tagged in SemCor and
used in at least 3 of WordNet's own glosses, so even a small model has seen them.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from functools import cache

from mergeflow.errors import DataError
from mergeflow.eval.sources import WORDNET_POS, source_path
from mergeflow.eval.tasks.base import MAX_ANSWER_WORDS, Item, is_plain_word, read_lines, truncate_words
from mergeflow.eval.tasks.wordnet import Synset, all_synsets, index, synset

POS_NAMES = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
# Word pairs rated at least this similar (0-10) are "yes", at most SIMILARITY_NO "no".
SIMILARITY_YES = 7.0
SIMILARITY_NO = 3.0
MIN_GLOSS_COUNT = 3
WORD = re.compile(r"[a-z]+")


def lemma_set(synset_: Synset) -> set[str]:
    return {lemma.lower().replace("_", " ") for lemma in synset_.lemmas}


@cache
def gloss_counts() -> Counter[str]:
    """How often each word occurs in WordNet's own glosses: a word frequency list that needs no
    other source ('cake' 91, 'iodocompound' 0)."""
    glosses = " ".join(s.gloss for s in all_synsets()).lower()
    return Counter(WORD.findall(glosses))


@cache
def common_words(pos: str) -> frozenset[str]:
    """Lemmas of `pos` written as one lowercase word, with a sense tagged in SemCor, used in at
    least MIN_GLOSS_COUNT glosses: the words a small model has likely seen."""
    counts = gloss_counts()
    return frozenset(
        lemma
        for lemma, entry in index(pos).items()
        if entry.tagged_senses > 0 and is_plain_word(lemma) and counts[lemma] >= MIN_GLOSS_COUNT
    )


def first_common_lemma(synset_: Synset, exclude: str = "") -> str | None:
    common = common_words(synset_.pos)
    return next((lemma for lemma in synset_.lemmas if lemma in common and lemma != exclude), None)


# ---- gensim word lists ------------------------------------------------------------------------


@cache
def analogies() -> tuple[tuple[str, tuple[str, str, str, str]], ...]:
    """(section, (a, b, c, d)) of questions-words.txt: ': section' headers, then 'a b c d' lines."""
    path = source_path("gensim") / "questions-words.txt"
    rows = []
    section = ""
    for number, line in enumerate(read_lines(path), start=1):
        if line.startswith(": "):
            section = line[2:].strip()
            continue
        words = line.split()
        if len(words) != 4 or not section:
            raise DataError(f"{path}:{number}: expected ': section' or four words, got {line[:60]!r}")
        rows.append((section, (words[0], words[1], words[2], words[3])))
    return tuple(rows)


def analogy_items() -> list[Item]:
    """'a is to b as c is to' -> d for every word pair (c, d) of a section, with one fixed pair
    (a, b) per section, the section's first, that is never asked in any section: were it another
    question's pair, a training prompt could show a test answer. A pair in two sections (capitals)
    is asked once. Wrong choices are other answers of the section (other countries for a
    country), so the kind of word gives nothing away."""
    pairs: dict[str, dict[tuple[str, str], None]] = defaultdict(dict)  # insertion-ordered sets
    for section, (a, b, c, d) in analogies():
        pairs[section] |= {(a, b): None, (c, d): None}
    shown = {(a.lower(), b.lower()) for a, b in (next(iter(p)) for p in pairs.values())}
    items = []
    for section_pairs in pairs.values():
        a, b = next(iter(section_pairs))
        answers = tuple(sorted({second for _, second in section_pairs}))
        for c, d in section_pairs:
            if (c.lower(), d.lower()) not in shown:
                item = Item(
                    key=f"analogy:{c.lower()}:{d.lower()}",
                    text=f"{a} is to {b} as {c} is to",
                    answer=d,
                    exclude=frozenset(w.lower() for w in (a, b, c)),
                    candidates=answers,
                )
                items.append(item)
    return items


@cache
def similarity_ratings(name: str) -> tuple[tuple[str, str, float], ...]:
    """(word, word, mean rating 0-10) of simlex999.txt or wordsim353.tsv; '#' lines are comments."""
    path = source_path("gensim") / name
    rows = []
    for number, line in enumerate(read_lines(path), start=1):
        if line.startswith("#"):
            continue
        fields = line.split("\t")
        try:
            score = float(fields[2])
            if len(fields) != 3 or not (math.isfinite(score) and 0 <= score <= 10):
                raise ValueError
        except (ValueError, IndexError):
            raise DataError(
                f"{path}:{number}: expected word<TAB>word<TAB>rating 0-10, got {line[:60]!r}"
            ) from None
        rows.append((fields[0], fields[1], score))
    return tuple(rows)


def similarity_items() -> list[Item]:
    """SimLex-999 first (it rates similarity, WordSim-353 relatedness), so SimLex decides a pair
    both rate; pairs rated in the middle are left out."""
    items = []
    for name in ("simlex999.txt", "wordsim353.tsv"):
        for first, second, score in similarity_ratings(name):
            if SIMILARITY_NO < score < SIMILARITY_YES or first.lower() == second.lower():
                continue
            pair = "|".join(sorted((first.lower(), second.lower())))
            answer = "yes" if score >= SIMILARITY_YES else "no"
            items.append(Item(key=f"similarity:{pair}", text=f"{first}, {second}", answer=answer))
    return items


# ---- WordNet ----------------------------------------------------------------------------------


def definition_items() -> list[Item]:
    """A synset's definition -> one of its words; wrong choices are words of the same part of
    speech defined by other items, never the synset's own synonyms."""
    items = []
    for s in all_synsets():
        lemma = first_common_lemma(s)
        if lemma is None:
            continue
        definition = s.definition
        if lemma not in WORD.findall(definition.lower()):  # no definition that names its word
            exclude = frozenset(lemma_set(s))
            items.append(
                Item(key=s.key, text=truncate_words(definition), answer=lemma, pool=s.pos, exclude=exclude)
            )
    return items


# Noun lexicographer files (lexnames(5WN)) -> the class a semantic_category example names.
SEMANTIC_CATEGORIES = {18: "person", 5: "animal", 20: "plant", 6: "object"}  # 6 is noun.artifact


def semantic_category_items() -> list[Item]:
    """A noun synset's definition -> whether it is a person, an animal, a plant or a man-made
    object, by the WordNet lexicographer file the synset is filed in."""
    return [
        Item(key=s.key, text=truncate_words(s.definition), answer=SEMANTIC_CATEGORIES[s.lexicographer_file])
        for s in all_synsets()
        if s.pos == "noun" and s.lexicographer_file in SEMANTIC_CATEGORIES and len(s.definition.split()) >= 3
    ]


def ancestors(s: Synset) -> set[str]:
    """Lemmas of every hypernym up to the root: all right answers to 'a kind of'."""
    seen: set[tuple[str, int]] = set()
    stack = s.targets("@")
    lemmas: set[str] = set()
    while stack:
        target = stack.pop()
        if target not in seen:
            seen.add(target)
            parent = synset(*target)
            lemmas |= lemma_set(parent)
            stack += parent.targets("@")
    return lemmas


def noun_relation_items(symbols: tuple[str, ...]) -> list[Item]:
    """A common noun (its most frequent sense) -> the first common word of the first synset it
    points to with one of `symbols`; its other right answers are never wrong choices."""
    items = []
    for lemma in sorted(common_words("noun")):
        s = synset("noun", index("noun")[lemma].offsets[0])
        targets = [synset(*target) for symbol in symbols for target in s.targets(symbol)]
        answer = next((a for t in targets if (a := first_common_lemma(t, exclude=lemma))), None)
        if answer is None:
            continue
        right = ancestors(s) if symbols == ("@",) else set().union(*(lemma_set(t) for t in targets))
        items.append(Item(key=s.key, text=lemma, answer=answer, exclude=frozenset(right | lemma_set(s))))
    return items


def hypernym_items() -> list[Item]:
    return noun_relation_items(("@",))


def meronym_items() -> list[Item]:
    """Part holonyms ('#p': 'neck' -> 'body'), then member holonyms ('#m': 'sheep' -> 'herd')."""
    return noun_relation_items(("#p", "#m"))


def word_sense_items() -> list[Item]:
    """A WordNet example sentence and a word in it -> the definition of the word's sense there,
    among 3 definitions of the word's other senses in the same part of speech."""
    short: dict[tuple[str, int], str] = {}  # (pos, offset) -> definition cut to 12 words

    def short_definition(pos: str, offset: int) -> str:
        if (pos, offset) not in short:
            short[pos, offset] = truncate_words(synset(pos, offset).definition, MAX_ANSWER_WORDS)
        return short[pos, offset]

    items = []
    for s in all_synsets():
        common = common_words(s.pos)
        for lemma in s.lemmas:
            if lemma not in common or len(index(s.pos)[lemma].offsets) < 4:
                continue
            sentence = next((e for e in s.examples if lemma in WORD.findall(e.lower())), None)
            if sentence is None:
                continue
            answer = short_definition(s.pos, s.offset)
            others = {short_definition(s.pos, o) for o in index(s.pos)[lemma].offsets if o != s.offset}
            others = {other for other in others if other.lower() != answer.lower()}
            if len(others) >= 3:  # not when senses read the same once cut to 12 words
                text = f"{truncate_words(sentence)}\nWord: {lemma}"
                items.append(Item(key=s.key, text=text, answer=answer, candidates=tuple(sorted(others))))
                break
    return items


def part_of_speech_items() -> list[Item]:
    """A common word that WordNet lists in one part of speech only -> that part of speech."""
    return [
        Item(key=f"wordnet:lemma:{lemma}", text=lemma, answer=POS_NAMES[pos])
        for pos in WORDNET_POS
        for lemma in sorted(common_words(pos))
        if not any(lemma in index(other) for other in WORDNET_POS if other != pos)
    ]


def wordnet_words(pos: str) -> list[str]:
    """Common one-word lemmas of a part of speech, for the instruction mixture (words only)."""
    return sorted(common_words(pos))
