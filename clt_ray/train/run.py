"""A run from a config — the one run setup of the single process and of Ray's shard workers:
check (everything checkable before loading weights) -> open the run folder -> build the data ->
build the trainer (a fresh, seeded, data-initialised CLT, or a checkpoint's feature range) -> fit
-> finish (the final held-out evaluation of the whole CLT, summary.json). `train_from_config` is
this in one process; `actors.shard_trainer` / `actors.trainer` run the same pieces on Ray.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from clt_ray import layout
from clt_ray.cache.store import CacheBlocks, check_files
from clt_ray.config import CLTConfig, Config, dump_config
from clt_ray.data import (
    Batch,
    BlockStream,
    ShuffledSource,
    check_corpus,
    heldout_windows,
    lm_blocks,
    split_batches,
    window_activations,
)
from clt_ray.errors import CltRayError, ConfigError
from clt_ray.eval import metrics
from clt_ray.fsutil import Staged, atomic_write_text, is_uri, reach
from clt_ray.lm import load_model
from clt_ray.lm.loading import DeviceError, check_device, model_dims
from clt_ray.nn.clt import CrossLayerTranscoder
from clt_ray.train.checkpoint import (
    CHECKPOINTS,
    TrainingState,
    fetch_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    push_checkpoint,
    read_manifest,
    store_checkpoints,
)
from clt_ray.train.loop import MetricsFile, Trainer

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

ScoreGraphs = Callable[[CrossLayerTranscoder], dict[str, Any]]
"""Scores of the whole CLT added to each eval (attribution.GraphScorer; the caller builds it, so
train/ never imports attribution/)."""
GraphScorerFactory = Callable[[Config, "PreTrainedModel", "PreTrainedTokenizerBase"],
                              "ScoreGraphs | None"]
"""Builds a run's GraphScorer around its loaded LM (attribution.graph_scorer_for)."""


@dataclass
class RunResult:
    run_dir: Path | str  # as given: a local folder, or a URI in a store
    step: int
    metrics: dict[str, Any]  # the final held-out evaluation (metrics.evaluate)
    seconds: float
    checkpoint: Path | str | None  # the final checkpoint (in the store for a URI run folder)
    interrupted: bool = False  # stopped early by Ctrl-C (after its checkpoint)


# --- check and open ------------------------------------------------------------------------------


def check_config(cfg: Config) -> CLTConfig:
    """Everything about a run config that can be checked without loading weights or data: the
    CLT against the model's layer count and width (read from the model's config file), the
    context size against its positions, the device, the corpus. Returns the full CLTConfig."""
    try:
        n_layers, d_model, max_pos = model_dims(cfg.model)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"model.name {cfg.model.name!r}: {exc}") from None
    clt_cfg = cfg.clt.resolve(n_layers, d_model)
    if max_pos is not None and cfg.data.context_size > max_pos:
        raise ConfigError(f"data.context_size {cfg.data.context_size} exceeds the model's "
                          f"{max_pos} positions")
    for key, dev in (("model.device", cfg.model.device), ("train.device", cfg.train.device)):
        if dev is not None:
            try:
                check_device(dev)
            except DeviceError as exc:
                raise ConfigError(f"{key}: {exc}") from None
    check_corpus(cfg.data)  # a corpus without training or held-out text fails now
    if cfg.data.source == "cache":
        manifest = check_files(cfg.data.cache)
        manifest.check_matches(model=cfg.model.name, input_hook=cfg.model.input_hook,
                               output_hook=cfg.model.output_hook, layers=n_layers,
                               d_model=d_model)
        if not manifest.files:
            raise ConfigError(f"data.cache {cfg.data.cache}: the cache holds no files yet")
    return clt_cfg


RunLocation = str | os.PathLike[str] | Staged
"""A run folder: a local path, a URI in a store, or one already staged (`stage_run`)."""


