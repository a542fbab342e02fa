"""Make and train a toy GPT-2 or Llama on the synthetic corpus, on CPU, deterministically."""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from clt_ray.toy.corpus import iter_documents
from clt_ray.toy.recipe import ToyRecipe
from clt_ray.toy.tokenizer import BOS_ID, EOS_ID, PAD_ID


def make_model(recipe: ToyRecipe, vocab_size: int) -> PreTrainedModel:
    """A freshly initialised model (seeded by the caller). No dropout: training is short and
    deterministic, and hooks see the same activations in train and eval mode."""
    ids = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
               initializer_range=recipe.init_std)
    if recipe.arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_positions=recipe.n_ctx, n_ctx=recipe.n_ctx,
            n_embd=recipe.d_model, n_layer=recipe.n_layer, n_head=recipe.n_head,
            n_inner=recipe.d_mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=recipe.d_model, intermediate_size=recipe.d_mlp,
        num_hidden_layers=recipe.n_layer, num_attention_heads=recipe.n_head,
        num_key_value_heads=recipe.n_kv_head or recipe.n_head,
        max_position_embeddings=recipe.n_ctx, tie_word_embeddings=False, **ids)
    return LlamaForCausalLM(config)


def batches(recipe: ToyRecipe, tokenizer: PreTrainedTokenizerFast) -> Iterator[torch.Tensor]:
    """Endless (batch, n_ctx) token batches: <bos> + one full-length document per row."""
    docs = iter_documents(recipe.seed, recipe.n_ctx - 1, recipe.span_len, recipe.spans,
                          recipe.chants)
    while True:
        enc = tokenizer(list(itertools.islice(docs, recipe.batch_size)))
        yield torch.tensor(enc["input_ids"])


def lr_at(step: int, recipe: ToyRecipe) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    warmup = min(recipe.warmup, recipe.steps)
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, recipe.steps - warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seeded, deterministic torch for the block; the caller's settings come back afterwards."""
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was, warn_only=warn_only)


def train(recipe: ToyRecipe, tokenizer: PreTrainedTokenizerFast, progress: bool = True
          ) -> tuple[PreTrainedModel, dict[str, float]]:
    """Train a toy model from scratch; returns it (eval mode) and {final_loss, train_seconds, threads}."""
    with deterministic(recipe.seed):
        model = make_model(recipe, len(tokenizer))
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=recipe.lr, betas=(0.9, 0.98))
        model.train()
        start = time.perf_counter()
        bar = tqdm(range(recipe.steps), desc=f"toy {recipe.arch}", disable=not progress,
                   leave=False)
        smooth = float("nan")
        for step, input_ids in zip(bar, batches(recipe, tokenizer)):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, recipe)
            loss = model(input_ids=input_ids, labels=input_ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            smooth = loss.item() if step == 0 else 0.95 * smooth + 0.05 * loss.item()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{smooth:.3f}")
        seconds = time.perf_counter() - start
    model.eval()
    return model, {"final_loss": smooth, "train_seconds": seconds,
                   "threads": torch.get_num_threads()}
