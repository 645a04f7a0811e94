"""The tokenizer a merge writes: the base's, or a model's named by `tokenizer_source` or by
mergekit's `tokenizer` block, carrying the chat template mergekit's `chat_template` picks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from mergeflow.chat_template import NAMED_TEMPLATES
from mergeflow.config import parse_config
from mergeflow.engine import merge
from mergeflow.zoo.generated import GeneratedZooSpec, build_generated_zoo

VOCAB = 256
END_TOKEN = {"base": "<eos>", "expert_0": "hello", "expert_1": "assistant"}


def template_of(name: str) -> str:
    """A chat template that names its model, so an output shows which one was chosen."""
    return "{% for m in messages %}" + name + " {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def write_tokenizer(folder: Path, name: str, chat_template: str | list | None) -> None:
    """A real (word-level) tokenizer whose config says which model it came from."""
    words = ["<unk>", "<eos>", "hello", "user", "assistant"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<eos>",
        "unk_token": "<unk>",
        "from": name,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    # an end token of the vocabulary's own, so the models share one vocabulary
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": END_TOKEN[name]}))


@pytest.fixture(scope="module")
def zoo_with_tokenizers(tmp_path_factory) -> dict[str, str]:
    """The base's template is its own; both experts carry expert_1's: one in a
    chat_template.jinja file, one as the "default" of named templates."""
    zoo = build_generated_zoo(
        tmp_path_factory.mktemp("tok"), GeneratedZooSpec(num_experts=2, vocab_size=VOCAB)
    )
    write_tokenizer(Path(zoo["base"]), "base", template_of("base"))
    write_tokenizer(Path(zoo["expert_0"]), "expert_0", None)
    (Path(zoo["expert_0"]) / "chat_template.jinja").write_text(template_of("expert_1") + "\n")
    named = [
        {"name": "tool_use", "template": "{{ tools }}"},
        {"name": "default", "template": template_of("expert_1")},
    ]
    write_tokenizer(Path(zoo["expert_1"]), "expert_1", named)
    return zoo


def task_arithmetic(zoo: dict[str, str], **extra) -> dict:
    models = [{"model": zoo["expert_0"]}, {"model": zoo["expert_1"]}]
    return {"merge_method": "task_arithmetic", "base_model": zoo["base"], "models": models} | extra


def merged(config: dict, out: Path) -> Path:
    merge(parse_config(config), str(out), progress=False)
    return out


def tokenizer_of(folder: Path) -> str:
    return json.loads((folder / "tokenizer_config.json").read_text())["from"]


def shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*.safetensors")}


def rendered(folder: Path) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)


def test_the_base_tokenizer_by_default_and_by_either_spelling(zoo_with_tokenizers, tmp_path):
    zoo = zoo_with_tokenizers
    default = merged(task_arithmetic(zoo), tmp_path / "default")
    assert tokenizer_of(default) == "base"
    base_files = {p.name: p.read_bytes() for p in Path(zoo["base"]).iterdir() if "token" in p.name}
    assert {name: (default / name).read_bytes() for name in base_files} == base_files  # copied as they are
    for name, spelling in [
        ("source", {"tokenizer_source": "base"}),
        ("block", {"tokenizer": {"source": "base"}}),
        ("padded", {"tokenizer": {"source": "base", "pad_to_multiple_of": 64}}),  # 256 is a multiple
    ]:
        out = merged(task_arithmetic(zoo, **spelling), tmp_path / name)
        assert tokenizer_of(out) == "base", name
        assert shards(out) == shards(default), name


def test_a_model_named_for_the_tokenizer_gives_its_files(zoo_with_tokenizers, tmp_path):
    zoo = zoo_with_tokenizers
    by_source = merged(task_arithmetic(zoo, tokenizer_source=zoo["expert_1"]), tmp_path / "source")
    by_block = merged(task_arithmetic(zoo, tokenizer={"source": zoo["expert_1"]}), tmp_path / "block")
    for out in (by_source, by_block):
        assert tokenizer_of(out) == "expert_1"
        assert json.loads((out / "special_tokens_map.json").read_text()) == {"eos_token": "assistant"}
    assert shards(by_source) == shards(by_block)
    manifest = json.loads((by_block / "mergeflow-manifest.json").read_text())
    assert manifest["config"]["tokenizer"] == {"source": zoo["expert_1"]}


def test_chat_template_auto_takes_the_template_most_models_carry(zoo_with_tokenizers, tmp_path):
    out = merged(task_arithmetic(zoo_with_tokenizers, chat_template="auto"), tmp_path / "auto")
    assert tokenizer_of(out) == "base"  # the base's tokenizer, with the experts' template
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template_of("expert_1")
    assert (out / "chat_template.jinja").read_text() == template_of("expert_1")
    assert rendered(out) == "expert_1 user: hello\n"


def test_a_chat_template_given_in_the_config_replaces_the_tokenizer_sources(zoo_with_tokenizers, tmp_path):
    zoo = zoo_with_tokenizers
    mine = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    out = merged(
        task_arithmetic(zoo, chat_template=mine, tokenizer_source=zoo["expert_0"]), tmp_path / "mine"
    )
    assert tokenizer_of(out) == "expert_0"
    assert (out / "chat_template.jinja").read_text() == mine  # expert_0's own file replaced
    assert rendered(out) == "<user>hello"


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hi"},
]
# Each named format written out by hand, for CONVERSATION and a prompt for the next answer.
FORMATS = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
    "<|im_start|>assistant\nhi<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nhi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "alpaca": "Be brief.\n\n### Instruction:\nhello\n\n### Response:\nhi</s>\n\n### Response:\n",
    # no system role and no prompt for the answer: the system message opens the first turn
    "mistral": "<s> [INST] Be brief.\n\nhello [/INST] hi</s>",
    "exaone": "[|system|]Be brief.[|endofturn|]\n[|user|]hello\n[|assistant|]hi[|endofturn|]\n[|assistant|]",
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_a_named_chat_template_gives_that_format(zoo_with_tokenizers, tmp_path, name):
    from transformers import AutoTokenizer

    out = merged(task_arithmetic(zoo_with_tokenizers, chat_template=name), tmp_path / name)
    assert (out / "chat_template.jinja").read_text() == NAMED_TEMPLATES[name]
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    got = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
    )
    assert got == FORMATS[name]


def test_the_mistral_template_refuses_turns_that_do_not_alternate(zoo_with_tokenizers, tmp_path):
    from jinja2.exceptions import TemplateError
    from transformers import AutoTokenizer

    out = merged(task_arithmetic(zoo_with_tokenizers, chat_template="mistral"), tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    with pytest.raises(TemplateError, match="roles alternate user/assistant"):
        tokenizer.apply_chat_template(CONVERSATION[2:] + CONVERSATION[1:2], tokenize=False)


def test_chat_template_auto_without_any_template_leaves_the_tokenizer_files_alone(tmp_path):
    zoo = build_generated_zoo(tmp_path / "zoo", GeneratedZooSpec(num_experts=2, vocab_size=VOCAB, seed=4))
    for name, folder in zoo.items():
        write_tokenizer(Path(folder), name, None)
    out = merged(task_arithmetic(zoo, chat_template="auto"), tmp_path / "out")
    assert (out / "tokenizer_config.json").read_bytes() == (
        Path(zoo["base"]) / "tokenizer_config.json"
    ).read_bytes()
    assert not (out / "chat_template.jinja").exists()
