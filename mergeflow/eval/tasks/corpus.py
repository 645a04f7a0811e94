"""General-domain plain text for pre-training the small PT base models. No task reads it.

gensim's `head500.noblanks.cor` is not usable here: it is the text8 excerpt *stemmed and without
stop words* ("anarch greek rule stem archon ruler merriam-webst onlin dictionari polit philosophi").
The same wheel ships a shortened English Wikipedia dump (about 100 articles in wikitext), which
is cleaned to paragraphs here, and the Lee news corpus (`lee_background.cor`, one article a line).
"""

from __future__ import annotations

import bz2
import re
import xml.etree.ElementTree as ElementTree
from functools import cache

from mergeflow.errors import DataError
from mergeflow.eval.sources import source_path
from mergeflow.eval.tasks.base import normalize_space, read_lines

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DOCUMENT_WORDS = 100
MIN_DOCUMENT_WORDS = 20
# Sections after which an article is lists of links and citations, not prose.
END_SECTIONS = re.compile(
    r"^=+\s*(references|see also|external links|further reading|notes|bibliography|sources)\s*=+\s*$",
    re.IGNORECASE | re.MULTILINE,
)
INNERMOST_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
TABLE = re.compile(r"\{\|.*?\|\}", re.DOTALL)
INNERMOST_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
EXTERNAL_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
TAG = re.compile(r"<[^>]+>")
# File:, Image:, Category: and interlanguage links ("de:", "zh-yue:").
NON_ARTICLE_LINK = re.compile(r"^(?:[Ff]ile|[Ii]mage|[Cc]ategory|[a-z]{2,3}(?:-[a-z]+)?):")


def pretraining_texts() -> list[str]:
    """Plain documents of about 100 words: Wikipedia paragraphs, then Lee news articles. A new
    list each call, so a caller may change it."""
    return list(all_documents())


@cache
def all_documents() -> tuple[str, ...]:
    documents = [doc for article in wikipedia_articles() for doc in chunk_words(article)]
    path = source_path("gensim") / "lee_background.cor"
    documents += [
        normalize_space(line)
        for line in read_lines(path, final_newline=False)
        if len(line.split()) >= MIN_DOCUMENT_WORDS
    ]
    return tuple(documents)


def wikipedia_articles() -> list[str]:
    path = source_path("gensim") / WIKI_DUMP
    articles = []
    try:
        with bz2.open(path, "rb") as stream:
            for _, element in ElementTree.iterparse(stream):
                if element.tag.endswith("}page"):
                    namespace = element.findtext("{*}ns")
                    text = element.findtext("{*}revision/{*}text") or ""
                    if namespace == "0" and not text.lstrip().upper().startswith("#REDIRECT"):
                        articles.append(wikitext_to_plain(text))
                    element.clear()
    except (OSError, EOFError, ElementTree.ParseError) as error:
        raise DataError(f"{path}: not a readable Wikipedia dump ({error})") from None
    if not articles:
        raise DataError(f"{path}: no articles")
    return [article for article in articles if article]


def wikitext_to_plain(text: str) -> str:
    """Paragraphs of prose, one a line: markup, templates, tables, references and lists removed.
    A regex cleaner, not a wikitext parser; what it misses is rare and harmless for pre-training."""
    text = END_SECTIONS.split(text, maxsplit=1)[0]
    text = COMMENT.sub("", REF.sub("", text))
    while (cleaned := INNERMOST_TEMPLATE.sub("", text)) != text:
        text = cleaned
    text = TABLE.sub("", text)
    while (cleaned := INNERMOST_LINK.sub(link_text, text)) != text:
        text = cleaned
    text = TAG.sub("", EXTERNAL_LINK.sub(r"\1", text)).replace("'''", "").replace("''", "")
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [
            line for line in paragraph.splitlines() if line.strip() and line.lstrip()[0] not in "=*#:;|!{}"
        ]
        plain = normalize_space(" ".join(lines))
        if len(plain.split()) >= MIN_DOCUMENT_WORDS:
            paragraphs.append(plain)
    return "\n".join(paragraphs)


def link_text(match: re.Match[str]) -> str:
    target, _, label = match.group(1).partition("|")
    if NON_ARTICLE_LINK.match(target):
        return ""  # images, categories and links to other languages are not prose
    return label.rsplit("|", 1)[-1] if label else target


def chunk_words(article: str) -> list[str]:
    """Each paragraph cut into pieces of about DOCUMENT_WORDS words (a short tail joins the last)."""
    documents = []
    for paragraph in article.split("\n"):
        words = paragraph.split()
        pieces = [words[i : i + DOCUMENT_WORDS] for i in range(0, len(words), DOCUMENT_WORDS)]
        if len(pieces) > 1 and len(pieces[-1]) < DOCUMENT_WORDS // 2:
            tail = pieces.pop()
            pieces[-1] += tail
        documents += [" ".join(piece) for piece in pieces if len(piece) >= MIN_DOCUMENT_WORDS]
    return documents