def stage_run(run_dir: RunLocation, resume: bool, log: Callable[[str], None] = print) -> Staged:
    """The run folder as a Staged location, so the whole run setup reads and writes local files:
    a local folder as is; a URI gets node-local scratch holding the store's config.yaml and
    metrics.jsonl and, to resume, its newest verified checkpoint (newer damaged or incomplete
    ones said and skipped). What the run writes is pushed back as it is written
    (`publish_checkpoint`, `finish_run`); `close()` removes the scratch. An unreachable store is
    one LocationError here, before any work."""
    if isinstance(run_dir, Staged):
        return run_dir
    if is_uri(run_dir):
        reach(run_dir)
    run = Staged(run_dir, "run_dir")
    if run.remote:
        run.pull(layout.RUN_CONFIG)
        run.pull(layout.METRICS)
        if resume and store_checkpoints(run):
            ckpt = fetch_checkpoint(run.location, log=log)
            (run.local / CHECKPOINTS).mkdir(exist_ok=True)
            ckpt.rename(run.local / CHECKPOINTS / ckpt.name)
    return run


def prepare_run_dir(run: Staged, resume: bool, log: Callable[[str], None] = print
                    ) -> Path | None:
    """The checkpoint to resume (None for a fresh run): the newest whose every file has its
    recorded sha256, saying which newer ones were skipped and why; refuses to start over a run's
    checkpoints, and to resume where there is none."""
    if resume:
        ckpt, skipped = latest_checkpoint(run.local, verify=True)
        for line in skipped:
            log(line)
        if ckpt is None:
            raise CltRayError(f"--resume: {run} has no "
                              f"{'usable ' if skipped else ''}checkpoint to resume from")
        return ckpt
    found = store_checkpoints(run) if run.remote else [p.name for p in list_checkpoints(run.local)]
    if found:
        raise CltRayError(f"{run} already holds checkpoints (up to {found[-1]}): pass "
                          "--resume to continue that run, or choose another --run-dir")
    return None


def open_run(cfg: Config, run: Staged, resume: bool, *, clt_cfg: CLTConfig | None = None,
             log: Callable[[str], None] = print) -> tuple[CLTConfig, Path | None]:
    """Check the config (unless `clt_cfg`, its `check_config`, is given), prepare the run folder
    (config.yaml) and find the checkpoint to resume, which must hold the CLT the config describes;
    metrics.jsonl is cut back to that checkpoint's step. Returns (the CLT config, the checkpoint
    or None)."""
    clt_cfg = clt_cfg or check_config(cfg)
    ckpt = prepare_run_dir(run, resume, log)
    manifest = read_manifest(ckpt) if ckpt is not None else None
    if manifest is not None:
        saved = CLTConfig.model_validate(manifest["clt"])
        if saved != clt_cfg:
            raise ConfigError(f"the checkpoint {ckpt} holds a CLT {saved.model_dump()}, but the "
                              f"config describes {clt_cfg.model_dump()}")
    try:
        run.local.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run.local / layout.RUN_CONFIG)
    except OSError as exc:
        raise CltRayError(f"cannot write the run folder {run}: "
                          f"{exc.strerror or exc}") from None
    run.push(layout.RUN_CONFIG)
    if manifest is not None:  # drop what the lost run logged after its checkpoint
        MetricsFile(run.local, log=log).truncate_after(manifest["step"])
        run.push(layout.METRICS)
        log(f"resuming {run.uri(f'{CHECKPOINTS}/{ckpt.name}') if run.remote else ckpt} at step "
            f"{manifest['step']} of {cfg.train.steps}")
    return clt_cfg, ckpt


def publish_checkpoint(run: Staged) -> Callable[[Path], None]:
    """What a trainer calls after each checkpoint it writes into the local run folder: a run
    folder in a store gets the checkpoint (manifest last, pruned as locally) and metrics.jsonl."""

    def publish(path: Path) -> None:
        push_checkpoint(run, path)
        if (run.local / layout.METRICS).is_file():
            run.push(layout.METRICS)

    return publish

