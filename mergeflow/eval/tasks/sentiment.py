"""Tasks on VADER's human-rated sentences: sentiment and text genre (both held-in)."""

from __future__ import annotations

import html
import math
from functools import cache

from mergeflow.errors import DataError
from mergeflow.eval.sources import source_path
from mergeflow.eval.tasks.base import Item, normalize_space, read_lines, truncate_words

# corpus -> (file, its number of lines, the genre's answer in the text_genre task). The files end
# without a newline, so the pinned line count is what tells a truncated file.
CORPORA = {
    "movie": ("movieReviewSnippets_GroundTruth.txt", 10605, "movie"),
    "amazon": ("amazonReviewSnippets_GroundTruth.txt", 3708, "product"),
    "tweets": ("tweets_GroundTruth.txt", 4200, "tweet"),
    "nyt": ("nytEditorialSnippets_GroundTruth.txt", 5190, "news"),
}
# Mean ratings run from -4 to 4; sentences rated within 1 of neutral are too mixed to label.
SENTIMENT_MARGIN = 1.0
SOURCE = "PyPI vaderSentiment 3.3.2, additional_resources/hutto_ICWSM_2014.tar.gz"


@cache
def ratings(corpus: str) -> tuple[tuple[str, float, str], ...]:
    """(id, mean rating, text) of each line of a `*_GroundTruth.txt` file: id<TAB>rating<TAB>text."""
    file, expected_lines, _ = CORPORA[corpus]
    path = source_path("vader") / file
    lines = read_lines(path, final_newline=False)
    if len(lines) != expected_lines:
        raise DataError(f"{path}:{len(lines)}: file ends after {len(lines)} lines, expected {expected_lines}")
    rows = []
    for number, line in enumerate(lines, start=1):
        fields = line.split("\t")
        if len(fields) != 3 or not fields[0] or not fields[2].strip():
            raise DataError(f"{path}:{number}: expected id<TAB>rating<TAB>text, got {line[:60]!r}")
        try:
            rating = float(fields[1])
        except ValueError:
            raise DataError(f"{path}:{number}: rating {fields[1]!r} is not a number") from None
        if not (math.isfinite(rating) and -4 <= rating <= 4):
            raise DataError(f"{path}:{number}: rating {rating} is outside [-4, 4]")
        rows.append((fields[0], rating, normalize_space(html.unescape(fields[2]))))
    return tuple(rows)


def sentiment_items() -> list[Item]:
    items = []
    for corpus in ("movie", "amazon"):
        for row_id, rating, text in ratings(corpus):
            if abs(rating) >= SENTIMENT_MARGIN:
                answer = "positive" if rating > 0 else "negative"
                items.append(Item(key=f"vader:{corpus}:{row_id}", text=truncate_words(text), answer=answer))
    return items


def genre_items() -> list[Item]:
    return [
        Item(key=f"vader:{corpus}:{row_id}", text=truncate_words(text), answer=genre)
        for corpus, (_, _, genre) in CORPORA.items()
        for row_id, _, text in ratings(corpus)
    ]
