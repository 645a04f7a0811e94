"""The evaluation tasks: multiple choice, scored by the log-likelihood of each choice.

Mirrors the paper's setup at small scale: 13 held-in tasks in 13 distinct categories (one expert
each; score = merged ÷ expert) and 4 held-out tasks in categories no expert saw (score = merged ÷
base). Five held-in tasks ask for knowledge only a real pre-trained base has; the small models
trained here learn the other eight from the surface of the text (mergeflow.zoo.presets). Every
prompt is `format_prompt(instruction, text)` and every choice starts with a space. docs/tasks.md
has a card per task.
"""

from __future__ import annotations

from functools import cache

import datasets

from mergeflow.errors import DataError
from mergeflow.eval.tasks import lexical, perturbed, sentiment, text
from mergeflow.eval.tasks.base import (
    MAX_TRAIN_SIZE,
    MAX_VALIDATION_SIZE,
    MIN_VALIDATION_SIZE,
    TEST_SIZE,
    Item,
    TaskSpec,
    build_splits,
    format_prompt,
)
from mergeflow.eval.tasks.corpus import pretraining_texts
from mergeflow.eval.tasks.instruct import MIXTURE_TASKS, instruction_mixture

WORDNET = "Debian wordnet-base 1:3.0-37"
GENSIM = "PyPI gensim 4.4.0 wheel, gensim/test/test_data/"

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        # ---- held-in: one expert each, categories distinct ----
        TaskSpec(
            name="sentiment",
            category="sentiment",
            kind="held_in",
            source=f"{sentiment.SOURCE}: movieReviewSnippets, amazonReviewSnippets",
            instruction="Is the sentiment of this review positive or negative?",
            description="Movie and product review sentences rated by people; sentences rated within 1 "
            "of neutral (on -4..4) are left out.",
            build=sentiment.sentiment_items,
            num_choices=2,
            labels=("positive", "negative"),
            balance=True,
        ),
        TaskSpec(
            name="text_genre",
            category="genre classification",
            kind="held_in",
            source=f"{sentiment.SOURCE}: all four *_GroundTruth.txt",
            instruction="Is this text from a movie review, product review, tweet or news?",
            description="Which of VADER's four corpora a sentence comes from: movie reviews, Amazon "
            "product reviews, tweets or New York Times editorials.",
            build=sentiment.genre_items,
            labels=("movie", "product", "tweet", "news"),
            balance=True,
        ),
        TaskSpec(
            name="topic",
            category="topic classification",
            kind="held_in",
            source=f"{text.FORTUNES_SOURCE}{{{','.join(text.TOPIC_CATEGORIES)}}}",
            instruction="What is the topic of this quote?",
            description="The fortune-cookie category of a quote or joke, among 4 of 8 topical categories.",
            build=text.topic_items,
            labels=text.TOPIC_CATEGORIES,
            balance=True,
        ),
        TaskSpec(
            name="closed_book_qa",
            category="closed-book QA",
            kind="held_in",
            source=f"{text.CHATTERBOT_SOURCE}{{{','.join(text.QA_FILES)}}}.yml",
            instruction="Answer the question.",
            description="Questions with short answers, most of them trivia (a few ask the chatbot about "
            "itself); the wrong choices are answers to other questions.",
            build=text.qa_items,
        ),
        TaskSpec(
            name="word_analogy",
            category="analogy",
            kind="held_in",
            source=f"{GENSIM}questions-words.txt",
            instruction="Complete the analogy with one word.",
            description="word2vec's analogy questions (capitals, currencies, family, grammar); the wrong "
            "choices are words of the same kind.",
            build=lexical.analogy_items,
        ),
        TaskSpec(
            name="word_similarity",
            category="word similarity",
            kind="held_in",
            source=f"{GENSIM}simlex999.txt, wordsim353.tsv",
            instruction="Do these two words have similar meanings?",
            description="SimLex-999 and WordSim-353 pairs rated at least 7 (yes) or at most 3 (no) of 10.",
            build=lexical.similarity_items,
            num_choices=2,
            labels=("yes", "no"),
            balance=True,
        ),
        TaskSpec(
            name="definitions",
            category="definition",
            kind="held_in",
            source=f"{WORDNET}, /usr/share/wordnet/data.*",
            instruction="Which word has this definition?",
            description="A WordNet definition and four common words of the same part of speech.",
            build=lexical.definition_items,
        ),
        TaskSpec(
            name="hypernyms",
            category="hypernymy",
            kind="held_in",
            source=f"{WORDNET}, /usr/share/wordnet/index.noun, data.noun",
            instruction="What is this a kind of?",
            description="A common noun (its most frequent sense) and its direct hypernym in WordNet; no "
            "wrong choice is any of its ancestors.",
            build=lexical.hypernym_items,
        ),
        TaskSpec(
            name="language_id",
            category="language identification",
            kind="held_in",
            source=f"{text.LANGUAGES_SOURCE}{{{','.join(text.LANGUAGES)}}}/*.yml",
            instruction="Which language is this text in?",
            description="A chatbot's utterance (3 words or more) in one of four languages, three of them "
            "Romance.",
            build=text.language_items,
            labels=text.LANGUAGES,
            balance=True,
        ),
        TaskSpec(
            name="dialogue_act",
            category="dialogue act",
            kind="held_in",
            source=f"{text.CHATTERBOT_SOURCE}*.yml",
            instruction="Is this a question or a statement?",
            description="A one-sentence chatbot utterance without its final '?', '.' or '!': word order and "
            "question words tell which it was.",
            build=text.dialogue_act_items,
            num_choices=2,
            labels=("question", "statement"),
            balance=True,
        ),
        TaskSpec(
            name="semantic_category",
            category="semantic category",
            kind="held_in",
            source=f"{WORDNET}, /usr/share/wordnet/data.noun",
            instruction="Is this a person, an animal, a plant or an object?",
            description="A WordNet noun definition, and the lexicographer file its synset is filed in: "
            "noun.person, noun.animal, noun.plant or noun.artifact.",
            build=lexical.semantic_category_items,
            labels=tuple(lexical.SEMANTIC_CATEGORIES.values()),
            balance=True,
        ),
        TaskSpec(
            name="word_order",
            category="grammaticality",
            kind="held_in",
            source=f"{sentiment.SOURCE}: movie, Amazon and NYT *_GroundTruth.txt",
            instruction="Are these words in their natural order?",
            description="A review or news sentence of 6 to 40 words, as written or with its words "
            "shuffled (half each, chosen by the sentence's key).",
            build=perturbed.word_order_items,
            num_choices=2,
            labels=("yes", "no"),
            balance=True,
        ),
        TaskSpec(
            name="spelling",
            category="spelling",
            kind="held_in",
            source=f"{sentiment.SOURCE}: movie, Amazon and NYT *_GroundTruth.txt",
            instruction="Is every word spelled correctly?",
            description="A review or news sentence, as written or with two neighbouring inner letters "
            "swapped in three of its words ('receive' -> 'recieve'); half each.",
            build=perturbed.spelling_items,
            num_choices=2,
            labels=("yes", "no"),
            balance=True,
        ),
        # ---- held-out: categories no held-in task has ----
        TaskSpec(
            name="sentence_completion",
            category="sentence completion",
            kind="held_out",
            source=f"{text.FORTUNES_SOURCE}{{{','.join(text.COMPLETION_CATEGORIES)}}}",
            instruction="Choose the best ending for this text.",
            description="The beginning of a quote and its true last words, among the endings of 3 other "
            "quotes (categories the topic task does not read).",
            build=text.completion_items,
        ),
        TaskSpec(
            name="word_sense",
            category="word sense disambiguation",
            kind="held_out",
            source=f"{WORDNET}, /usr/share/wordnet/data.*, index.*",
            instruction="What does the word mean in this sentence?",
            description="A WordNet example sentence and a word in it; the choices are definitions of the "
            "word's senses (cut to 12 words).",
            build=lexical.word_sense_items,
        ),
        TaskSpec(
            name="part_of_speech",
            category="part of speech",
            kind="held_out",
            source=f"{WORDNET}, /usr/share/wordnet/index.*",
            instruction="What part of speech is this word?",
            description="A common word that WordNet lists in one part of speech only.",
            build=lexical.part_of_speech_items,
            labels=("noun", "verb", "adjective", "adverb"),
            balance=True,
        ),
        TaskSpec(
            name="meronymy",
            category="part-whole",
            kind="held_out",
            source=f"{WORDNET}, /usr/share/wordnet/index.noun, data.noun",
            instruction="What is this a part of?",
            description="A common noun that WordNet lists as a part of a whole ('neck' -> 'body') or a "
            "member of a group ('sheep' -> 'herd'), and that whole.",
            build=lexical.meronym_items,
        ),
    )
}


def held_in_tasks() -> list[str]:
    return [name for name, spec in TASKS.items() if spec.kind == "held_in"]


def held_out_tasks() -> list[str]:
    return [name for name, spec in TASKS.items() if spec.kind == "held_out"]


@cache
def load_task(name: str) -> datasets.DatasetDict:
    """train / validation / test of a task; columns id, prompt, choices, label."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    spec = TASKS[name]
    return build_splits(spec, spec.build())


__all__ = [
    "MAX_TRAIN_SIZE",
    "MIXTURE_TASKS",
    "TASKS",
    "TEST_SIZE",
    "MAX_VALIDATION_SIZE",
    "MIN_VALIDATION_SIZE",
    "Item",
    "TaskSpec",
    "format_prompt",
    "held_in_tasks",
    "held_out_tasks",
    "instruction_mixture",
    "load_task",
    "pretraining_texts",
]
