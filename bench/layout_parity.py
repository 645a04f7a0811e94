"""mergeflow against mergekit on which input tensors make which output tensor: `slices:`
configs (layer stacking, the base listed in a slice, a slice's own base_model, slice parameters
and gradients over layers), inputs whose tensor tables differ (an output head tied to the
embeddings in some models, rotary buffers older transformers saved) and GPT-2, whose layers are
`transformer.h.<i>`. Merged by both from float32 zoos of 4-layer models.

Prints a table and writes bench/results/layout_parity.md. Needs the bench extra (mergekit):

    .venv/bin/python bench/layout_parity.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from machine import cpu_model
from parity import markdown_table, merge_with_both, tensors
from safetensors.torch import save_file

from mergeflow.zoo.generated import GeneratedZooSpec, build_generated_zoo

HERE = Path(__file__).resolve().parent


def source(model: str, start: int, end: int, **parameters) -> dict:
    return {"model": model, "layer_range": [start, end]} | ({"parameters": parameters} if parameters else {})


def edited_copy(model: str, target: Path, edit, **config) -> str:
    """A copy of `model` whose tensors `edit` changed in place, and config.json updated."""
    shutil.copytree(model, target, ignore=shutil.ignore_patterns("mergeflow-*"))
    state = tensors(target)
    edit(state)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    settings = json.loads((target / "config.json").read_text()) | config
    (target / "config.json").write_text(json.dumps(settings))
    return str(target)


def cases(root: Path, base: str, a: str, b: str) -> dict[str, dict]:
    """Each config by what it shows. mergekit needs a slice's base among its sources, and a
    weight for every model of ties."""
    ties = {"merge_method": "ties", "base_model": base, "parameters": {"density": 0.5, "weight": 1.0}}

    def ties_of(base_model: str, *models: str) -> dict:
        return ties | {"base_model": base_model, "models": [{"model": m} for m in models]}

    untie = lambda state: state.pop("lm_head.weight")  # noqa: E731
    buffer = "model.layers.0.self_attn.rotary_emb.inv_freq"
    tied_b = edited_copy(b, root / "tied-expert", untie, tie_word_embeddings=True)
    tied_base = edited_copy(base, root / "tied-base", untie, tie_word_embeddings=True)
    older_b = edited_copy(b, root / "older-expert", lambda state: state.update({buffer: torch.ones(8)}))
    return {
        "ties: expert_1 ties its head (stores no lm_head)": ties_of(base, a, tied_b),
        "ties: the base ties its head, the experts store theirs": ties_of(tied_base, a, b),
        "ties: expert_1 has rotary inv_freq buffers saved": ties_of(base, a, older_b),
        "passthrough: layers of two models stacked": {
            "merge_method": "passthrough",
            "slices": [{"sources": [source(a, 0, 3)]}, {"sources": [source(b, 1, 4)]}],
        },
        "ties: the base listed with other layers than the experts'": ties
        | {
            "slices": [
                {"sources": [source(base, 0, 2), source(a, 2, 4), source(b, 0, 2)]},
                {"sources": [source(base, 2, 4), source(a, 2, 4), source(b, 2, 4)]},
            ]
        },
        "ties: the second slice merged onto expert_1 (per-slice base_model)": ties
        | {
            "slices": [
                {"sources": [source(m, 0, 2) for m in (base, a, b)]},
                {"base_model": b, "sources": [source(m, 2, 4) for m in (a, b, base)]},
            ]
        },
        "task_arithmetic: per-slice bases, slice parameters, a weight gradient": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "parameters": {"weight": 1.0},
            "slices": [
                {
                    "base_model": a,
                    "parameters": {"lambda": 0.5},
                    "sources": [source(a, 0, 2), source(b, 0, 2, weight=[0.2, 1.0]), source(base, 0, 2)],
                },
                {"sources": [source(base, 2, 4), source(a, 2, 4), source(b, 2, 4, weight=0.7)]},
            ],
        },
        "linear: a gradient restarting in each slice": {
            "merge_method": "linear",
            "slices": [
                {"sources": [source(a, 0, 2, weight=[1.0, 3.0]), source(b, 2, 4, weight=1.0)]},
                {"sources": [source(a, 2, 4, weight=[1.0, 3.0]), source(b, 0, 2, weight=1.0)]},
            ],
        },
    }


def gpt2_zoo(root: Path) -> list[str]:
    """A 4-layer GPT-2 base and two experts (transformer.h.<i> layers, tied heads)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=4, n_head=2, vocab_size=64, n_positions=16)
    folders = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        with torch.no_grad():  # GPT-2 starts its biases and norms alike in every model
            for parameter in model.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        model.save_pretrained(root / f"gpt2-{seed}")
        folders.append(str(root / f"gpt2-{seed}"))
    return folders


