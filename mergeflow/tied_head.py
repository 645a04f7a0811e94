"""Output heads tied to the embeddings in some inputs and stored in others.

A model whose `tie_word_embeddings` is set stores no output head: transformers uses the
token embeddings for it. Tools differ in what they write (some save the tied head anyway), so
experts of one base can disagree. As in mergekit's architecture tables (the head is optional,
with the embeddings as its tied name), a model that ties its head and lacks the one the
reference has takes part with its embeddings. One that lacks it untied is refused as
incomplete, where mergekit would use its embeddings all the same. The output follows the
reference (the base, or the first model): a head only other models store is not merged where
the reference ties it.
"""

from __future__ import annotations

import logging

from mergeflow.checkpoint import Checkpoint

log = logging.getLogger(__name__)

# (head, embeddings) as the architectures name them (those mergekit's architecture tables tie,
# and GPT-NeoX): Llama, Mistral, Qwen, Gemma, Phi and most others; GPT-2 and GPT-BigCode;
# Qwen3-VL; InternLM2; Mamba; GPT-NeoX; BERT, RoBERTa and DistilBERT masked LMs.
TIED_HEADS = (
    ("lm_head.weight", "model.embed_tokens.weight"),
    ("lm_head.weight", "transformer.wte.weight"),
    ("lm_head.weight", "model.language_model.embed_tokens.weight"),
    ("output.weight", "model.tok_embeddings.weight"),
    ("lm_head.weight", "backbone.embeddings.weight"),
    ("embed_out.weight", "gpt_neox.embed_in.weight"),
    ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
    ("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight"),
    ("vocab_projector.weight", "distilbert.embeddings.word_embeddings.weight"),
)


def match_tied_heads(reference: Checkpoint, models: list[Checkpoint]) -> None:
    """Make each model's head agree with the reference's: the model's embeddings stand in for
    a head it ties, and a head the reference ties is left out of the model's tensors."""
    for head, embeddings in TIED_HEADS:
        if embeddings not in reference.tensors:
            continue
        for model in models:
            if model is reference or embeddings not in model.tensors:
                continue
            if head in reference.tensors and head not in model.tensors and _ties(model):
                model.tensors[head] = model.tensors[embeddings]
                log.info("'%s' has no '%s': its '%s' stand in for it (tied)", model.ref, head, embeddings)
            elif head not in reference.tensors and head in model.tensors:
                del model.tensors[head]
                if not _ties(model):
                    log.warning(
                        "'%s': its '%s' is not merged: the output ties its head to the embeddings, "
                        "as '%s' does",
                        model.ref,
                        head,
                        reference.ref,
                    )


def _ties(model: Checkpoint) -> bool:
    return (model.config or {}).get("tie_word_embeddings") is True
