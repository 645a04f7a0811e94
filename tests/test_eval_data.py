"""The evaluation data: pinned sources, the task set's splits and choices, the instruction mixture,
the pre-training texts, and docs/tasks.md in step with the registry.

Tests read the real sources from the data cache (MERGEFLOW_DATA_DIR, else ~/.cache/mergeflow/data,
never the project's tree), so they are fetched once per machine; tests of broken files use copies
in a temporary cache.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from mergeflow.errors import DataError
from mergeflow.eval import sources
from mergeflow.eval.sources import SOURCES, source_path
from mergeflow.eval.tasks import (
    MIXTURE_TASKS,
    TASKS,
    format_prompt,
    held_in_tasks,
    held_out_tasks,
    instruction_mixture,
    lexical,
    load_task,
    perturbed,
    pretraining_texts,
    sentiment,
    text,
    wordnet,
)
from mergeflow.eval.tasks.base import (
    MAX_TRAIN_SIZE,
    MAX_VALIDATION_SIZE,
    MIN_TRAIN_SIZE,
    MIN_VALIDATION_SIZE,
    TEST_SIZE,
    Item,
    TaskSpec,
    build_splits,
)
from mergeflow.hashing import file_sha256
from mergeflow.storage import locate

DOCS = (Path(__file__).parent.parent / "docs" / "tasks.md").read_text()
SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real data cache, every source fetched (once per machine)."""
    for name in SOURCES:
        source_path(name)
    return sources.data_dir()


@pytest.fixture
def broken_cache(tmp_path, monkeypatch, real_data):
    """A temporary data cache; parsers' in-process caches are cleared before and after, so they
    read the broken copies here and then the real files again."""
    monkeypatch.setenv("MERGEFLOW_DATA_DIR", str(tmp_path))
    parsers = (
        sentiment.ratings, text.fortunes, text.conversations, text.dialogues, wordnet.synsets, wordnet.index
    )  # fmt: skip
    for parser in parsers:
        parser.cache_clear()
    yield tmp_path
    for parser in parsers:
        parser.cache_clear()


def copy_extracted(real_data: Path, cache: Path, name: str) -> Path:
    folder = SOURCES[name].folder
    shutil.copytree(real_data / folder, cache / folder)
    return cache / folder


# ---- sources ----------------------------------------------------------------------------------


def test_a_corrupt_archive_names_the_file_and_both_hashes(broken_cache, real_data):
    source = SOURCES["chatterbot"]
    (broken_cache / "downloads").mkdir()
    archive = broken_cache / "downloads" / source.filename
    blob = bytearray((real_data / "downloads" / source.filename).read_bytes())
    blob[1000:1004] = bytes(b ^ 0xFF for b in blob[1000:1004])
    archive.write_bytes(blob)
    with pytest.raises(DataError) as error:
        source_path("chatterbot")
    message = str(error.value)
    assert str(archive) in message and source.sha256 in message
    assert file_sha256(locate(str(archive))) in message
    assert not (broken_cache / source.folder).exists()


def test_a_placed_archive_is_used_without_network(broken_cache, real_data, monkeypatch):
    source = SOURCES["chatterbot"]
    (broken_cache / "downloads").mkdir()
    shutil.copy(real_data / "downloads" / source.filename, broken_cache / "downloads")

    def no_network(*args):
        raise AssertionError("fetched although the archive was there")

    monkeypatch.setattr(sources, "_fetch", no_network)
    folder = source_path("chatterbot")
    assert folder == broken_cache / source.folder
    assert (folder / "trivia.yml").read_bytes() == (real_data / source.folder / "trivia.yml").read_bytes()
    assert [p.name for p in broken_cache.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_a_failed_fetch_says_which_package_and_where_to_put_it(broken_cache, monkeypatch):
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)  # no apt-get: the pool URL
    monkeypatch.setattr(sources, "DEBIAN_MIRROR", "http://127.0.0.1:9/debian")  # nothing listens
    with pytest.raises(DataError) as error:
        source_path("fortunes")
    message = str(error.value)
    assert "fortunes 1:1.99.1-7.3" in message
    assert str(broken_cache / "downloads" / SOURCES["fortunes"].filename) in message


