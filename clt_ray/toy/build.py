"""Build a toy model once, cache it under `cache_dir()/toy/<recipe hash>/`, reuse it afterwards.

The folder is an ordinary HF model folder (config.json, model.safetensors, tokenizer files) plus
recipe.json, mechanisms.json (held-out scores) and build.json (weights hash, training time). It is
written into a temporary sibling and renamed (atomic_dir), under a file lock, so two processes
building the same recipe at once neither collide nor train twice. The folder name is the hash
alone: a local path containing "llama" trips a TransformerLens bug (docs/design.md §5).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from clt_ray.config import cache_dir as default_cache_dir
from clt_ray.fsutil import atomic_dir, atomic_write_text, file_lock
from clt_ray.toy.evaluate import evaluate, failed_thresholds
from clt_ray.toy.recipe import TOY_VERSION, ToyRecipe, check_arch, default_recipe
from clt_ray.toy.tokenizer import build_tokenizer
from clt_ray.toy.train import train

DONE_FILE = "build.json"
"""Written last inside the temporary folder: a folder with it is complete."""


@dataclass(frozen=True)
class ToyModel:
    """A built toy model folder; load it with `AutoModelForCausalLM.from_pretrained(path)`."""

    path: Path
    arch: str
    recipe_hash: str
    weights_hash: str
    scores: dict[str, float]
    built: bool
    """True when this call trained it, False when it was reused from the cache."""
    recipe: ToyRecipe
    train_seconds: float

    def load_model(self):  # -> PreTrainedModel (imported lazily: transformers is slow to import)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.path).eval()

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)


def weights_hash(folder: str | os.PathLike[str]) -> str:
    """sha256 over the safetensors tensors (names, dtypes, shapes, bytes), independent of file
    metadata, so equal weights give equal hashes."""
    tensors = load_file(Path(folder) / "model.safetensors")
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _write_folder(recipe: ToyRecipe, folder: Path, progress: bool) -> None:
    tokenizer = build_tokenizer()
    model, stats = train(recipe, tokenizer, progress=progress)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    scores = evaluate(model, tokenizer, n=recipe.eval_prompts)
    dump = lambda obj: json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write_text(folder / "recipe.json", dump(
        {"toy_version": TOY_VERSION, "recipe_hash": recipe.hash(),
         "recipe": recipe.model_dump(mode="json")}))
    atomic_write_text(folder / "mechanisms.json", dump(
        {"n_prompts": recipe.eval_prompts, "scores": scores}))
    atomic_write_text(folder / DONE_FILE, dump(
        {"weights_hash": weights_hash(folder), "train_seconds": round(stats["train_seconds"], 2),
         "final_loss": round(stats["final_loss"], 4)}))


def _read(folder: Path, recipe: ToyRecipe, built: bool) -> ToyModel:
    info = json.loads((folder / DONE_FILE).read_text())
    scores = json.loads((folder / "mechanisms.json").read_text())["scores"]
    return ToyModel(path=folder, arch=recipe.arch, recipe_hash=recipe.hash(),
                    weights_hash=info["weights_hash"], scores=scores, built=built, recipe=recipe,
                    train_seconds=info["train_seconds"])


def build_toy_model(arch: str | None = None, recipe: ToyRecipe | None = None,
                    cache_dir: str | os.PathLike[str] | None = None, progress: bool = True
                    ) -> ToyModel:
    """The toy model of `recipe` (default: `default_recipe(arch)`, arch default "gpt2"), trained
    on first use and reused afterwards.

    `cache_dir` overrides $CLT_RAY_CACHE / ~/.cache/clt-ray. Warns when the held-out scores miss
    THRESHOLDS (expected only for deliberately tiny recipes)."""
    if arch is not None:
        check_arch(arch)
    if recipe is None:
        recipe = default_recipe(arch or "gpt2")
    elif arch is not None and recipe.arch != arch:
        raise ValueError(f"arch {arch!r} disagrees with recipe.arch {recipe.arch!r}")
    root = default_cache_dir(cache_dir) / "toy"
    folder = root / recipe.hash()
    if "llama" in str(folder).lower():
        warnings.warn(f"{folder} contains 'llama': TransformerLens mistakes such local paths "
                      "for hub names; choose another cache dir", stacklevel=2)
    built = False
    if not (folder / DONE_FILE).is_file():
        with file_lock(root / f".{folder.name}.lock"):
            if not (folder / DONE_FILE).is_file():  # someone else may have built it meanwhile
                with atomic_dir(folder) as tmp:
                    _write_folder(recipe, tmp, progress)
                built = True
    toy = _read(folder, recipe, built)
    if built and (missed := failed_thresholds(toy.scores)):
        warnings.warn(f"toy {recipe.arch} model {folder} did not learn its mechanisms: "
                      + "; ".join(missed), stacklevel=2)
    return toy