# --- the data ------------------------------------------------------------------------------------


def training_source(cfg: Config, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
                    part: tuple[int, int] = (0, 1), blocks: BlockStream | None = None
                    ) -> ShuffledSource:
    """The training stream of a run config, or data-parallel replica i's part (i, n) of it:
    `blocks` built by the caller (Ray producers), else the activation cache (every n-th file) or
    the LM in this process (every n-th document), through the shuffle buffer seeded data.seed + i.
    The one place the single-process and the sharded trainer build it."""
    if blocks is None and cfg.data.source == "cache":
        blocks = CacheBlocks(cfg.data.cache, seed=cfg.data.seed,
                             shuffle_files=cfg.data.cache_order == "shuffled", part=part)
    elif blocks is None:
        blocks = lm_blocks(model, tokenizer, cfg.data, cfg.model, heldout=False, part=part)
    return ShuffledSource(blocks, cfg.train.batch_size, cfg.data.shuffle_buffer,
                          seed=cfg.data.seed + part[0])


def heldout_set(cfg: Config, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
                ) -> tuple[Tensor, Tensor, list[Batch]]:
    """A run's held-out windows (ids, mask) and their activations in train.batch_size batches."""
    ids, mask = heldout_windows(tokenizer, cfg.data)
    hx, hy = window_activations(model, ids, mask, cfg.model, cfg.data)
    return ids, mask, split_batches(hx, hy, cfg.train.batch_size)


# --- the trainer ---------------------------------------------------------------------------------


def build_trainer(cfg: Config, clt_cfg: CLTConfig, ckpt: str | os.PathLike[str] | None, *,
                  device: torch.device, heldout: list[Batch],
                  init_batches: Callable[[], Iterator[Batch]], start: int = 0,
                  stop: int | None = None, trainer_cls: type[Trainer] = Trainer,
                  log: Callable[[str], None] | None = None, **trainer_kwargs: Any) -> Trainer:
    """The trainer of features [start, stop) (default: the whole CLT): the checkpoint's slice
    when `ckpt` is given, else a fresh CLT seeded by train.seed and initialised from
    `init_batches()` (norm scales, b_dec, b_enc). The one construction both trainers use;
    `trainer_kwargs` go to the Trainer (and override the config's sections)."""
    common: dict[str, Any] = {"loss": cfg.loss, "optim": cfg.optim, "train": cfg.train,
                              "heldout": heldout, "config": cfg, "log": log,
                              "total_steps": cfg.train.steps, **trainer_kwargs}
    if ckpt is not None:
        return trainer_cls.resume(ckpt, start=start, stop=stop, device=device, **common)
    torch.manual_seed(cfg.train.seed)
    trainer = trainer_cls(CrossLayerTranscoder(clt_cfg, start, stop, device=device), **common)
    trainer.initialize(init_batches(), init_rate=cfg.clt.init_firing_rate,
                       normalize=cfg.clt.normalize)
    return trainer


# --- a whole run in this process -----------------------------------------------------------------


