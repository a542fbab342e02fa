"""The toy tokenizer: word level over the corpus's closed vocabulary, digit pairs isolated.

Built with the `tokenizers` library and wrapped as an ordinary HF fast tokenizer, so
`AutoTokenizer.from_pretrained(model_dir)` loads it. It avoids the pitfalls of docs/design.md §5:
four special tokens (<pad>=0, <bos>=1, <eos>=2, <unk>=3, so id 0 is not the only special id),
<bos> prepended by the post-processor, no `token_type_ids`. Years split into a century token and a
two-digit token ("1732" -> "17", "32") because the pre-tokenizer isolates digit pairs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from clt_ray.toy.corpus import words

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
DIGIT_PAIRS = tuple(f"{i:02d}" for i in range(100))


def vocabulary() -> list[str]:
    """Specials, then the 100 digit pairs, then every corpus word; the index is the token id."""
    return [*SPECIAL_TOKENS, *DIGIT_PAIRS, *words()]


def build_tokenizer() -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast  # slow to import: only when building

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Whitespace(),  # words and runs of punctuation
        pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated"),  # "1732" -> "17", "32"
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", BOS_ID)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # join with spaces, tidy ". ,"
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )
