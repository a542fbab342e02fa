"""The offline toy world (docs/design.md §7): a synthetic corpus with checkable mechanisms, a word-level
tokenizer, and small GPT-2 / Llama models trained on it in a couple of minutes on CPU, saved as
ordinary HF model folders and cached by recipe hash. The demo's default model and the test suite's
ground truth; nothing here downloads anything.

    toy = build_toy_model("gpt2")            # trains once (~2 min), then reused from the cache
    model = AutoModelForCausalLM.from_pretrained(toy.path)
    prompts = mechanism_prompts("induction", 20, seed=0)
"""

from clt_ray.toy.build import ToyModel, build_toy_model, weights_hash
from clt_ray.toy.corpus import (
    FACTS,
    MECHANISMS,
    Fact,
    MechanismPrompt,
    document_tokens,
    iter_documents,
    mechanism_prompts,
    render,
)
from clt_ray.toy.evaluate import THRESHOLDS, evaluate, failed_thresholds, score_prompts
from clt_ray.toy.recipe import ARCHS, TOY_VERSION, ToyRecipe, default_recipe
from clt_ray.toy.tokenizer import build_tokenizer, vocabulary

__all__ = [
    "ARCHS", "FACTS", "MECHANISMS", "THRESHOLDS", "TOY_VERSION", "Fact", "MechanismPrompt",
    "ToyModel", "ToyRecipe", "build_tokenizer", "build_toy_model", "default_recipe",
    "document_tokens", "evaluate", "failed_thresholds", "iter_documents", "mechanism_prompts",
    "render", "score_prompts", "vocabulary", "weights_hash",
]
