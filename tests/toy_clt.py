"""A CLT trained on a toy model with the tuned settings of examples/toy.yaml, exported for
circuit-tracer and cached: the ground truth of the attribution tests and benchmarks.

Trained once in this process (~2–3 min on 2 cores), then reused from
`cache_dir()/toy-clt/<hash>/` (hash of the toy model's weights and the training settings).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from clt_ray.config import cache_dir as default_cache_dir
from clt_ray.fsutil import atomic_dir, atomic_write_text, file_lock
from clt_ray.toy.build import build_toy_model

DONE_FILE = "done.json"


def build_toy_clt(arch: str = "gpt2", cache_dir: str | os.PathLike[str] | None = None,
                  log=print) -> Path:
    """The exported CLT folder (clt/ inside the cache entry; its run folder is run/)."""
    from clt_ray.config import TOY_TRAIN, toy_config

    toy = build_toy_model(arch, cache_dir=cache_dir)
    key = json.dumps({"weights": toy.weights_hash, "train": TOY_TRAIN}, sort_keys=True)
    root = default_cache_dir(cache_dir) / "toy-clt"
    folder = root / hashlib.sha256(key.encode()).hexdigest()[:16]
    if not (folder / DONE_FILE).is_file():
        root.mkdir(parents=True, exist_ok=True)
        with file_lock(root / f".{folder.name}.lock"):
            if not (folder / DONE_FILE).is_file():
                with atomic_dir(folder) as tmp:
                    _train_and_export(toy_config(arch), tmp, log)
    return folder / "clt"


def _train_and_export(cfg, folder: Path, log) -> None:
    from clt_ray.export import export_checkpoint
    from clt_ray.train.run import train_from_config

    log(f"training the toy {cfg.model.name} CLT once (examples/toy.yaml settings) in {folder}")
    result = train_from_config(cfg, folder / "run", log=log)
    export_checkpoint(folder / "run", folder / "clt")
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, list))}
    atomic_write_text(folder / DONE_FILE, json.dumps({"step": result.step, **metrics}))
