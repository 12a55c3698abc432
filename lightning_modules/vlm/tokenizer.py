r"""Byte-level BPE tokenizer for the cpu preset, trained offline on the dataset's VQA text.

Byte-level, so any text encodes; special tokens ``<pad>``, ``<s>`` (BOS), ``</s>`` (EOS) and the
LLaVA image placeholder ``<image>``. Pre-tokenisation isolates words (``\w+``), runs of
punctuation and runs of whitespace, so a word is the same token in the prompt ("the white
cylinder") and in code ("get_actor('white cylinder')"): unlike GPT-2's " white" / "white", a
small model trained from scratch only has to copy tokens. It is wrapped as a
``PreTrainedTokenizerFast`` and saved with the processor (``save_pretrained``).
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, IMAGE = "<pad>", "<s>", "</s>", "<image>"
PIECES = r"\w+|[^\w\s]+|\s+"  # words, punctuation runs, whitespace runs


def train_tokenizer(texts, vocab_size: int = 1024, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (an iterable of strings)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PIECES), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[PAD, BOS, EOS, IMAGE],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   extra_special_tokens={"image_token": IMAGE}, padding_side="right",
                                   clean_up_tokenization_spaces=False)
