"""Tasks on short texts: fortune cookies (topic, sentence completion) and ChatterBot's dialogues
(closed-book QA, dialogue acts, language identification)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import yaml

from mergeflow.errors import DataError
from mergeflow.eval.sources import source_path
from mergeflow.eval.tasks.base import (
    MAX_ANSWER_WORDS,
    MAX_INPUT_WORDS,
    Item,
    normalize_space,
    read_lines,
    text_hash,
    truncate_words,
)

# Topic labels are fortune categories whose texts are mostly about their topic.
TOPIC_CATEGORIES = ("computers", "politics", "science", "food", "love", "sports", "law", "education")
# Sentence completion reads other categories, so no fortune is in both tasks.
COMPLETION_CATEGORIES = ("wisdom", "people", "platitudes", "humorists", "miscellaneous", "work", "men-women")
COMPLETION_MIN_WORDS = 10
# ChatterBot files of factual questions; the rest are chit-chat ("you are cruel").
QA_FILES = (
    "trivia", "science", "history", "literature", "movies", "sports", "food", "computers", "money",
    "politics", "health", "ai",
)  # fmt: skip
QUESTION_RE = re.compile(
    r"(what|who|whom|whose|when|where|which|how|why|is|are|was|were|do|does|did|can|in|name)\b"
)
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# An utterance with a sentence mark before its end holds more than one sentence.
SENTENCE_MARK = re.compile(r"[.?!]")
LANGUAGES = ("italian", "spanish", "portuguese", "dutch")
FORTUNES_SOURCE = "Debian fortunes 1:1.99.1-7.3, /usr/share/games/fortunes/"
CHATTERBOT_SOURCE = "PyPI chatterbot-corpus 1.3.3, chatterbot_corpus/data/english/"
LANGUAGES_SOURCE = "PyPI chatterbot-corpus 1.3.3, chatterbot_corpus/data/"


@cache
def fortunes(category: str) -> tuple[str, ...]:
    """The texts of one fortune file (separated by lines holding '%'), attributions removed."""
    path = source_path("fortunes") / category
    texts: list[str] = []
    entry: list[str] = []
    for line in [*read_lines(path), "%"]:
        if line != "%":
            entry.append(line)
            continue
        if not entry:
            continue  # '%' twice: an empty entry, as some files have
        texts.append(remove_attribution(entry))
        entry = []
    if len(texts) < 20:
        raise DataError(f"{path}: {len(texts)} fortunes; the file is truncated or not a fortune file")
    # Dropped: a few texts that went through a wrong encoding twice upstream ("Ã¢Â€Â™"), and old
    # terminal tricks (backspace overstrikes, escape sequences) that are not text.
    return tuple(text for text in texts if text and "Ã" not in text and not CONTROL.search(text))


def remove_attribution(lines: list[str]) -> str:
    """Drop the '-- Author, Work' lines that end many fortunes: they name the source, not the text."""
    for index, line in enumerate(lines):
        if index > 0 and line.strip().startswith("--"):
            lines = lines[:index]
            break
    return normalize_space(" ".join(lines))


def topic_items() -> list[Item]:
    return [
        Item(key=f"fortune:{category}:{text_hash(text)}", text=truncate_words(text), answer=category)
        for category in TOPIC_CATEGORIES
        for text in fortunes(category)
    ]


def completion_items() -> list[Item]:
    """A fortune's beginning as the prompt, its last words (a third, 3 to 8 words) as the answer."""
    items = []
    for category in COMPLETION_CATEGORIES:
        for text in fortunes(category):
            words = text.split()
            if not COMPLETION_MIN_WORDS <= len(words) <= MAX_INPUT_WORDS:
                continue
            cut = len(words) - min(8, max(3, len(words) // 3))
            items.append(
                Item(
                    key=f"fortune:{category}:{text_hash(text)}",
                    text=" ".join(words[:cut]),
                    answer=" ".join(words[cut:]),
                )
            )
    return items


@cache
def conversations(topic: str) -> tuple[tuple[str, str], ...]:
    """(question, first answer) pairs of one English ChatterBot file."""
    path = source_path("chatterbot") / f"{topic}.yml"
    pairs = tuple((dialogue[0], dialogue[1]) for dialogue in dialogues(path) if len(dialogue) >= 2)
    if not pairs:
        raise DataError(f"{path}: no question-answer pairs")
    return pairs


@cache
def dialogues(path: Path) -> tuple[tuple[str, ...], ...]:
    """The utterances of each conversation of a ChatterBot file, spaces normalised. Entries that
    are not a list of strings (trivia.yml has one) are skipped; a file that is not such a YAML
    mapping is an error."""
    data = load_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
        raise DataError(f"{path}: expected a mapping with a 'conversations' list")
    return tuple(
        tuple(normalize_space(utterance) for utterance in conversation)
        for conversation in data["conversations"]
        if isinstance(conversation, list) and conversation and all(isinstance(u, str) for u in conversation)
    )


def load_yaml(path: Path) -> object:
    text = "\n".join(read_lines(path, final_newline=False))  # conversations.yml ends without one
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else f"{path}"
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise DataError(f"{where}: {problem}") from None


def qa_items() -> list[Item]:
    items = []
    for topic in QA_FILES:
        for question, answer in conversations(topic):
            is_question = question.endswith("?") or QUESTION_RE.match(question.lower())
            if is_question and len(answer.split()) <= MAX_ANSWER_WORDS and "```" not in answer:
                key = f"chatterbot:{text_hash(question.lower())}"  # a question in two files is one item
                items.append(Item(key=key, text=truncate_words(question), answer=answer))
    return items


def utterances(path: Path) -> list[str]:
    """Every utterance of a ChatterBot file in order, except code blocks ("```")."""
    return [u for dialogue in dialogues(path) for u in dialogue if "```" not in u]


# The mark an utterance ends with -> the dialogue act it names.
ACT_OF_FINAL_MARK = {"?": "question", ".": "statement", "!": "statement"}


def dialogue_act_items() -> list[Item]:
    """Every one-sentence utterance of the English files that ends in '?' (a question) or in '.'
    or '!' (a statement), shown without that last mark: word order and question words decide."""
    items = []
    for path in sorted(source_path("chatterbot").glob("*.yml")):
        for utterance in utterances(path):
            text = utterance.rstrip(" .?!")
            act = ACT_OF_FINAL_MARK.get(utterance[-1])
            if act and not SENTENCE_MARK.search(text) and 3 <= len(text.split()) <= MAX_INPUT_WORDS:
                items.append(Item(key=f"chatterbot:{text_hash(text.lower())}", text=text, answer=act))
    return items


def language_items() -> list[Item]:
    """Utterances of ChatterBot's Italian, Spanish, Portuguese and Dutch files with 3+ words."""
    items = []
    root = source_path("chatterbot-languages")
    for language in LANGUAGES:
        paths = sorted((root / language).glob("*.yml"))
        if not paths:
            raise DataError(f"{root / language}: no .yml files")
        for utterance in (u for path in paths for u in utterances(path)):
            if len(utterance.split()) >= 3:
                key = f"chatterbot:{language}:{text_hash(utterance.lower())}"
                items.append(Item(key=key, text=truncate_words(utterance), answer=language))
    return items