def test_a_truncated_text_file_names_file_and_line(broken_cache, real_data):
    folder = copy_extracted(real_data, broken_cache, "vader")
    path = folder / "movieReviewSnippets_GroundTruth.txt"
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(lines[:5000]))
    with pytest.raises(
        DataError, match=rf"{re.escape(str(path))}:5000: file ends after 5000 lines, expected 10605"
    ):
        sentiment.ratings("movie")


def test_a_garbled_line_names_file_and_line(broken_cache, real_data):
    folder = copy_extracted(real_data, broken_cache, "vader")
    path = folder / "tweets_GroundTruth.txt"
    lines = path.read_bytes().split(b"\n")
    lines[99] = lines[99].replace(b"\t", b" ")
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:100: expected id<TAB>rating<TAB>text"):
        sentiment.ratings("tweets")


def test_wordnet_offsets_catch_a_shifted_line(broken_cache, real_data):
    folder = copy_extracted(real_data, broken_cache, "wordnet")
    path = folder / "data.adv"
    lines = path.read_bytes().split(b"\n")
    lines[499] = lines[499][:-10]  # ten bytes lost: the next line no longer starts at its offset
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(
        DataError, match=rf"{re.escape(str(path))}:501: line says offset \d+ but starts at byte \d+"
    ):
        wordnet.synsets("adv")


def test_a_file_cut_mid_line_and_bad_bytes_name_file_and_line(broken_cache, real_data):
    folder = copy_extracted(real_data, broken_cache, "wordnet")
    path = folder / "index.adv"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        DataError, match=rf"{re.escape(str(path))}:\d+: last line has no newline; the file is truncated"
    ):
        wordnet.index("adv")
    path.write_bytes(data.replace(b"\n", b"\n\xff", 1))
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: not UTF-8"):
        wordnet.index("adv")


def test_invalid_yaml_names_file_and_line(broken_cache, real_data):
    folder = copy_extracted(real_data, broken_cache, "chatterbot")
    path = folder / "trivia.yml"
    lines = path.read_text().split("\n")
    lines[9] = "- - [unclosed"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:\d+: "):
        text.conversations("trivia")


# ---- tasks ------------------------------------------------------------------------------------


def test_the_registry_mirrors_the_paper():
    held_in, held_out = held_in_tasks(), held_out_tasks()
    assert len(held_in) >= 8 and len(held_out) >= 4
    assert sorted(held_in + held_out) == sorted(TASKS)
    in_categories = [TASKS[name].category for name in held_in]
    assert len(set(in_categories)) == len(in_categories), "held-in categories must be distinct"
    assert not set(in_categories) & {TASKS[name].category for name in held_out}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_sizes_columns_and_prompts(name, real_data):
    spec = TASKS[name]
    data = load_task(name)
    assert list(data) == list(SPLITS)
    assert len(data["test"]) == TEST_SIZE
    assert MIN_VALIDATION_SIZE <= len(data["validation"]) <= MAX_VALIDATION_SIZE
    assert MIN_TRAIN_SIZE <= len(data["train"]) <= MAX_TRAIN_SIZE
    # Validation grows past its minimum only with items a full training split leaves over.
    assert len(data["validation"]) == MIN_VALIDATION_SIZE or len(data["train"]) == MAX_TRAIN_SIZE
    for split in SPLITS:
        assert data[split].column_names == ["id", "prompt", "choices", "label"]
        for row in data[split].to_list():
            assert row["prompt"].startswith(spec.instruction + "\n") and row["prompt"].endswith("\nAnswer:")
            assert 2 <= len(row["choices"]) <= 4 and 0 <= row["label"] < len(row["choices"])
            assert all(c.startswith(" ") and not c.startswith("  ") for c in row["choices"])
            assert len({c.lower() for c in row["choices"]}) == len(row["choices"]), row
            # Short prompts and answers keep evaluating a small model on CPU fast.
            assert len(row["prompt"].split()) <= 60 and max(len(c.split()) for c in row["choices"]) <= 13


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_disjoint_and_unique(name, real_data):
    data = load_task(name)
    ids = [set(data[split]["id"]) for split in SPLITS]
    prompts = [set(data[split]["prompt"]) for split in SPLITS]
    for split, split_ids, split_prompts in zip(SPLITS, ids, prompts, strict=True):
        assert len(split_ids) == len(split_prompts) == len(data[split]), f"{split}: repeated id or prompt"
    for i in range(3):
        for j in range(i + 1, 3):
            assert not ids[i] & ids[j] and not prompts[i] & prompts[j], (SPLITS[i], SPLITS[j])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_the_right_answer_has_no_favourite_position(name, real_data):
    for split in ("validation", "test"):
        labels = Counter(load_task(name)[split]["label"])
        assert max(labels.values()) <= 0.6 * sum(labels.values()), (split, labels)


