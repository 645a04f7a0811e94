"""Tiny Llama models with word-level tokenizers that differ the ways experts' do (added
tokens, special tokens, reordered or missing ones): for tests/test_vocabulary.py and for
bench/tokenizer_parity.py, which merges them with mergekit too."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

SPECIAL = ["<unk>", "<eos>", "<|im_start|>"]
BASE = ["<unk>", "<eos>", "a", "b", "c", "d"]
# expert_0 adds an ordinary token and a special one; expert_1 has c and d swapped, lacks b and
# adds its own token; both add "g" (neither the base): each rule of mergekit's is used.
EXPERT_0 = [*BASE, "e", "g", "<|im_start|>"]
EXPERT_1 = ["<unk>", "<eos>", "a", "d", "c", "f", "g"]
VOCABS = {"base": BASE, "expert_0": EXPERT_0, "expert_1": EXPERT_1}
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
# union over base, expert_0, expert_1: ordinary tokens by model, then the added ones
UNION = [*BASE, "e", "g", "f", "<|im_start|>"]


def write_model(folder: Path, words: list[str], seed: int, dtype: torch.dtype) -> None:
    """A tiny Llama (seeded random weights) with a word-level tokenizer of `words`, in order."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(words),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(w, special=True) for w in words if w in SPECIAL])
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "eos_token": "<eos>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))


def write_zoo(root: Path, dtype: torch.dtype) -> dict[str, str]:
    for seed, (name, words) in enumerate(VOCABS.items()):
        write_model(root / name, words, seed, dtype)
    return {name: str(root / name) for name in VOCABS}


def with_paths(tokens: dict, zoo: dict[str, str]) -> dict:
    """`tokens` with the models named by their paths, as a config names them."""
    out = {}
    for word, given in tokens.items():
        source = given["source"]
        if isinstance(source, str):
            source = zoo[source]
        elif "model" in source:
            source = source | {"model": zoo[source["model"]]}
        out[word] = given | {"source": source}
    return out


# mergekit's tokenizer.tokens, with the models by name: every kind of source, forced or not,
# and a token no model has (added to the vocabulary).
TOKENS = {
    "<|im_start|>": {"source": {"kind": "model_token", "model": "base", "token": "<eos>"}},
    "e": {"source": {"kind": "zero"}, "force": True},
    "g": {"source": "expert_1"},
    "<tool>": {"source": {"kind": "model_token", "model": "expert_0", "token_id": 2}},
    "a": {"source": "base", "force": True},
}
