"""Where a trainer's (x, y) batches come from (docs/design.md §4): activation sources and the shuffle
buffer (`sources`), text corpora and token windows (`text`), the LM's activations over them
(`activations`)."""

from clt_ray.data.activations import (
    LMBlocks,
    lm_blocks,
    lm_source,
    trainable_activations,
    window_activations,
)
from clt_ray.data.sources import (
    ActivationSource,
    Batch,
    BlockStream,
    ShuffledSource,
    State,
    TensorBlocks,
    TensorSource,
    split_batches,
    take_tokens,
)
from clt_ray.data.text import (
    Documents,
    FileDocuments,
    HFDocuments,
    SlicedDocuments,
    TokenWindows,
    ToyDocuments,
    bos_id,
    check_corpus,
    heldout_windows,
    make_documents,
    pad_id,
    pad_windows,
)

__all__ = [
    "ActivationSource", "Batch", "BlockStream", "Documents", "FileDocuments", "HFDocuments",
    "LMBlocks", "ShuffledSource", "SlicedDocuments", "State", "TensorBlocks", "TensorSource",
    "TokenWindows", "ToyDocuments", "bos_id", "check_corpus", "heldout_windows", "lm_blocks",
    "lm_source", "make_documents", "pad_id", "pad_windows", "split_batches", "take_tokens",
    "trainable_activations", "window_activations",
]
