"""Models saved with and without their architecture's prefix.

transformers saves a bare model (GPT2Model, BertModel: the hub's `gpt2`, sentence-transformers'
MiniLM) without the first part its task models put before the same tensors (GPT2LMHeadModel's
`transformer.h.0...`, BertForSequenceClassification's `bert.embeddings...`), and loads either
checkpoint into either model. mergekit's architecture tables list both names of such tensors
(aliases). Here, a model whose tensor names are the reference's with one such first part added
or left out takes part under the reference's names; the output is named as the reference is.
Tensors only one side has (a task model's head) stay unmatched, and the usual checks name them.
"""

from __future__ import annotations

import logging

from mergeflow.checkpoint import Checkpoint

log = logging.getLogger(__name__)


def match_name_prefixes(reference: Checkpoint, models: list[Checkpoint]) -> None:
    """Rename, in each model's tensor table, the tensors that are the reference's under a name
    with one first part more or less. Entries keep the names they have in their files."""
    for model in models:
        if model is reference:
            continue
        renamed = _renamed(set(reference.tensors), set(model.tensors))
        if renamed:
            model.tensors = {renamed.get(name, name): entry for name, entry in model.tensors.items()}
            before, after = next(iter(renamed.items()))
            log.info(
                "'%s': %d tensors named as '%s' names them ('%s' as '%s')",
                model.ref,
                len(renamed),
                reference.ref,
                before,
                after,
            )


def _renamed(theirs: set[str], ours: set[str]) -> dict[str, str]:
    """Our names that are theirs with one first part left out or added, to theirs; empty
    unless one first part explains them all."""
    only_theirs, only_ours = theirs - ours, ours - theirs
    if not only_theirs or not only_ours:
        return {}
    for prefix in _first_parts(only_theirs):  # we lack it: each name only we have is theirs without it
        if all(f"{prefix}.{name}" in only_theirs for name in only_ours):
            return {name: f"{prefix}.{name}" for name in only_ours}
    for prefix in _first_parts(only_ours):  # we have it: each of our names under it is theirs without it
        under = [name for name in only_ours if name.startswith(f"{prefix}.")]
        if all(name.removeprefix(f"{prefix}.") in only_theirs for name in under):
            return {name: name.removeprefix(f"{prefix}.") for name in under}
    return {}


def _first_parts(names: set[str]) -> list[str]:
    return sorted({name.split(".", 1)[0] for name in names if "." in name})
