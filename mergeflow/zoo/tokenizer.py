"""A byte-level BPE tokenizer trained here for the small models.

SmolLM2's 49k-token vocabulary would make the output layer most of a 5M-parameter model and
most of its training time on 2 CPU cores; a byte-level BPE (the same algorithm) with 8k tokens,
trained on the pre-training text and the tasks' training prompts, keeps the models small.
Training is deterministic for the same texts in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    # One special token serves as BOS, EOS and padding, as in GPT-2 and SmolLM2.
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS)
