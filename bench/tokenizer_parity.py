"""mergeflow against mergekit on models with different tokenizers (tokenizer_source union, base,
padded): the tiny zoo of tests/vocabulary_zoo.py merged by both, in float32 and bfloat16.

mergekit numbers a union's new ordinary tokens in hash-map order, which changes from run to
run; its vocabulary rows are put in mergeflow's token order before comparing. Prints a table
and writes bench/results/tokenizer_parity.md. Needs the bench extra (mergekit):

    .venv/bin/python bench/tokenizer_parity.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from vocabulary_zoo import VOCAB_TENSORS, write_zoo  # noqa: E402

from mergeflow.config import parse_config  # noqa: E402
from mergeflow.engine import merge  # noqa: E402

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


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out |= load_file(file)
    return out


def compare(mergekit_out: Path, mergeflow_out: Path) -> tuple[bool, float, float, bool]:
    """Whether the vocabularies hold the same tokens; the largest difference in the vocabulary
    tensors (rows matched by token) and elsewhere; whether everything is bit for bit equal."""
    theirs, ours = tensors(mergekit_out), tensors(mergeflow_out)
    their_ids = AutoTokenizer.from_pretrained(mergekit_out).get_vocab()
    our_ids = AutoTokenizer.from_pretrained(mergeflow_out).get_vocab()
    if set(their_ids) != set(our_ids):
        return False, float("nan"), float("nan"), False
    order = torch.arange(theirs[VOCAB_TENSORS[0]].shape[0])
    for token, index in our_ids.items():
        order[index] = their_ids[token]
    for name in VOCAB_TENSORS:
        theirs[name] = theirs[name][order]

    def largest(names):
        return max(((theirs[n].float() - ours[n].float()).abs().max().item() for n in names), default=0.0)

    others = [n for n in ours if n not in VOCAB_TENSORS]
    exact = all(torch.equal(theirs[n], ours[n]) for n in ours)
    return True, largest(VOCAB_TENSORS), largest(others), exact


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="tokenizer-parity-") as scratch:
        root = Path(scratch)
        for dtype in ("float32", "bfloat16"):
            zoo = write_zoo(root / dtype, getattr(torch, dtype))
            for method, tokenizer in CASES:
                settings = config(zoo, method, dtype, tokenizer)
                (root / "config.yaml").write_text(yaml.safe_dump(settings))
                mergekit_out, mergeflow_out = root / "mergekit", root / "mergeflow"
                for folder in (mergekit_out, mergeflow_out):
                    shutil.rmtree(folder, ignore_errors=True)
                subprocess.run(
                    [
                        str(Path(sys.executable).parent / "mergekit-yaml"),
                        str(root / "config.yaml"),
                        str(mergekit_out),
                    ],
                    check=True,
                    capture_output=True,
                )
                merge(parse_config(settings), str(mergeflow_out))
                same_tokens, vocab_diff, other_diff, exact = compare(mergekit_out, mergeflow_out)
                described = yaml.safe_dump(tokenizer, default_flow_style=True).strip()
                rows.append(
                    f"| {dtype} | {method} | `{described}` | {same_tokens} | {vocab_diff:.3g} | "
                    f"{other_diff:.3g} | {exact} |"
                )
                print(rows[-1], flush=True)
    table = "\n".join(
        [
            "| dtype | method | tokenizer | same tokens | max diff, embeddings and head | "
            "max diff, other tensors | bit for bit |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    text = (
        "# mergeflow vs mergekit 0.1.5 on models with different tokenizers\n\n"
        "`bench/tokenizer_parity.py`: the zoo of tests/vocabulary_zoo.py (a base and two experts whose "
        "tokenizers add, reorder and lack tokens). Vocabulary rows are matched by token (mergekit "
        "numbers a union's new tokens in an order that changes from run to run).\n\n" + table + "\n\n"
        "In float32 only padded rows differ: mergeflow takes their mean in float64. In bfloat16 the "
        "differences are those of mergekit's bfloat16 arithmetic, as large in the tensors without a "
        "vocabulary as in the realigned ones (the README's benchmark notes them for the bench zoo).\n"
    )
    (HERE / "results" / "tokenizer_parity.md").write_text(text)


if __name__ == "__main__":
    main()
