"""Make and train a toy GPT-2 or Llama on the synthetic corpus, on CPU, deterministically."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from clt_ray.toy.corpus import document_tokens, drill_tokens, render
from clt_ray.toy.recipe import ToyRecipe
from clt_ray.toy.tokenizer import BOS_ID, EOS_ID, PAD_ID

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast


def make_model(recipe: ToyRecipe, vocab_size: int) -> PreTrainedModel:
    """A freshly initialised model (seeded by the caller). No dropout: training is short and
    deterministic, and hooks see the same activations in train and eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
           "initializer_range": recipe.init_std}
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


def batches(recipe: ToyRecipe, tokenizer: PreTrainedTokenizerFast
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`recipe.steps` (input_ids, position_ids) batches following `recipe.curriculum`.

    Each step holds `batch_size * n_ctx` tokens: rows of the phase's window (<bos> + a document or
    a drill). A row shorter than `n_ctx` sits at a random position offset (from torch's seeded
    RNG), so GPT-2's learned position embeddings train at every position from the start."""
    documents = random.Random(f"documents/{recipe.seed}")
    drills = random.Random(f"drills/{recipe.seed}")
    choose = random.Random(f"curriculum/{recipe.seed}")
    step = 0
    for phase in recipe.curriculum:
        rows = recipe.batch_size * recipe.n_ctx // phase.window
        for _ in range(step, round(phase.until * recipe.steps)):
            texts = [render(drill_tokens(drills, phase.window - 1)) if choose.random() < phase.drills
                     else render(document_tokens(documents, phase.window - 1, recipe.span_len,
                                                 recipe.spans, recipe.chants))
                     for _ in range(rows)]
            input_ids = torch.tensor(tokenizer(texts)["input_ids"])
            offset = torch.randint(0, recipe.n_ctx - phase.window + 1, (rows, 1))
            yield input_ids, offset + torch.arange(phase.window)
            step += 1


def lr_at(step: int, recipe: ToyRecipe) -> float:
    """Linear warm-up, a constant plateau, then cosine decay to 10% over the last `decay` share.

    The plateau matters: induction heads appear abruptly after a long flat stretch, and a decay
    that starts early delays them."""
    warmup = min(recipe.warmup, recipe.steps)
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    decay_start = max(warmup, int(recipe.steps * (1 - recipe.decay)))
    if step < decay_start:
        return recipe.lr
    t = (step - decay_start) / max(1, recipe.steps - decay_start)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@contextlib.contextmanager
def deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seeded, deterministic torch on `threads` CPU threads for the block; the caller's settings
    (RNG, determinism flag, thread count) come back afterwards.

    A fixed thread count keeps the weights identical across machines with different core counts,
    and one thread is the fast choice for such small matrices when other processes share the
    cores (two threads spinning for a busy core made steps 10-20x slower here)."""
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was, warn_only=warn_only)
            torch.set_num_threads(was_threads)


def train(recipe: ToyRecipe, tokenizer: PreTrainedTokenizerFast, progress: bool = True
          ) -> tuple[PreTrainedModel, dict[str, float]]:
    """Train a toy model from scratch; returns it (eval mode) and {final_loss, train_seconds}."""
    with deterministic(recipe.seed, recipe.threads):
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
        for step, (input_ids, position_ids) in zip(bar, batches(recipe, tokenizer)):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, recipe)
            loss = model(input_ids=input_ids, position_ids=position_ids, labels=input_ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            smooth = loss.item() if step == 0 else 0.95 * smooth + 0.05 * loss.item()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{smooth:.3f}")
        seconds = time.perf_counter() - start
    model.eval()
    return model, {"final_loss": smooth, "train_seconds": seconds}