def gpt2_cases(root: Path, base: str, a: str, b: str) -> dict[str, dict]:
    """GPT-2 numbers its layers transformer.h.<i> (as GPT-BigCode, Falcon and Qwen 1 do). The
    hub's `gpt2` is saved bare (GPT2Model: no `transformer.` prefix)."""

    def without_prefix(state: dict) -> None:
        for name in list(state):
            state[name.removeprefix("transformer.")] = state.pop(name)

    bare_b = edited_copy(b, root / "gpt2-bare", without_prefix)
    return {
        "GPT-2 ties: an expert saved bare (no transformer. prefix)": {
            "merge_method": "ties",
            "base_model": base,
            "parameters": {"density": 0.5, "weight": 1.0},
            "models": [{"model": a}, {"model": bare_b}],
        },
        "GPT-2 passthrough: the second slice from a bare model": {
            "merge_method": "passthrough",
            "slices": [{"sources": [source(a, 0, 2)]}, {"sources": [source(bare_b, 1, 4)]}],
        },
        "GPT-2 task_arithmetic: a weight gradient over the layers": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": [0.0, 1.0]}},
                {"model": b, "parameters": {"weight": 0.5}},
            ],
        },
        "GPT-2 passthrough: layers of two models stacked": {
            "merge_method": "passthrough",
            "slices": [{"sources": [source(a, 0, 2)]}, {"sources": [source(b, 1, 4)]}],
        },
        "GPT-2 ties: slices with a gradient restarting in each": {
            "merge_method": "ties",
            "base_model": base,
            "parameters": {"density": 0.5, "weight": [1.0, 0.2]},
            "slices": [
                {"sources": [source(m, 0, 2) for m in (base, a, b)]},
                {"sources": [source(m, 2, 4) for m in (base, a, b)]},
            ],
        },
    }


def qwen2_vl_zoo(root: Path) -> list[str]:
    """Two Qwen2-VL models: a vision tower of 4 blocks (visual.blocks.<i>) beside a decoder of
    3 layers (model.layers.<i>). Their config.json also gives num_hidden_layers at the top, as
    transformers before 5 wrote it: mergekit 0.1.5 reads it there."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}
    text |= {"num_key_value_heads": 1, "vocab_size": 64}
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 1, 1]}
    vision = {"depth": 4, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 2}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, bos_token_id=0, eos_token_id=1)
    folders = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        folder = root / f"qwen2-vl-{seed}"
        model.save_pretrained(folder)
        settings = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(settings | {"num_hidden_layers": 3}))
        folders.append(str(folder))
    return folders


def other_cases(a: str, b: str, vl: list[str]) -> dict[str, dict]:
    gradient = [{"model": vl[0], "parameters": {"weight": [1.0, 0.0]}}]
    gradient.append({"model": vl[1], "parameters": {"weight": [0.0, 1.0]}})
    return {
        "linear: weights that are not binary fractions": {
            "merge_method": "linear",
            "models": [
                {"model": a, "parameters": {"weight": 0.3}},
                {"model": b, "parameters": {"weight": 1 / 3}},
            ],
        },
        "Qwen2-VL linear: a gradient over the vision tower's blocks and the decoder's layers": {
            "merge_method": "linear",
            "models": gradient,
        },
    }


def run_case(root: Path, label: str, settings: dict) -> str:
    both = merge_with_both(root, settings | {"dtype": "float32"})
    theirs, ours = tensors(both.mergekit), tensors(both.mergeflow)
    only_theirs = sorted(set(theirs) - set(ours))
    missing = sorted(set(ours) - set(theirs))
    largest = max(((theirs[n] - ours[n]).abs().max().item() for n in ours if n in theirs), default=0.0)
    exact = not missing and all(torch.equal(theirs[n], ours[n]) for n in ours)
    return (
        f"| {label} | {len(ours)} | {', '.join(only_theirs) or '-'} | {', '.join(missing) or '-'} | "
        f"{largest:.3g} | {exact} | {both.mergeflow_seconds:.2f} s | {both.mergekit_seconds:.1f} s |"
    )


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="layout-parity-") as scratch:
        root = Path(scratch)
        zoo = build_generated_zoo(root / "zoo", GeneratedZooSpec(num_layers=4, num_experts=2, seed=4))
        every = cases(root, zoo["base"], zoo["expert_0"], zoo["expert_1"]) | gpt2_cases(root, *gpt2_zoo(root))
        every |= other_cases(zoo["expert_0"], zoo["expert_1"], qwen2_vl_zoo(root))
        for label, settings in every.items():
            rows.append(run_case(root, label, settings))
            print(rows[-1], flush=True)
    columns = ["config", "mergeflow's tensors", "only mergekit writes", "only mergeflow writes", "max diff"]
    columns += ["bit for bit (mergeflow's tensors)", "mergeflow", "mergekit"]
    table = markdown_table(columns, rows)
    text = (
        "# mergeflow vs mergekit 0.1.5 on slices and on inputs whose tensors differ\n\n"
        f"`bench/layout_parity.py` on {cpu_model()}. A generated zoo (mergeflow.zoo.generated: a base "
        "and two experts of 4 layers, float32) and a GPT-2 one (transformers' GPT2LMHeadModel, seeded "
        "random weights, 4 layers), merged by both tools from the same YAML with "
        "`dtype: float32`. Times are wall time of one merge each: mergekit's a process of its own, "
        "start-up included; mergeflow's in this process.\n\n" + table + "\n\n"
        "Where the base ties its head, mergekit writes a merged `lm_head.weight` (from the base's "
        "embeddings and the experts' heads) that transformers ignores, since the config ties the "
        "head; mergeflow leaves it out (docs/methods.md).\n\n"
        "Qwen2-VL: the vision tower's blocks and the decoder's layers are bit for bit mergekit's, each "
        "stack with a gradient over its own layers. The 4 tensors that differ are the projector's "
        "`visual.merger.mlp.{0,2}`: mergekit's qwen2_vl table makes the projector a module of one "
        "layer, which sits at t = 1 on a gradient; mergeflow puts tensors outside numbered layers at "
        "t = 0. Before mergeflow knew `blocks.<i>`, the tower's blocks sat at t = 0 too. Linear with "
        "weights that are not binary fractions matched mergekit only once each weighted model was "
        "added in one rounding, as torch's addcmul_ does (a fused multiply-add).\n"
    )
    (HERE / "results" / "layout_parity.md").write_text(text)


if __name__ == "__main__":
    main()
