"""Multiple-choice scoring by log-likelihood, the way lm-evaluation-harness scores its
`multiple_choice` tasks: the prediction is the choice with the highest summed log-probability
of its tokens given the prompt (`acc`, not length-normalised).

Prompt and choice are tokenised separately and concatenated (no BOS, no special tokens);
training in `mergeflow.zoo.training` builds its sequences the same way, so a model is scored
on exactly the token sequences it was trained on.

Speed matters here (a 135M model on 2 CPU cores, thousands of prompts), so each example is one
row: the prompt once, then every choice's tokens but its last, each choice seeing only the prompt
and its own earlier tokens (a per-row 4-D attention mask, positions restarting after the prompt).
The first token of every choice is predicted from the prompt's last position. Rows are sorted by
length and batched under a token budget, and the vocabulary projection runs only at the
positions that are scored. The tokens every prompt of a call starts with (a task's instruction,
about a third of all prompt tokens) are run once and their keys and values reused by every
batch. The result equals scoring prompt + choice one pair at a time (tested).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from mergeflow.errors import DataError


@dataclass(frozen=True)
class _Row:
    """One example: `ids` = prompt + each choice but its last token; for each choice the
    positions whose next-token log-probabilities are summed, with the target tokens."""

    example: int
    ids: list[int]
    prompt_length: int
    segments: list[tuple[int, int]]  # (start, length) of each choice's tokens in ids
    choices: list[tuple[int, list[int], list[int]]]  # (choice index, positions, targets)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_many(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """One batched call: per-text calls cost ~0.5 ms each in transformers' Python layer."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _rows(tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]]) -> list[_Row]:
    rows = []
    prompt_ids_all = encode_many(tokenizer, prompts)
    flat_ids = iter(encode_many(tokenizer, [option for options in choices for option in options]))
    for i, (prompt_ids, options) in enumerate(zip(prompt_ids_all, choices, strict=True)):
        prompt = prompts[i]
        option_ids = [next(flat_ids) for _ in options]
        if not prompt_ids or any(not ids for ids in option_ids):
            raise DataError(f"example {i}: the prompt or a choice encodes to no tokens: {prompt[:60]!r}")
        last = len(prompt_ids) - 1
        ids, segments, scored = list(prompt_ids), [], []
        for c, option in enumerate(option_ids):
            start = len(ids)
            ids += option[:-1]
            segments.append((start, len(option) - 1))
            scored.append((c, [last] + list(range(start, start + len(option) - 1)), option))
        rows.append(_Row(i, ids, len(prompt_ids), segments, scored))
    return rows


def _shared_prefix(rows: list[_Row]) -> int:
    """How many leading tokens every row shares, leaving each at least its last prompt token
    (the position that predicts every choice's first token)."""
    first = rows[0].ids
    shared = min(row.prompt_length for row in rows) - 1
    for row in rows:
        while shared and row.ids[:shared] != first[:shared]:
            shared -= 1
    return shared


def _without_prefix(row: _Row, shared: int) -> _Row:
    return replace(
        row,
        ids=row.ids[shared:],
        prompt_length=row.prompt_length - shared,
        segments=[(start - shared, length) for start, length in row.segments],
        choices=[(c, [p - shared for p in positions], targets) for c, positions, targets in row.choices],
    )


def _batches(rows: list[_Row], max_tokens: int) -> list[list[_Row]]:
    rows = sorted(rows, key=lambda r: len(r.ids))
    batches, current = [], []
    for row in rows:
        # The batch is padded to its last (longest) row.
        if current and (len(current) + 1) * len(row.ids) > max_tokens:
            batches.append(current)
            current = []
        current.append(row)
    if current:
        batches.append(current)
    return batches


def _packed(batch: list[_Row], pad: int, shared: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, a boolean [batch, 1, query, key] mask and position ids for packed rows
    that follow `shared` cached tokens (every row sees all of them)."""
    width = len(batch[-1].ids)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = torch.eye(width, dtype=torch.bool).repeat(len(batch), 1, 1)  # padding sees itself only
    for r, row in enumerate(batch):
        ids[r, : len(row.ids)] = torch.tensor(row.ids)
        prompt = row.prompt_length
        mask[r, :prompt, :prompt] = causal[:prompt, :prompt]
        positions[r, :prompt] = torch.arange(prompt)
        for start, length in row.segments:
            end = start + length
            mask[r, start:end, :prompt] = True
            mask[r, start:end, start:end] = causal[:length, :length]
            positions[r, start:end] = torch.arange(prompt, prompt + length)
    seen_prefix = torch.ones(len(batch), width, shared, dtype=torch.bool)
    return ids, torch.cat([seen_prefix, mask], dim=2)[:, None], positions + shared


def body_and_head(model):
    """The decoder body and the output projection, so logits are computed only where needed.
    Models without that split (not the case for the Llama family) fall back to full logits."""
    body = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if body is not None and head is not None:
        return body, head
    return None, None


def _prefix_cache(body, rows: list[_Row], device) -> tuple[int, object | None]:
    """(number of shared leading tokens, their key/value cache), or (0, None) when there is
    nothing to share or the model returns no cache."""
    shared = _shared_prefix(rows) if body is not None and rows else 0
    if not shared:
        return 0, None
    output = body(input_ids=torch.tensor([rows[0].ids[:shared]], device=device), use_cache=True)
    cache = getattr(output, "past_key_values", None)
    return (shared, cache) if cache is not None else (0, None)


@torch.no_grad()
def choice_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    max_batch_tokens: int = 1024,
    progress: bool = False,
    description: str = "scoring",
) -> list[list[float]]:
    """Summed log P(choice | prompt) for every choice of every example."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    body, head = body_and_head(model)
    scores = [[0.0] * len(options) for options in choices]
    rows = _rows(tokenizer, prompts, choices)
    shared, prefix_cache = _prefix_cache(body, rows, device)
    batches = _batches([_without_prefix(row, shared) for row in rows], max_batch_tokens)
    for batch in tqdm(batches, desc=description, unit="batch", disable=not progress, leave=False):
        ids, mask, position_ids = (t.to(device) for t in _packed(batch, pad, shared))
        # Gather every scored position of the batch, then project only those.
        row_index, position, targets, owners = [], [], [], []
        for r, row in enumerate(batch):
            for c, positions, target in row.choices:
                row_index += [r] * len(positions)
                position += positions
                targets += target
                owners += [(row.example, c)] * len(positions)
        rows_t = torch.tensor(row_index, device=device)
        positions_t = torch.tensor(position, device=device)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)  # each forward appends its keys to the cache
            cache.batch_repeat_interleave(len(batch))
            inputs |= {"past_key_values": cache, "use_cache": True}
        if body is not None:
            logits = head(body(**inputs).last_hidden_state[rows_t, positions_t])
        else:
            logits = model(**inputs).logits[rows_t, positions_t]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        picked = logprobs[torch.arange(len(targets), device=device), torch.tensor(targets, device=device)]
        for (example, c), value in zip(owners, picked.tolist(), strict=True):
            scores[example][c] += value
    return scores


def accuracy(model, tokenizer, dataset, progress: bool = False, description: str = "scoring") -> float:
    """Share of examples whose highest-scoring choice is the label (ties go to the first)."""
    scores = choice_logprobs(
        model, tokenizer, dataset["prompt"], dataset["choices"], progress=progress, description=description
    )
    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
    correct = sum(p == label for p, label in zip(predictions, dataset["label"], strict=True))
    return correct / len(scores)
