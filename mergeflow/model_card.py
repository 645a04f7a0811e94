"""The merged model's README.md: a Hugging Face model card saying what was merged, how, and
from which exact inputs (their content hashes, as the manifest records them)."""

from __future__ import annotations

import re

import yaml

import mergeflow
from mergeflow.checkpoint import HUB_REPO_ID
from mergeflow.config import MergeConfig

MODEL_CARD = "README.md"


def model_card(config: MergeConfig, inputs: dict) -> str:
    """The card for a merge of `config`'s models with the `inputs` the manifest records. Its
    front matter names as `base_model` the inputs given as Hugging Face repo ids (the hub links
    them; without the @revision, which the text keeps); local paths and URIs are listed in the
    text only. It does not depend on where the output goes or when it is made: the same merge
    writes the same card."""
    method = config.method
    base, models = inputs["base"], inputs["models"]
    roles = dict.fromkeys(_slice_bases(config), "slice base")
    refs = ([base["ref"]] if base else []) + [m["ref"] for m in models]
    parts = [part for ref in refs for part in ref.split("+")]  # model+adapter: both are models
    hub_ids = list(dict.fromkeys(m.group("repo") for part in parts if (m := HUB_REPO_ID.fullmatch(part))))
    front = {"library_name": "transformers", "tags": ["mergeflow", "merge", method.name]}
    if hub_ids:
        front = {"base_model": hub_ids} | front
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        f"# A {method.name} merge",
        "",
        f"A merge of {len(models)} model{'s' if len(models) != 1 else ''}"
        + (f" onto the base {_code(base['ref'])}" if base else "")
        + f" with mergeflow {mergeflow.__version__}, method `{method.name}`: {method.summary}",
        "",
        f"    {method.formula}",
        "",
        "| input | role | sha256 |",
        "|---|---|---|",
        *([f"| {_code(base['ref'])} | base | `{base['sha256']}` |"] if base else []),
        *(f"| {_code(m['ref'])} | {roles.get(m['ref'], 'model')} | `{m['sha256']}` |" for m in models),
        "",
        "A model's sha256 is taken over `name sha256` lines of its config.json and weight files "
        "(and a LoRA adapter's files, for `model+adapter`); `mergeflow-manifest.json` lists every "
        "file of this folder with its sha256.",
        "",
        *_layers_section(config),
        "## Configuration",
        "",
        "```yaml",
        yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _slice_bases(config: MergeConfig) -> set[str]:
    """The models that slices only merge onto (their own base_model), never merge."""
    groups = config.groups()
    bases = {group.base for group in groups if group.base not in (None, config.base_model)}
    return bases - {entry.model for group in groups for entry in group.entries}


def _layers_section(config: MergeConfig) -> list[str]:
    """For a `slices:` merge, which layers of which models make each range of output layers
    (layers counted from 0, both ends included)."""
    if not config.slices:
        return []
    rows, start = [], 0
    for layer_slice in config.slices:
        length = layer_slice.sources[0].layer_range[1] - layer_slice.sources[0].layer_range[0]
        made_of = ", ".join(
            f"{_code(s.model)} layer{'s' if s.layer_range[1] - s.layer_range[0] > 1 else ''} "
            f"{_span(*s.layer_range)}"
            for s in layer_slice.sources
        )
        if layer_slice.base_model:
            made_of += f"; base {_code(layer_slice.base_model)}"
        rows.append(f"| {_span(start, start + length)} | {made_of} |")
        start += length
    return ["## Layers", "", "| output layers | from |", "|---|---|", *rows, ""]


def _span(start: int, end: int) -> str:
    return f"{start}" if end - start == 1 else f"{start}–{end - 1}"


def _code(ref: str) -> str:
    """`ref` as Markdown inline code in a table cell: pipes escaped (GitHub splits table cells
    on them even inside code), a backtick in it fenced by a longer run of them."""
    longest = max((len(run) for run in re.findall(r"`+", ref)), default=0)
    fence = "`" * (longest + 1)
    padded = f" {ref} " if longest else ref
    return f"{fence}{padded}{fence}".replace("|", "\\|")