@pytest.mark.parametrize(
    ("distinct", "validation", "train"),
    [(350, 100, 50), (2300, 100, 2000), (2450, 250, 2000), (2500, 300, 2000), (9000, 300, 2000)],
)
def test_validation_takes_only_what_a_full_training_split_leaves(distinct, validation, train):
    spec = TaskSpec(
        name="numbers", kind="held_in", category="c", source="generated", instruction="Which?",
        description="d", build=lambda: [], labels=("odd", "even"),
    )  # fmt: skip
    items = [Item(key=f"n:{i}", text=f"number {i}", answer=("odd", "even")[i % 2]) for i in range(distinct)]
    splits = build_splits(spec, items)
    assert [len(splits[s]) for s in ("test", "validation", "train")] == [TEST_SIZE, validation, train]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_are_deterministic(name, real_data):
    spec = TASKS[name]
    rebuilt = build_splits(spec, spec.build())
    for split in SPLITS:
        assert rebuilt[split].to_dict() == load_task(name)[split].to_dict()


def test_a_source_extracts_the_folders_its_patterns_name_and_nothing_else(real_data):
    folder = source_path("chatterbot-languages")
    assert sorted(p.name for p in folder.iterdir()) == sorted(text.LANGUAGES)
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert len(files) >= 40 and all(p.suffix == ".yml" and p.parent.parent == folder for p in files)


def test_a_missing_language_folder_is_named(broken_cache, real_data):
    folder = copy_extracted(real_data, broken_cache, "chatterbot-languages")
    shutil.rmtree(folder / "dutch")
    (folder / "dutch").mkdir()
    with pytest.raises(DataError, match=rf"{re.escape(str(folder / 'dutch'))}: no .yml files"):
        text.language_items()


def test_dialogue_acts_hide_the_mark_that_gives_the_answer(real_data):
    items = text.dialogue_act_items()
    assert not [item.text for item in items if set(item.text) & set(".?!")]
    by_text = {item.text: item.answer for item in items}
    assert by_text["What is the biggest artery in the human body"] == "question"  # trivia.yml
    assert Counter(by_text.values())["statement"] > 300 and Counter(by_text.values())["question"] > 300


def test_semantic_categories_follow_wordnet_lexicographer_files(real_data):
    answers = {item.key: item.answer for item in lexical.semantic_category_items()}
    # noun.animal dog, noun.person lawyer, noun.plant oak, noun.artifact hammer (first senses).
    for lemma, category in (("dog", "animal"), ("lawyer", "person"), ("oak", "plant"), ("hammer", "object")):
        assert answers[f"wordnet:noun:{wordnet.index('noun')[lemma].offsets[0]:08d}"] == category
    assert f"wordnet:noun:{wordnet.index('noun')['water'].offsets[0]:08d}" not in answers  # noun.substance


