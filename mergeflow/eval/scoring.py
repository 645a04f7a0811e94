"""Multiple-choice scoring by log-likelihood, the way lm-evaluation-harness scores its
`multiple_choice` tasks: the prediction is the choice with the highest summed log-probability
of its tokens given the prompt (`acc`, not length-normalised).

Prompt and choice are tokenised separately and concatenated (no BOS, no special tokens);
training in `mergeflow.zoo.training` builds its sequences the same way, so a model is scored
on exactly the token sequences it was trained on.

Speed matters here (a 135M model on 2 CPU cores, thousands of prompts), so:
- when every choice of an example is a single token, one forward pass of the prompt scores
  them all;
- rows are sorted by length and packed into batches under a token budget, right-padded — with a
  causal mask, real tokens never attend to padding on their right, so no attention mask is needed;
- the vocabulary projection runs only at the positions that are scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mergeflow.errors import DataError


@dataclass(frozen=True)
class _Row:
    """One forward pass: `ids`, and for each scored choice the positions whose next-token
    log-probabilities are summed, with the target tokens."""

    example: int
    ids: list[int]
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
        if all(len(ids) == 1 for ids in option_ids):
            scored = [(c, [last], ids) for c, ids in enumerate(option_ids)]
            rows.append(_Row(i, prompt_ids, scored))
            continue
        for c, ids in enumerate(option_ids):
            positions = list(range(last, last + len(ids)))
            rows.append(_Row(i, prompt_ids + ids[:-1], [(c, positions, ids)]))
    return rows


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


def _hidden_and_head(model):
    """The decoder body and the output projection, so logits are computed only where needed.
    Models without that split (not the case for the Llama family) fall back to full logits."""
    body = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if body is not None and head is not None:
        return body, head
    return None, None


@torch.no_grad()
def choice_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    max_batch_tokens: int = 4096,
    progress: bool = False,
    description: str = "scoring",
) -> list[list[float]]:
    """Summed log P(choice | prompt) for every choice of every example."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    body, head = _hidden_and_head(model)
    scores = [[0.0] * len(options) for options in choices]
    batches = _batches(_rows(tokenizer, prompts, choices), max_batch_tokens)
    for batch in tqdm(batches, desc=description, unit="batch", disable=not progress, leave=False):
        width = len(batch[-1].ids)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        for r, row in enumerate(batch):
            ids[r, : len(row.ids)] = torch.tensor(row.ids)
        ids = ids.to(device)
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
        if body is not None:
            hidden = body(input_ids=ids).last_hidden_state
            logits = head(hidden[rows_t, positions_t])
        else:
            logits = model(input_ids=ids).logits[rows_t, positions_t]
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
