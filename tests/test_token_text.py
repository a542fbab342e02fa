"""features.collect.TokenText: joined display strings give back the decoded text, for the toy
word-level tokenizer, a byte-level BPE (GPT-2 style) and a SentencePiece-style Metaspace one."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from clt_ray.features.collect import TokenText

TEXTS = ["The cat sat on the mat, and the dog followed the cat.",
         "The people of Ostrel speak Keldric. The capital of Varnia is Tolbek."] * 20


def _trained(pre, dec) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre, dec
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(pre, pre_tokenizers.ByteLevel) \
        else []
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>"], initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def _toy():
    from clt_ray.toy.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.mark.parametrize("make", [
    _toy,
    lambda: _trained(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()),
    lambda: _trained(pre_tokenizers.Metaspace(), decoders.Metaspace()),
], ids=["toy-word-level", "byte-level-bpe", "metaspace"])
def test_joined_tokens_read_like_the_decoded_text(make):
    tokenizer = make()
    for text in TEXTS[:2]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) > 10
        shown = TokenText(tokenizer)(ids)
        assert "".join(shown).strip() == tokenizer.decode(ids).strip()
        assert "".join(shown).count(" ") >= text.count(" ") - 1  # words stay apart
