"""A reader of the WordNet 3.0 database files (wndb(5WN)), strict enough to catch corruption.

data.<pos> lines: offset lex_filenum ss_type w_cnt (word lex_id)... p_cnt (symbol offset pos
source/target)... [f_cnt (+ f_num w_num)... for verbs] | gloss. Each line starts with its own byte
offset, so checking that offset finds any truncated, garbled or shifted line.
index.<pos> lines: lemma pos synset_cnt p_cnt symbol... sense_cnt tagsense_cnt offset..., the
offsets in order of sense frequency.
"""

from __future__ import annotations

import re
from functools import cache
from typing import NamedTuple

from mergeflow.errors import DataError
from mergeflow.eval.sources import WORDNET_POS, source_path
from mergeflow.eval.tasks.base import normalize_space, read_lines

# Pointer and synset-type letters -> the data file they refer to ('s': adjective satellite).
POS_FILE = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
HEADER = "  "  # the licence at the top of every file is indented by two spaces
QUOTED = re.compile(r'"([^"]*)"')


# The relations the tasks use: hypernym, part holonym ("is a part of"), member holonym ("is a
# member of"). Keeping only these makes parsing twice as fast.
KEPT_POINTERS = frozenset({"@", "#p", "#m"})


class Synset(NamedTuple):
    """A NamedTuple, not a dataclass: 117k of them are built, and tuples build fastest."""

    pos: str  # the data file: noun, verb, adj, adv
    offset: int
    lexicographer_file: int  # its semantic class, see lexnames(5WN): 18 noun.person, 5 noun.animal
    lemmas: tuple[str, ...]  # as written, '_' for spaces; adjective markers like '(a)' removed
    pointers: tuple[tuple[str, str, int], ...]  # (symbol, target file, target offset), KEPT_POINTERS only
    gloss: str  # definition; "example"; "example"

    @property
    def key(self) -> str:
        return f"wordnet:{self.pos}:{self.offset:08d}"

    @property
    def definition(self) -> str:
        return normalize_space(self.gloss.split('"')[0]).rstrip(";:, ")

    @property
    def examples(self) -> tuple[str, ...]:
        return tuple(normalize_space(e) for e in QUOTED.findall(self.gloss) if e.strip())

    def targets(self, symbol: str) -> list[tuple[str, int]]:
        return [(pos, offset) for s, pos, offset in self.pointers if s == symbol]


@cache
def synsets(pos: str) -> dict[int, Synset]:
    """All synsets of data.<pos> by offset."""
    path = source_path("wordnet") / f"data.{pos}"
    result: dict[int, Synset] = {}
    position = 0
    for number, line in enumerate(read_lines(path), start=1):
        start, position = position, position + len(line) + 1  # the files are ASCII: chars are bytes
        if line.startswith(HEADER):
            continue
        try:
            synset = parse_data_line(pos, line)
        except (ValueError, IndexError, KeyError) as error:
            raise DataError(f"{path}:{number}: not a WordNet data line ({error})") from None
        if synset.offset != start:
            raise DataError(f"{path}:{number}: line says offset {synset.offset} but starts at byte {start}")
        result[synset.offset] = synset
    if not result:
        raise DataError(f"{path}: no synsets")
    return result


def parse_data_line(pos: str, line: str) -> Synset:
    head, bar, gloss = line.partition(" | ")
    if not bar:
        raise ValueError("no ' | ' before the gloss")
    fields = head.split()
    if POS_FILE[fields[2]] != pos:
        raise ValueError(f"synset type {fields[2]!r} in data.{pos}")
    word_count = int(fields[3], 16)
    words = fields[4 : 4 + 2 * word_count : 2]
    at = 4 + 2 * word_count
    pointer_count = int(fields[at])
    pointer_fields = fields[at + 1 : at + 1 + 4 * pointer_count]
    rest = fields[at + 1 + 4 * pointer_count :]
    if len(words) != word_count or not words or len(pointer_fields) != 4 * pointer_count:
        raise ValueError(f"{word_count} words and {pointer_count} pointers announced, fields missing")
    if pos == "verb":
        if not rest or len(rest) != 1 + 3 * int(rest[0]):
            raise ValueError("verb frames do not match their count")
    elif rest:
        raise ValueError(f"{len(rest)} fields left after the pointers")
    pointers = tuple(
        (symbol, POS_FILE[target_pos], int(target))
        for symbol, target, target_pos in zip(
            pointer_fields[0::4], pointer_fields[1::4], pointer_fields[2::4], strict=True
        )
        if symbol in KEPT_POINTERS
    )
    if pos == "adj":
        words = [word.split("(")[0] for word in words]
    return Synset(pos, int(fields[0]), int(fields[1]), tuple(words), pointers, gloss.strip())


class IndexEntry(NamedTuple):
    lemma: str
    tagged_senses: int  # senses seen in the tagged SemCor corpus
    offsets: tuple[int, ...]  # senses, most frequent first


@cache
def index(pos: str) -> dict[str, IndexEntry]:
    """index.<pos>: every lemma's senses in that part of speech."""
    path = source_path("wordnet") / f"index.{pos}"
    result = {}
    for number, line in enumerate(read_lines(path), start=1):
        if line.startswith(HEADER):
            continue
        fields = line.split()
        try:
            synset_count = int(fields[2])
            at = 4 + int(fields[3])
            offsets = tuple(map(int, fields[at + 2 :]))
            if POS_FILE[fields[1]] != pos or len(offsets) != synset_count or int(fields[at]) != synset_count:
                raise ValueError(f"{synset_count} senses announced, {len(offsets)} offsets found")
            result[fields[0]] = IndexEntry(fields[0], int(fields[at + 1]), offsets)
        except (ValueError, IndexError, KeyError) as error:
            raise DataError(f"{path}:{number}: not a WordNet index line ({error})") from None
    if not result:
        raise DataError(f"{path}: no entries")
    return result


def synset(pos: str, offset: int) -> Synset:
    try:
        return synsets(pos)[offset]
    except KeyError:
        raise DataError(f"{source_path('wordnet') / f'data.{pos}'}: no synset at offset {offset}") from None


def all_synsets() -> list[Synset]:
    return [s for pos in WORDNET_POS for s in synsets(pos).values()]