def test_word_order_shuffles_the_words_of_half_the_sentences(real_data):
    items = perturbed.word_order_items()
    written = written_words()
    for item in items:
        words = item.text.split()
        if item.answer == "yes":
            assert words == written[item.key]
        else:
            assert words != written[item.key] and sorted(words) == sorted(written[item.key])
    assert 0.45 < Counter(item.answer for item in items)["no"] / len(items) < 0.55


def test_spelling_misspells_three_words_of_half_the_sentences(real_data):
    items = perturbed.spelling_items()
    written = written_words()
    for item in items:
        words, original = item.text.split(), written[item.key]
        changed = [(new, old) for new, old in zip(words, original, strict=True) if new != old]
        if item.answer == "yes":
            assert not changed
            continue
        assert len(changed) == perturbed.MISSPELLED_WORDS
        for new, old in changed:  # two neighbouring inner letters swapped
            k = next(i for i in range(len(old)) if new[i] != old[i])
            assert 0 < k < len(old) - 2 and new == old[:k] + old[k + 1] + old[k] + old[k + 2 :]
    assert 0.45 < Counter(item.answer for item in items)["no"] / len(items) < 0.55


def written_words() -> dict[str, list[str]]:
    """key -> words of each VADER sentence the edited tasks read, as written (final mark dropped)."""
    return {
        f"vader:{corpus}:{row_id}": text.rstrip(".!?").split()
        for corpus in perturbed.CORPORA
        for row_id, _, text in sentiment.ratings(corpus)
    }


def test_format_prompt_is_the_one_template():
    assert format_prompt("Do it.", "some text") == "Do it.\nsome text\nAnswer:"


# ---- instruction mixture and pre-training texts -----------------------------------------------


def test_the_instruction_mixture_is_deterministic_and_shares_nothing_with_the_tasks(real_data):
    mixture = instruction_mixture(300, seed=3)
    assert mixture.to_dict() == instruction_mixture(300, seed=3).to_dict()
    assert mixture["prompt"] != instruction_mixture(300, seed=4)["prompt"]
    assert mixture.column_names == ["id", "prompt", "choices", "label"] and len(mixture) == 300
    task_categories = {spec.category for spec in TASKS.values()}
    assert not {task.category for task in MIXTURE_TASKS.values()} & task_categories
    assert not set(MIXTURE_TASKS) & set(TASKS)
    instructions = {spec.instruction for spec in TASKS.values()}
    for row in mixture:
        assert row["prompt"].split("\n")[0] not in instructions
        assert row["prompt"].endswith("\nAnswer:") and 0 <= row["label"] < len(row["choices"])
        assert all(c.startswith(" ") for c in row["choices"])
    assert Counter(row["id"].split("/")[-1] for row in mixture) == {name: 50 for name in MIXTURE_TASKS}


def test_pretraining_texts_are_plain_documents(real_data):
    documents = pretraining_texts()
    assert len(documents) > 1000
    assert sum(len(doc.split()) for doc in documents) > 200_000
    assert all(len(doc.split()) >= 20 for doc in documents)
    markup = [doc for doc in documents if any(mark in doc for mark in ("[[", "{{", "]]", "}}", "<ref"))]
    assert len(markup) <= len(documents) // 100, markup[:3]


# ---- docs/tasks.md ----------------------------------------------------------------------------


def card(name: str) -> str:
    start = DOCS.index(f"\n## {name}\n")
    end = DOCS.find("\n## ", start + 1)
    return DOCS[start:end]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_has_a_card(name, real_data):
    spec = TASKS[name]
    text_ = card(name)
    sizes = {split: len(load_task(name)[split]) for split in SPLITS}
    for row in (
        f"| kind | {spec.kind} |",
        f"| category | {spec.category} |",
        f"| instruction | `{spec.instruction}` |",
        f"| splits | train {sizes['train']}, validation {sizes['validation']}, test {sizes['test']} |",
    ):
        assert row in text_, f"docs/tasks.md, card {name}: missing row {row}"