def train_from_config(
    cfg: Config,
    run_dir: RunLocation,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    splice: bool = True,
    blocks: BlockStream | None = None,
    graph_scorer: GraphScorerFactory | None = None,
) -> RunResult:
    """Train the CLT a config describes, in this process, into `run_dir` (config.yaml,
    metrics.jsonl, checkpoints/, summary.json; a URI: through node-local scratch, `stage_run`). resume=True continues the run's latest checkpoint
    exactly (same floats as an uninterrupted run). Returns the final held-out metrics
    (metrics.evaluate; splice=True adds the CE/KL of the CLT spliced into the model).
    `blocks`: the training stream of `data.source: producers`, built by the Ray layer
    (actors.cache_producer.ProducerBlocks); closed when training ends. `graph_scorer`: builds
    the graph scores of `train.graph_prompts` (clt_ray.attribution.graph_scorer_for)."""
    start_time = time.monotonic()
    if (cfg.data.source == "producers") != (blocks is not None):
        raise ConfigError("data.source 'producers' streams from Ray actors: train it with "
                          "`clt-ray train` (or pass blocks=ProducerBlocks(...)); other sources "
                          "take no blocks")
    check_graph_scorer(cfg, graph_scorer)
    run = stage_run(run_dir, resume, log)
    try:
        clt_cfg, ckpt = open_run(cfg, run, resume, log=log)
        lm, tokenizer = load_model(cfg.model)
        source = training_source(cfg, lm, tokenizer, blocks=blocks)
        ids, mask, heldout = heldout_set(cfg, lm, tokenizer)
        scorer = graph_scorer(cfg, lm, tokenizer) if graph_scorer else None
        trainer = build_trainer(cfg, clt_cfg, ckpt,
                                device=torch.device(cfg.train.device or cfg.model.device),
                                heldout=heldout, init_batches=lambda: source, log=log,
                                run_dir=run.local, graph_scorer=scorer,
                                on_checkpoint=publish_checkpoint(run))
        try:
            trainer.fit(source)
        finally:
            source.close()
        return finish_run(cfg, run, trainer.model, trainer.state, lm=lm, tokenizer=tokenizer,
                          start_time=start_time, splice=splice, interrupted=trainer.interrupted,
                          heldout=(ids, mask), graph_scorer=scorer)
    finally:
        run.close()


def check_graph_scorer(cfg: Config, factory: GraphScorerFactory | None) -> None:
    if cfg.train.graph_prompts and factory is None:
        raise ConfigError("train.graph_prompts: pass graph_scorer=clt_ray.attribution."
                          "graph_scorer_for (what `clt-ray train` does) to score graphs")


# --- the end of a run ----------------------------------------------------------------------------


def finish_run(cfg: Config, run: Staged, clt: CrossLayerTranscoder, state: TrainingState, *,
               lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, start_time: float,
               splice: bool = True, interrupted: bool = False,
               heldout: tuple[Tensor, Tensor] | None = None,
               graph_scorer: ScoreGraphs | None = None) -> RunResult:
    """The end of a run (one process or Ray): the final held-out evaluation of the whole CLT
    (with the splice CE/KL) on `heldout` windows (ids, mask; default: the config's), the graph
    scores, summary.json (with metrics.jsonl and tensorboard/ pushed to a store), and the
    RunResult."""
    ids, mask = heldout if heldout is not None else heldout_windows(tokenizer, cfg.data)
    lm_device = next(lm.parameters()).device
    if clt.b_dec.device != lm_device:  # the splice needs the CLT beside the model
        clt = copy.deepcopy(clt).to(lm_device)
    final = metrics.evaluate(clt, lm, ids, attention_mask=mask,
                             input_hook=cfg.model.input_hook, output_hook=cfg.model.output_hook,
                             batch_size=cfg.data.lm_batch_size, splice=splice,
                             fired_counters=state.tokens_since_fired,
                             dead_window=cfg.train.dead_after_tokens)
    if graph_scorer is not None:
        final.update(graph_scorer(clt))
    seconds = time.monotonic() - start_time
    summary = {"step": state.step, "total_steps": state.total_steps, "tokens": state.tokens,
               "seconds": round(seconds, 1), "interrupted": interrupted, **final}
    atomic_write_text(run.local / layout.VIEWER_SUMMARY, json.dumps(summary, indent=1))
    for entry in (layout.METRICS, layout.TENSORBOARD, layout.VIEWER_SUMMARY):
        if (run.local / entry).exists():
            run.push(entry)
    if run.remote:
        found = store_checkpoints(run)
        last: Path | str | None = run.uri(f"{CHECKPOINTS}/{found[-1]}") if found else None
    else:
        local = list_checkpoints(run.local)
        last = local[-1] if local else None
    return RunResult(run.location if run.remote else run.local, state.step, final, seconds,
                     last, interrupted)
