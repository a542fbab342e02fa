"""Activations of the LM over token windows: the trainable tokens' (x, y) (lm.keep_mask drops BOS
and padding), the LM as a resumable block stream (`LMBlocks`) and a run's sources built on it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from clt_ray.config import DataConfig, ModelConfig
from clt_ray.data.sources import Batch, BlockStream, ShuffledSource, State
from clt_ray.data.text import SlicedDocuments, TokenWindows, make_documents, pad_id, pad_windows
from clt_ray.lm import d_model, extract_activations, keep_mask, n_layers
from clt_ray.lm.loading import to_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase


def trainable_activations(model: PreTrainedModel, ids: Tensor, mask: Tensor, input_hook: str,
                          output_hook: str, dtype: torch.dtype = torch.float32
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """(token ids [n], x, y [n, L, d]) of the trainable tokens of windows ids/mask [N, T]: one
    forward pass, BOS and padding dropped (lm.keep_mask)."""
    x, y = extract_activations(model, ids, mask, input_hook=input_hook, output_hook=output_hook,
                               dtype=dtype)
    keep = keep_mask(ids, mask)
    return ids[keep], x[keep.to(x.device)], y[keep.to(y.device)]


class LMBlocks(BlockStream):
    """Runs the LM in this process over token windows; each block is the activations of
    `lm_batch_size` windows with BOS and padding dropped (lm.keep_mask)."""

    def __init__(self, model: PreTrainedModel, windows: TokenWindows, *, input_hook: str,
                 output_hook: str, lm_batch_size: int, dtype: torch.dtype = torch.float32,
                 pad_id: int = 0) -> None:
        self.model, self.windows, self.lm_batch_size = model, windows, lm_batch_size
        self.input_hook, self.output_hook, self.dtype, self.pad_id = (
            input_hook, output_hook, dtype, pad_id)
        self.n_layers, self.d_model = n_layers(model), d_model(model)

    def __next__(self) -> Batch:
        rows = [w for _, w in zip(range(self.lm_batch_size), self.windows)]
        if not rows:
            raise StopIteration
        ids, mask = pad_windows(rows, self.pad_id)
        _, x, y = trainable_activations(self.model, ids, mask, self.input_hook, self.output_hook,
                                        self.dtype)
        return x, y

    def state(self) -> State:
        return self.windows.state()

    def restore(self, state: State) -> None:
        self.windows.restore(state)




# --- building the sources of a run -------------------------------------------------------------


def lm_blocks(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: DataConfig,
              model_cfg: ModelConfig, heldout: bool, part: tuple[int, int] = (0, 1)) -> LMBlocks:
    """The LM over the training (or held-out) documents; part (i, n): only documents i, i + n, …
    (a data-parallel replica's share)."""
    docs = SlicedDocuments(make_documents(data, heldout), *part)
    windows = TokenWindows(docs, tokenizer, data.context_size, prefetch=data.lm_batch_size)
    return LMBlocks(model, windows, input_hook=model_cfg.input_hook,
                    output_hook=model_cfg.output_hook, lm_batch_size=data.lm_batch_size,
                    dtype=to_dtype(data.dtype), pad_id=pad_id(tokenizer))


def lm_source(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: DataConfig,
              model_cfg: ModelConfig, batch_size: int) -> ShuffledSource:
    """The training source of a `data.source: lm` config: the LM over the training documents,
    through the shuffle buffer."""
    blocks = lm_blocks(model, tokenizer, data, model_cfg, heldout=False)
    return ShuffledSource(blocks, batch_size, data.shuffle_buffer, seed=data.seed)




def window_activations(model: PreTrainedModel, ids: Tensor, mask: Tensor, model_cfg: ModelConfig,
                       data: DataConfig) -> Batch:
    """(x, y) [n, L, d] of the trainable tokens (lm.keep_mask) of windows ids/mask [N, T]."""
    xs, ys = [], []
    for i in range(0, len(ids), data.lm_batch_size):
        _, x, y = trainable_activations(model, ids[i : i + data.lm_batch_size],
                                        mask[i : i + data.lm_batch_size], model_cfg.input_hook,
                                        model_cfg.output_hook, to_dtype(data.dtype))
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)
