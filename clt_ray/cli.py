"""`clt-ray`: the command line. Each pipeline stage adds its subcommand here."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from pyarrow.fs import FileType

from clt_ray import layout
from clt_ray.config import TOY_ARCHS, WINDOWS_PER_FILE
from clt_ray.errors import CltRayError
from clt_ray.fsutil import LocationError, Staged, check_scheme, is_uri, local_path


def _format_scores(scores: dict) -> str:
    rows = []
    for name, value in scores.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in value.items())
            rows.append(f"    {name:<14} {inner}")
        elif isinstance(value, float):
            rows.append(f"    {name:<14} {value:.3f}")
        else:
            rows.append(f"    {name:<14} {value}")
    return "\n".join(rows)


def _report_toy(model) -> None:
    how = "built" if model.built else "reused from cache"
    click.echo(f"toy {model.arch}: {how}\n  path: {model.path}\n  weights sha256: {model.weights_hash}")
    click.echo("  held-out mechanism scores:")
    click.echo(_format_scores(model.scores))


class LocalPath(click.Path):
    """click.Path for a location that must be local here: a URI is one error naming it (plain
    click.Path would make `s3://bucket/run` the local folder `s3:/bucket/run`)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and is_uri(value):
            what = param.human_readable_name if param is not None else "location"
            try:
                local_path(value, what)
            except LocationError as exc:
                self.fail(str(exc), param, ctx)
        return super().convert(value, param, ctx)


class Location(click.ParamType):
    """A local path or a URI in any store pyarrow or fsspec knows (`s3://…`, `gs://…`): a str.
    A scheme nothing understands is one error here (no connection is made yet)."""

    name = "location"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        value = str(value)
        if is_uri(value):
            try:
                check_scheme(value)
            except LocationError as exc:
                self.fail(str(exc), param, ctx)
        return value


class Size(click.ParamType):
    """A memory size: "2GB", "512MB", "24GiB" or a plain number of GB, as bytes."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from clt_ray.plan import PlanError, parse_size

        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except PlanError as exc:
            self.fail(str(exc), param, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="clt-ray")
def cli() -> None:
    """clt-ray: cross-layer transcoders at scale on Ray.

    cache -> train -> auto-interp / attribution graphs -> view. Configs are YAML (see examples/).
    """


@cli.group()
def toy() -> None:
    """The offline toy language-model world (the demo default and the tests' ground truth)."""


@toy.command("build")
@click.option("--arch", type=click.Choice(TOY_ARCHS + ("all",)), default="all", show_default=True)
@click.option("--cache-dir", type=LocalPath(file_okay=False, path_type=Path), default=None,
              help="Overrides $CLT_RAY_CACHE (default ~/.cache/clt-ray).")
def toy_build(arch: str, cache_dir: Path | None) -> None:
    """Build (or reuse) the toy models and print where they are and what they learned."""
    from clt_ray.toy import build_toy_model

    for a in TOY_ARCHS if arch == "all" else (arch,):
        _report_toy(build_toy_model(a, cache_dir=cache_dir))


@cli.command()
@click.option("--cache-dir", type=LocalPath(file_okay=False, path_type=Path), default=None,
              help="Overrides $CLT_RAY_CACHE (default ~/.cache/clt-ray).")
@click.option("--run-dir", type=LocalPath(file_okay=False, path_type=Path),
              default=Path("runs/demo-gpt2"), show_default=True,
              help="Where the demo CLT run goes (replaced on every demo).")
@click.option("--activations", type=LocalPath(file_okay=False, path_type=Path),
              default=Path("runs/demo-activations"), show_default=True,
              help="The demo's activation cache (int8, kept: a second demo reuses it).")
@click.option("--producers", type=click.IntRange(min=1), default=2, show_default=True,
              help="CacheProducer actors that write the activation cache.")
@click.option("--no-serve", is_flag=True, help="Exit at the end instead of serving the viewer.")
def demo(cache_dir: Path | None, run_dir: Path, activations: Path, producers: int,
         no_serve: bool) -> None:
    """Run the pipeline on the toy world: build (or reuse) the toy models and score them, cache
    the toy GPT-2's activations with Ray producers, train a CLT from that cache with 2 feature
    shards on Ray and examples/toy.yaml's settings and report held-out EV, L0, dead features and the CE/KL change
    when it replaces the MLPs; then attribution graphs of held-out mechanism prompts with their
    replacement and completeness scores."""
    from clt_ray.actors.cache_producer import cache_on_ray
    from clt_ray.actors.ray_session import ensure_ray
    from clt_ray.actors.trainer import train_on_ray
    from clt_ray.config import toy_config
    from clt_ray.toy import build_toy_model

    start = time.monotonic()
    if cache_dir is not None:
        os.environ["CLT_RAY_CACHE"] = str(cache_dir)
    for arch in TOY_ARCHS:
        _report_toy(build_toy_model(arch, cache_dir=cache_dir))
    _clear_demo_run(run_dir)
    cfg = toy_config("gpt2")
    tokens = cfg.train.steps * cfg.train.batch_size + cfg.train.init_tokens
    click.echo(f"\ncaching {tokens:,} tokens of toy:gpt2 activations (int8) with {producers} "
               f"producers on Ray\n  cache: {activations}")
    ensure_ray()
    cache_on_ray(cfg.model, cfg.data, str(activations), tokens=tokens, producers=producers,
                 bits=8, zstd_level=1, log=click.echo)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"source": "cache", "cache": str(activations)})})
    click.echo(f"\ntraining a CLT on toy:gpt2 from the cache with 2 feature shards on Ray "
               f"(examples/toy.yaml settings)\n  run dir: {run_dir}")
    result = train_on_ray(cfg, run_dir, shards=2, log=click.echo)
    click.echo(f"CLT after {result.step} steps ({result.seconds:.0f} s), held-out:")
    click.echo(format_metrics(result.metrics, cfg.train.dead_after_tokens))
    click.echo(f"  checkpoint: {result.checkpoint}")
    _demo_graphs(run_dir, run_dir / layout.GRAPHS)
    _demo_features(run_dir, activations)
    click.echo(f"demo finished in {time.monotonic() - start:.0f} s")
    if no_serve:
        click.echo(f"view the run: clt-ray serve {run_dir}")
    else:
        _demo_serve(run_dir)


def _demo_graphs(run_dir: Path, out: Path) -> None:
    """Attribution graphs of held-out prompts of each toy mechanism, with their scores."""
    from clt_ray.attribution import attribute_prompts
    from clt_ray.export import export_checkpoint
    from clt_ray.toy import MECHANISMS, mechanism_prompts

    clt = export_checkpoint(run_dir, out / "clt", force=True,  # replaces only an earlier export
                            log=lambda m: click.echo(f"warning: {m}", err=True))
    prompts = [p.text for kind in MECHANISMS for p in mechanism_prompts(kind, 2, seed=7)]
    click.echo(f"\nattribution graphs of {len(prompts)} held-out mechanism prompts "
               f"(circuit-tracer)\n  graphs: {out}")
    rows = attribute_prompts(clt, prompts, out, log=click.echo)
    click.echo(format_summary(rows))


def _demo_features(run_dir: Path, activations: Path) -> None:
    """Top activating examples and statistics of every feature, read from the activation cache
    the CLT was trained on (no LM passes): the input of explanations and of the viewer."""
    from clt_ray.actors.autointerp import collect_on_ray
    from clt_ray.autointerp.pipeline import topk_request
    from clt_ray.config import TopKSettings
    from clt_ray.train.checkpoint import load_checkpoint

    out = run_dir / layout.AUTOINTERP / layout.TOPK_FEATURES
    click.echo(f"\ntop-k examples of every feature from the activation cache (Ray Data)\n"
               f"  features: {out}")
    loaded = load_checkpoint(run_dir)
    tokens, settings = 16384, TopKSettings()
    # examples/autointerp.yaml asks for the same, so `clt-ray autointerp` reuses this file
    request = topk_request(run_dir, tokens, (0, loaded.model.cfg.n_features), settings,
                           str(activations))
    collect_on_ray(run_dir, out, tokens=tokens, cache=str(activations), settings=settings,
                   log=click.echo, loaded=loaded, extra={"request": request})
    click.echo("  explain and score them with any OpenAI-compatible endpoint: clt-ray autointerp "
               "--config examples/autointerp.yaml")


def _demo_serve(run_dir: Path) -> None:
    """The viewer over the demo run until Ctrl-C (port 8050, or a free one if that is taken)."""
    import socket

    from clt_ray.viewer import DEFAULT_PORT

    paths = _viewer_paths(run_dir)
    with socket.socket() as probe:
        port = DEFAULT_PORT if probe.connect_ex(("127.0.0.1", DEFAULT_PORT)) else 0
    click.echo(f"\nserving the viewer (`clt-ray serve {run_dir}`; `make demo` skips this with "
               "DEMO_ARGS=--no-serve)")
    _serve_until_interrupted(paths, "127.0.0.1", port)


def _clear_demo_run(run_dir: Path) -> None:
    """Remove a previous demo run (only a folder that looks like a clt-ray run)."""
    import shutil

    if not run_dir.exists():
        return
    names = {p.name for p in run_dir.iterdir()}
    if not names <= layout.RUN_FOLDER_ENTRIES:
        raise CltRayError(f"{run_dir} holds files that are not a clt-ray run; pass another "
                          "--run-dir")
    shutil.rmtree(run_dir)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _newest_run(config_path: Path) -> Path:
    runs = sorted(Path("runs").glob(f"{config_path.stem}-*"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise CltRayError(f"--resume: no runs/{config_path.stem}-* run to resume; pass --run-dir")
    return runs[-1]


@cli.command()
@click.option("--config", "config_path", type=LocalPath(dir_okay=False, path_type=Path),
              default=None, help="Run config (YAML, see examples/). With --resume it is optional "
              "(the run's own config.yaml is used) and must match the run's if given.")
@click.option("--run-dir", type=Location(), default=None,
              help="A local folder or a URI in a store (s3://bucket/run, gs://…; the store's "
              "standard settings apply, e.g. AWS_ENDPOINT_URL). Default: "
              "runs/<config name>-<date>-<time>; with --resume: the newest runs/<config name>-*.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Override train.steps (the run's total steps; schedules stretch to it).")
@click.option("--resume", is_flag=True,
              help="Continue the run folder's latest checkpoint exactly where it stopped.")
@click.option("--shards", type=click.IntRange(min=1), default=None,
              help="Train on Ray with this many feature shards (one actor each; one GPU each when "
              "the CLT is on CUDA). Without --shards/--replicas/--address: one process.")
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="Data-parallel replicas of the shard group (on Ray; default 1).")
@click.option("--min-shards", type=click.IntRange(min=1), default=None,
              help="Elastic: restart with as few as this many shards when workers are lost.")
@click.option("--max-failures", type=click.IntRange(min=0), default=3, show_default=True,
              help="On Ray: restarts from the last checkpoint after losing a worker or node.")
@click.option("--address", default=None, help="Ray cluster address (default: a running local "
              "Ray, else a new one; `local`: a new one).")
def train(config_path: Path | None, run_dir: str | None, steps: int | None,
          resume: bool, shards: int | None, replicas: int | None, min_shards: int | None,
          max_failures: int, address: str | None) -> None:
    """Train a CLT, in this process or feature-sharded on Ray (--shards N).

    Writes run_dir/config.yaml, metrics.jsonl (every train.log_every steps and every eval),
    checkpoints/step_<n>/ and summary.json, then prints the held-out EV, L0 and dead features.
    In one process, Ctrl-C finishes the step, checkpoints and stops; --resume goes on. Any
    checkpoint resumes with any shard count."""
    from clt_ray.attribution import graph_scorer_for
    from clt_ray.config import load_config
    from clt_ray.errors import ConfigError
    from clt_ray.train.checkpoint import list_checkpoints
    from clt_ray.train.run import RunLocation, stage_run, train_from_config

    if config_path is None and not (resume and run_dir is not None):
        raise click.UsageError("--config is required (or --resume with --run-dir)")
    cfg = load_config(config_path) if config_path is not None else None
    if run_dir is None:
        assert config_path is not None
        run_dir = str(_newest_run(config_path) if resume else
                      Path("runs") / f"{config_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    run: RunLocation = run_dir
    if resume:
        staged = stage_run(run_dir, resume=True, log=click.echo)  # a store: its files, local
        run = staged
        if not list_checkpoints(staged.local):  # say so first, whatever else is missing
            # (open_run then verifies the newest one's files)
            raise CltRayError(f"--resume: {run_dir} has no checkpoint to resume from")
        saved = load_config(staged.local / layout.RUN_CONFIG)
        if cfg is not None:
            a, b = _flat(cfg.model_dump(mode="json")), _flat(saved.model_dump(mode="json"))
            diff = sorted(k for k in a.keys() | b.keys()
                          if a.get(k) != b.get(k) and k != "train.steps")
            if diff:
                raise ConfigError(f"{config_path} differs from the run's config "
                                  f"{staged.uri(layout.RUN_CONFIG)} in: {', '.join(diff)}")
        cfg = saved
    assert cfg is not None
    if steps is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": steps})})
    if cfg.cache_dir is not None:
        os.environ["CLT_RAY_CACHE"] = str(cfg.cache_dir)
    click.echo(f"run dir: {run_dir}")
    sharded = shards is not None or replicas is not None
    if sharded or (address is not None and cfg.data.source != "producers"):
        from clt_ray.actors.trainer import train_on_ray

        result = train_on_ray(cfg, run, shards=shards or 1, replicas=replicas or 1,
                              resume=resume, address=address, max_failures=max_failures,
                              min_shards=min_shards, log=click.echo,
                              graph_scorer=graph_scorer_for)
        _print_result(cfg, result, run_dir)
        return
    blocks = None
    if cfg.data.source == "producers":
        from clt_ray.actors.cache_producer import ProducerBlocks
        from clt_ray.actors.ray_session import ensure_ray
        from clt_ray.train.run import check_config

        check_config(cfg)  # before Ray starts
        ensure_ray(address)
        blocks = ProducerBlocks(cfg.model, cfg.data)
    try:
        result = train_from_config(cfg, run, resume=resume, log=click.echo, blocks=blocks,
                                   graph_scorer=graph_scorer_for)
    finally:
        if blocks is not None:
            blocks.close()
    _print_result(cfg, result, run_dir)


def _print_result(cfg, result, run_dir: str) -> None:
    """The run's end for people; a run stopped by Ctrl-C then exits 130, as scripts expect."""
    click.echo(f"{'stopped' if result.step < cfg.train.steps else 'finished'} at step "
               f"{result.step} of {cfg.train.steps} in {result.seconds:.0f} s; held-out:")
    click.echo(format_metrics(result.metrics, cfg.train.dead_after_tokens))
    click.echo(f"  checkpoint: {result.checkpoint}\n  run dir: {run_dir}")
    if result.interrupted:
        click.echo(f"interrupted: continue with `clt-ray train --run-dir {run_dir} --resume`",
                   err=True)
        sys.exit(130)


@cli.command("cache")
@click.option("--config", "config_path", type=LocalPath(dir_okay=False, path_type=Path),
              required=True, help="Run config (YAML): its model and data sections say what to cache.")
@click.option("--out", required=True, help="Cache directory: a local path or a URI (s3://, gs://, …).")
@click.option("--tokens", type=click.IntRange(min=1), required=True,
              help="Trainable tokens to cache (whole files; fewer if the corpus ends).")
@click.option("--bits", type=click.Choice(["8", "4", "2"]), default="8", show_default=True)
@click.option("--zstd", "zstd_level", type=click.IntRange(0, 22), default=1, show_default=True,
              help="zstd level of the files (0: uncompressed).")
@click.option("--windows-per-file", type=click.IntRange(min=1), default=WINDOWS_PER_FILE,
              show_default=True)
@click.option("--producers", type=click.IntRange(min=1), default=1, show_default=True,
              help="CacheProducer actors on Ray, each caching its own slice of the documents.")
@click.option("--cpus-per-producer", type=click.FloatRange(min=0.01), default=None,
              help="Default: one GPU each when the cluster has enough, else an equal share of "
              "its CPUs.")
@click.option("--address", default=None,
              help="Ray cluster address (default: a running local Ray, else a new one; `local`: a new one).")
@click.option("--in-process", is_flag=True, help="Run the model in this process, without Ray.")
def cache(config_path: Path, out: str, tokens: int, bits: str, zstd_level: int,
          windows_per_file: int, producers: int, cpus_per_producer: float | None,
          address: str | None, in_process: bool) -> None:
    """Write an activation cache by running the model over the config's corpus: `--producers`
    Ray actors, each on its own slice of the documents. Run it again to resume: finished files are
    kept. Train from it with `data.source: cache`."""
    from clt_ray.cache.store import check_destination
    from clt_ray.config import load_config
    from clt_ray.train.run import check_config

    cfg = load_config(config_path)
    if cfg.cache_dir is not None:
        os.environ["CLT_RAY_CACHE"] = str(cfg.cache_dir)
    check_destination(out)
    check_config(cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": "lm"})}))
    common = {"tokens": tokens, "bits": int(bits), "zstd_level": zstd_level or None,
              "windows_per_file": windows_per_file, "log": click.echo}
    if in_process:
        if producers != 1:
            raise click.UsageError("--in-process runs one producer; drop --producers")
        from clt_ray.cache.produce import write_cache
        from clt_ray.lm import load_model

        lm, tokenizer = load_model(cfg.model)
        write_cache(lm, tokenizer, cfg.data, cfg.model, out, **common)
        return
    from clt_ray.actors.cache_producer import cache_on_ray
    from clt_ray.actors.ray_session import ensure_ray

    ensure_ray(address)
    cache_on_ray(cfg.model, cfg.data, out, producers=producers, cpus=cpus_per_producer, **common)


@cli.command("plan")
@click.argument("model")
@click.option("--expansion", type=float, default=None,
              help="Features a layer = round(expansion · d_model) (default: 8, as a run config).")
@click.option("--features", type=int, default=None, help="Features a layer (instead of --expansion).")
@click.option("--activation", type=click.Choice(["jumprelu", "relu", "topk", "batchtopk"]),
              default="jumprelu", show_default=True)
@click.option("--hooks", "input_hook", type=click.Choice(["hook_resid_mid", "mlp.hook_in"]),
              default="hook_resid_mid", show_default=True,
              help="The input hook (the output hook is its pair).")
@click.option("--precision", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="train.precision (autocast; weights and Adam stay fp32). Default: float32.")
@click.option("--gpu-memory", default="80GB", show_default=True,
              help="Memory of one GPU: 24GB, 80GB, 141GB, 48GiB (GB = 10^9 bytes).")
@click.option("--batch-size", type=int, default=None,
              help="train.batch_size, tokens a step (default: 1024).")
@click.option("--lm-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="model.dtype of the producers' LM (default: float32).")
@click.option("--windows-per-file", type=int, default=WINDOWS_PER_FILE, show_default=True,
              help="`clt-ray cache --windows-per-file`: the producer's windows a forward pass.")
@click.option("--context-size", type=int, default=None,
              help="data.context_size, tokens a window (default: 128).")
@click.option("--profile", type=LocalPath(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A measured device profile (the JSON of bench/train_step.py --json) for tokens/s.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_command(model: str, expansion: float | None, features: int | None, activation: str,
                 input_hook: str, precision: str | None, gpu_memory: str,
                 batch_size: int | None, lm_dtype: str | None, windows_per_file: int,
                 context_size: int | None, profile: Path | None, as_json: bool) -> None:
    """What a CLT on MODEL costs, before anything runs: parameters, bytes a shard, the fewest
    shards (GPUs) that fit --gpu-memory, activation-cache bytes, producer and trainer memory, and
    tokens/s from a --profile. MODEL: a hub name (gpt2, meta-llama/Llama-3.2-1B,
    google/gemma-2-2b, Qwen/Qwen3-1.7B are built in: no download), a local model folder, or
    toy:gpt2 / toy:llama."""
    from clt_ray.plan import format_plan, make_plan

    result = make_plan(model, expansion=expansion, features=features, activation=activation,
                       input_hook=input_hook, precision=precision, gpu_memory=gpu_memory,
                       batch_size=batch_size, lm_dtype=lm_dtype, windows_per_file=windows_per_file,
                       context_size=context_size, profile=profile)
    click.echo(result.to_json() if as_json else format_plan(result))


@cli.command("eval")
@click.argument("checkpoint", type=Location())
@click.option("--batches", type=click.IntRange(min=1), default=None,
              help="Evaluate at most this many batches of held-out windows.")
@click.option("--tokens", type=click.IntRange(min=1), default=None,
              help="Held-out tokens to draw (default: the run config's data.heldout_tokens).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Windows per forward pass (default: data.lm_batch_size).")
@click.option("--device", default=None, help="Device for the model and the CLT (default: the "
              "run config's model.device).")
@click.option("--no-splice", is_flag=True, help="Skip the CE/KL splice passes.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_command(checkpoint: str, batches: int | None, tokens: int | None,
                 batch_size: int | None, device: str | None, no_splice: bool,
                 as_json: bool) -> None:
    """Evaluate a checkpoint (or a run folder's latest) on held-out data of its run's corpus.

    Per layer: explained variance, normalised MSE, L0, dead features; and the CE / KL change when
    the CLT replaces every MLP output in the model's forward pass (BOS not spliced), with the
    zero-ablation CE as reference. Definitions: clt_ray/metrics.py."""
    import json

    from clt_ray.eval.metrics import evaluate_checkpoint, format_report

    result = evaluate_checkpoint(_existing(checkpoint, "CHECKPOINT"), batches=batches, tokens=tokens,
                                 batch_size=batch_size, device=device, splice=not no_splice,
                                 log=lambda m: click.echo(f"warning: {m}", err=True))
    click.echo(json.dumps(result, indent=1) if as_json else format_report(result))


@cli.command("export")
@click.argument("checkpoint", type=Location())
@click.argument("out", type=Location())
@click.option("--model-name", default=None, help="Model circuit-tracer should load (default: "
              "the run config's model; toy and local models as absolute paths).")
@click.option("--scan", default=None, help="Feature-dashboard scan name (default: "
              "./data/features/<OUT name>, read offline by circuit-tracer's frontend).")
@click.option("--calibration-tokens", type=click.IntRange(min=1), default=None,
              help="TopK/BatchTopK only: held-out tokens to set the JumpReLU thresholds on "
              "(default: data.heldout_tokens).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Dtype of the stored tensors.")
@click.option("--device", default=None, help="TopK/BatchTopK only: device for the calibration "
              "pass of the LM (default: the run config's model.device).")
@click.option("--force", is_flag=True, help="Replace OUT if it holds a previous clt-ray export "
              "(any other non-empty OUT is refused).")
def export_command(checkpoint: str, out: str, model_name: str | None, scan: str | None,
                   calibration_tokens: int | None, dtype: str, device: str | None,
                   force: bool) -> None:
    """Write a checkpoint as a circuit-tracer CLT folder (normalisation folded into the weights).

    TopK/BatchTopK CLTs are converted to JumpReLU (thresholds set on held-out activations so L0
    per layer is kept); circuit-tracer loads the folder with load_clt(OUT, dtype=torch.float32).
    OUT must be new or empty (or, with --force, a previous export)."""
    from clt_ray.export import export_checkpoint, read_export_config
    from clt_ray.lm.loading import to_dtype

    path = export_checkpoint(_existing(checkpoint, "CHECKPOINT"), out, model_name=model_name, scan=scan,
                             calibration_tokens=calibration_tokens, dtype=to_dtype(dtype),
                             device=device, force=force,
                             log=lambda m: click.echo(f"warning: {m}", err=True))
    cfg = read_export_config(path)
    click.echo(f"exported {cfg['clt_ray']['activation']} CLT "
               f"({cfg['clt_ray']['n_layers']} layers × {cfg['clt_ray']['n_features']} features) "
               f"to {path}\n  model_name: {cfg['model_name']}\n  scan: {cfg['scan']}")


def _exported_clt(clt: str, out: Path) -> Path:
    """An exported CLT folder as given (from a store: its local copy), or a checkpoint / run
    folder exported to OUT/clt."""
    from clt_ray.export import CONFIG_FILE, export_checkpoint, is_export

    if is_uri(clt):
        staged = Staged(clt, "--clt")  # removed at exit
        if staged.pull(CONFIG_FILE) and is_export(staged.local):
            staged.pull()
            return staged.local
    elif (Path(clt) / CONFIG_FILE).is_file() and is_export(Path(clt)):
        return Path(clt)
    path = export_checkpoint(clt, out / "clt", force=True,  # replaces only an earlier export
                             log=lambda m: click.echo(f"warning: {m}", err=True))
    click.echo(f"exported {clt} for circuit-tracer to {path}")
    return path


def _existing(location: str, what: str) -> str:
    """A location that must exist: a local path is checked here, a URI by one request to its
    store (nothing there, an unreachable store or refused credentials: one error)."""
    from clt_ray.fsutil import reach

    missing = (reach(location)[2] == FileType.NotFound if is_uri(location)
               else not Path(location).exists())
    if missing:
        raise CltRayError(f"{what} {location} does not exist")
    return location


def _graph_options(fn):
    for option in reversed([
        click.option("--model", default=None, help="The LM (default: the model named in the "
                     "CLT's config.yaml): a hub name, local folder or toy:gpt2 / toy:llama."),
        click.option("--backend", type=click.Choice(["auto", "transformerlens", "nnsight"]),
                     default="auto", show_default=True,
                     help="auto: nnsight for Llama/Gemma/Qwen3/GPT-OSS, TransformerLens else."),
        click.option("--device", default="cpu", show_default=True),
    ]):
        fn = option(fn)
    return fn


@cli.command("attribute")
@click.option("--clt", "clt", required=True, type=Location(), help="An exported CLT folder (`clt-ray export`), or a checkpoint "
              "or run folder (exported into OUT/clt first).")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable).")
@click.option("--prompts-file", type=LocalPath(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Prompts: .txt (a line each), .jsonl or .parquet (a `prompt` "
              "field; optional `target`: a token or list of tokens whose logits are the graph's "
              "targets; optional `contrast`: the target is then logit(target) − logit(contrast)).")
@click.option("--out", required=True, type=Location(),
              help="Output folder (a local path or a URI): graph JSON, graph-metadata.json, "
              "features/, graphs.parquet.")
@_graph_options
@click.option("--max-feature-nodes", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Cap on feature nodes (the adjacency is dense: memory grows with nodes²).")
@click.option("--max-n-logits", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--desired-logit-prob", type=click.FloatRange(0, 1, min_open=True), default=0.95,
              show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Source nodes per backward pass, at most (lowered per prompt to keep "
              "--gather-memory).")
@click.option("--gather-memory", type=Size(), default="2GB", show_default=True,
              help="Memory a backward pass may use to gather the gradients of every active "
              "feature (grows with batch × active features × d_model).")
@click.option("--node-threshold", type=click.FloatRange(0, 1), default=0.8, show_default=True)
@click.option("--edge-threshold", type=click.FloatRange(0, 1), default=0.98, show_default=True)
@click.option("--corpus", default=None, help="Where feature examples come from (default: the "
              "CLT's training corpus, held-out part).")
@click.option("--example-tokens", type=click.IntRange(min=1), default=16384, show_default=True,
              help="Held-out tokens searched for each feature's top examples.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Ray actors computing graphs, each loading the model once (default: this "
              "process alone).")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
              help="GPUs per worker (default: 1 where the cluster has GPUs, else 0).")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0.01), default=1.0,
              show_default=True, help="CPUs per worker (its torch threads: the integer part).")
@click.option("--address", default=None, help="Ray cluster address for --workers (default: a "
              "running local Ray, else a new one; `local`: a new one).")
@click.option("--autointerp", type=Location(), default=None,
              help="An `autointerp` output folder whose explanations label the feature nodes "
              "(default: the CLT's run's autointerp/, when it has explanations).")
@click.option("--neuronpedia-model", default=None,
              help="Make the graphs uploadable to Neuronpedia: its model id (e.g. gpt2-small) "
              "as their scan (the local frontend then shows no dashboards).")
@click.option("--feature-json-base-url", default=None,
              help="The public https URL where OUT/features/<clt name>/ is hosted "
              "(Neuronpedia's feature_json_base_url).")
def attribute_command(clt: str, prompts: tuple[str, ...], prompts_file: Path | None, out: str,
                      model: str | None, backend: str, device: str, max_feature_nodes: int,
                      max_n_logits: int, desired_logit_prob: float, batch_size: int,
                      gather_memory: int, node_threshold: float, edge_threshold: float,
                      corpus: str | None,
                      example_tokens: int, workers: int | None, gpus_per_worker: float | None,
                      cpus_per_worker: float, address: str | None, autointerp: str | None,
                      neuronpedia_model: str | None, feature_json_base_url: str | None) -> None:
    """Attribution graphs of many prompts with circuit-tracer (the model loaded once per
    process; with --workers, on a pool of Ray actors): graph JSON for its frontend and for
    Neuronpedia, feature nodes labelled with their explanations, feature dashboards that work
    offline, and graphs.parquet with each prompt's nodes, edges, replacement and completeness
    scores, or its error. Graphs are written as each finishes; a rerun computes only the
    prompts without a finished graph."""
    from click.core import ParameterSource

    from clt_ray.attribution import PromptSpec, Upload, attribute_prompts, read_prompts
    from clt_ray.config import GraphSettings

    specs = [PromptSpec(p) for p in prompts]
    if prompts_file is not None:
        specs += read_prompts(prompts_file)
    if not specs:
        raise click.UsageError("give --prompt TEXT (repeatable) or --prompts-file FILE")
    settings = GraphSettings(max_feature_nodes=max_feature_nodes, max_n_logits=max_n_logits,
                             desired_logit_prob=desired_logit_prob, batch_size=batch_size,
                             gather_bytes=gather_memory, node_threshold=node_threshold,
                             edge_threshold=edge_threshold)
    upload = (Upload(neuronpedia_model, feature_json_base_url)
              if neuronpedia_model or feature_json_base_url else None)
    _existing(clt, "--clt")
    with Staged(out, "--out") as staged:  # a URI: made in node-local scratch, then pushed
        staged.pull()  # what an earlier run put there (a rerun resumes it)
        exported = _exported_clt(clt, staged.local)
        pulled = is_uri(clt) and exported != staged.local / "clt"  # a local copy of an export
        common: dict[str, Any] = {
            "model": model, "backend": backend, "settings": settings, "corpus": corpus,
            "example_tokens": example_tokens, "autointerp": autointerp, "upload": upload,
            "clt_name": clt.rstrip("/").rsplit("/", 1)[-1] if pulled else None,
            "log": click.echo}
        try:
            if workers is None:
                rows = attribute_prompts(exported, specs, staged.local, device=device, **common)
            else:
                from clt_ray.actors.attribution import attribute_on_ray

                given = click.get_current_context().get_parameter_source("device")
                rows = attribute_on_ray(
                    exported, specs, staged.local, workers=workers, address=address,
                    worker_clt=clt if pulled else None,
                    cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                    device=None if given == ParameterSource.DEFAULT else device, **common)
        finally:  # what is done, also after Ctrl-C or a lost cluster
            staged.push(last=[layout.GRAPH_METADATA])
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        click.echo(format_summary(ok))
    for r in rows:
        if r["status"] != "ok":
            click.echo(f"failed: {r['slug']}: {r['error']}", err=True)
    click.echo(f"{len(ok)} of {len(rows)} graphs ({len(rows) - len(ok)} failed, recorded in "
               f"{layout.GRAPH_SUMMARY}); graphs, dashboards and {layout.GRAPH_SUMMARY} in {out}; "
               f"view them with `clt-ray serve RUN_DIR --graphs {out}` (with the run's features "
               f"and curves) or `clt-ray serve-graphs {out}`")


@cli.command("label-graphs")
@click.argument("graphs_dir", type=Location())
@click.option("--autointerp", type=Location(), required=True,
              help="An `autointerp` output folder (its explanations.parquet).")
def label_graphs_command(graphs_dir: str, autointerp: str) -> None:
    """Label the feature nodes of graphs made earlier (an `attribute` output folder): each
    node's `clerp`, shown on hover by the graph viewers and Neuronpedia, becomes its feature's
    explanation ('' where there is none); each graph file is replaced atomically."""
    from clt_ray.attribution import read_labels, relabel_graphs

    labels = read_labels(autointerp)
    _existing(graphs_dir, "GRAPHS_DIR")
    with Staged(graphs_dir, "GRAPHS_DIR") as staged:  # a URI: only its graph files travel
        for name in staged.entries() if staged.remote else ():
            if name.endswith(".json"):
                staged.pull(name)
        graphs, nodes = relabel_graphs(staged.local, labels)
        staged.push(last=[layout.GRAPH_METADATA])
    click.echo(f"{graphs} graphs in {graphs_dir} relabelled: {nodes} feature nodes labelled "
               f"from {len(labels)} explanations")


@cli.command("intervene")
@click.option("--clt", "clt", required=True, type=LocalPath(exists=True, file_okay=False,
              path_type=Path), help="An exported CLT folder (`clt-ray export`).")
@click.option("--prompt", required=True)
@click.option("--set", "settings", multiple=True, required=True, metavar="L:P:F=V",
              help="Set feature F of layer L at position P (negative: from the end) to V; "
              "repeatable. V=0 ablates.")
@click.option("--target", default=None, help="Token whose logit is followed (default: the top "
              "prediction before the intervention).")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@_graph_options
def intervene_command(clt: Path, prompt: str, settings: tuple[str, ...], target: str | None,
                      top_k: int, model: str | None, backend: str, device: str) -> None:
    """Set CLT features and show the next-token predictions and target logit before and after."""
    from clt_ray.attribution import intervene, load_replacement_model, parse_intervention

    interventions = [parse_intervention(s) for s in settings]
    rm = load_replacement_model(clt, model, backend=backend, device=device)
    r = intervene(rm, prompt, interventions, target=target, top_k=top_k)
    click.echo(f"prompt: {prompt!r}")
    for name, top in (("before", r.top_before), ("after", r.top_after)):
        click.echo(f"  top {name:<7}" + "  ".join(f"{t!r} {p:.3f}" for t, p in top))
    click.echo(f"  logit of {r.target!r}: {r.target_logit_before:.3f} -> "
               f"{r.target_logit_after:.3f} ({r.delta:+.3f})")


@cli.command("serve-graphs")
@click.argument("folder", type=Location())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind (0.0.0.0 exposes the graphs to the network).")
@click.option("--port", type=click.IntRange(0, 65535), default=8032, show_default=True,
              help="0 picks a free port.")
def serve_graphs(folder: str, host: str, port: int) -> None:
    """circuit-tracer's graph viewer over an `attribute` output folder (Ctrl-C stops it).
    Served by clt-ray's viewer, not circuit-tracer's own server: only files inside FOLDER, only
    requests addressed to HOST, offline, read-only."""
    from clt_ray.viewer import GraphsServer

    folder = _local_copy(folder, "FOLDER")
    if not (folder / layout.GRAPH_METADATA).is_file():
        raise CltRayError(f"{folder} has no {layout.GRAPH_METADATA}: make graphs with "
                          "`clt-ray attribute --out FOLDER` first")
    try:
        server = GraphsServer(folder, host, port).start()
    except OSError as exc:
        raise CltRayError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    click.echo(f"graphs of {folder} at {server.url}index.html  (Ctrl-C stops it)")
    _wait_for_interrupt(server.stop)


@cli.command("serve")
@click.argument("run_dir", type=Location())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind (0.0.0.0 exposes the viewer to the network).")
@click.option("--port", type=click.IntRange(0, 65535), default=8050, show_default=True,
              help="0 picks a free port.")
@click.option("--graphs", "graphs", type=Location(),
              default=None, help="An `attribute` output folder (default RUN_DIR/graphs).")
@click.option("--autointerp", "autointerp", type=Location(),
              default=None, help="An `autointerp` output folder (default RUN_DIR/autointerp).")
def serve_command(run_dir: str, host: str, port: int, graphs: str | None,
                  autointerp: str | None) -> None:
    """The web viewer over a run folder: feature browser and dashboards, attribution graphs,
    training curves (Ctrl-C stops it). Locations in a store are read through a local copy
    taken at start (a run folder's checkpoints are not copied: the viewer does not read them)."""
    paths = _viewer_paths(_local_copy(run_dir, "RUN_DIR", skip=(layout.CHECKPOINTS,)),
                          _local_copy(graphs, "--graphs") if graphs else None,
                          _local_copy(autointerp, "--autointerp") if autointerp else None)
    _serve_until_interrupted(paths, host, port)


def _local_copy(location: str, what: str, skip: Sequence[str] = ()) -> Path:
    """A local folder as is; a folder in a store copied into node-local scratch (removed at
    exit), without the top-level entries in `skip`."""
    if not is_uri(location):
        return Path(location)
    _existing(location, what)
    staged = Staged(location, what)
    for name in staged.entries():
        if name not in skip:
            staged.pull(name)
    return staged.local


def _viewer_paths(run_dir: Path, graphs: Path | None = None, autointerp: Path | None = None):
    """RunPaths of a run folder, checked: it must exist; each missing output is a warning with
    the command that makes it."""
    from clt_ray.viewer import RunPaths

    if not run_dir.is_dir():
        raise CltRayError(f"run folder {run_dir} does not exist (make one with `clt-ray train`)")
    paths = RunPaths.of(run_dir, graphs, autointerp)
    by_command: dict[str, list[str]] = {}
    for missing in paths.status().values():
        if missing:
            by_command.setdefault(missing["command"], []).append(missing["missing"])
    for command, files in by_command.items():
        click.echo(f"  missing {', '.join(files)}\n    make with: {command}", err=True)
    return paths


def _serve_until_interrupted(paths, host: str, port: int) -> None:
    from clt_ray.viewer import ViewerServer

    try:
        server = ViewerServer(paths, host, port).start()
    except OSError as exc:
        raise CltRayError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    click.echo(f"clt-ray viewer of {paths.run} at {server.url}  (Ctrl-C stops it)")
    _wait_for_interrupt(server.stop)


def _wait_for_interrupt(stop) -> None:
    """Sleep until Ctrl-C, then stop the server."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


@cli.command("autointerp")
@click.option("--config", "config_path", required=True,
              type=LocalPath(exists=True, dir_okay=False, path_type=Path),
              help="An auto-interp config (see examples/autointerp.yaml).")
@click.option("--out", default=None, help="Overrides the config's output folder.")
@click.option("--address", default=None,
              help="Ray cluster address (default: a running local Ray, else a new one; `local`: a new one).")
@click.option("--topk-only", is_flag=True,
              help="Only the top-k statistics (features.parquet): no LLM requests (the "
                   "config needs no llm section).")
def autointerp_command(config_path: Path, out: str | None, address: str | None,
                       topk_only: bool) -> None:
    """Explain and score CLT features with any OpenAI-compatible endpoint: top-k examples by a
    Ray Data pass over held-out text, then explanations and detection/fuzzing scores through an
    actor pool of async clients. The API key comes only from the environment variable named by
    llm.api_key_env. A rerun reuses what is done and asks the endpoint only for what is missing."""
    from clt_ray.actors.autointerp import run_autointerp_on_ray
    from clt_ray.config import AutoInterpConfig, load_config

    cfg = load_config(config_path, AutoInterpConfig)
    if out is not None:
        cfg = cfg.model_copy(update={"out": out})
    for location in (cfg.out, cfg.checkpoint):  # an unknown scheme: one line, before any work
        if is_uri(location):
            check_scheme(location)
    summary = run_autointerp_on_ray(cfg, log=click.echo, progress=True, address=address,
                                    topk_only=topk_only)
    if topk_only:
        click.echo(f"top-k statistics of {summary['features']} features ({summary['fired']} "
                   f"fired) in {Path(cfg.out) / layout.TOPK_FEATURES}; no LLM requests sent")
        return
    click.echo(f"{summary['explained']} of {summary['features']} features explained "
               f"({summary['explain_failed']} failed), {summary['scored']} scores "
               f"({summary['score_failed']} failed)")
    click.echo(f"tokens: {summary['prompt_tokens']:,} prompt + {summary['completion_tokens']:,} "
               f"completion; cost ${summary['cost_usd']:.4f}")
    for key, value in summary.items():
        if key.endswith("_auc_mean"):
            click.echo(f"  {key.removesuffix('_auc_mean')} AUC (mean): {value:.3f}")
    if summary["budget_exhausted"]:
        click.echo(f"budget of ${cfg.llm.budget_usd} reached: requests after it were not sent "
                   "(rerun with a larger llm.budget_usd to finish)")
    click.echo(f"outputs in {cfg.out}: features.parquet, explanations.parquet, scores.parquet")


def format_metrics(m: dict[str, Any], dead_after_tokens: int | None = None) -> str:
    """The headline numbers of a metrics.evaluate result, a few lines for people."""
    ev, l0 = m["explained_variance"], m["l0"]
    lines = [
        f"  held-out EV     {sum(ev) / len(ev):.3f} mean   per layer "
        + " ".join(f"{v:.3f}" for v in ev),
        f"  L0 per layer    {sum(l0) / len(l0):.1f} mean   per layer "
        + " ".join(f"{v:.1f}" for v in l0),
    ]
    if "dead_training" in m:
        window = (f"{dead_after_tokens:,}" if dead_after_tokens else "train.dead_after_tokens")
        lines.append(f"  dead features   {m['dead_training_fraction']:.1%} ({m['dead_training']} "
                     f"not fired in the last {window} training tokens); "
                     f"never fired on held-out: {m['dead_heldout_fraction']:.1%}")
    if "graph_replacement" in m:
        lines.append(f"  graphs          replacement {m['graph_replacement']:.3f}   "
                     f"completeness {m['graph_completeness']:.3f}   "
                     f"({len(m['graph_replacement_per_prompt'])} held-out prompts)")
    if "delta_ce" in m:
        lines.append(f"  spliced         ΔCE {m['delta_ce']:+.4f} nats   KL {m['kl_spliced']:.4f}   "
                     f"CE recovered {m['ce_recovered']:.3f}   (clean CE {m['ce_clean']:.3f})")
    return "\n".join(lines)


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
    """The summary table for people: one line per graph and the means."""
    header = (f"{'graph':<34} {'tokens':>6} {'nodes':>6} {'edges':>7} {'replace':>8} "
              f"{'complete':>8} {'s':>6}")
    lines = [header]
    for r in rows:
        lines.append(f"{r['slug'][:34]:<34} {r['tokens']:>6} {r['nodes']:>6} {r['edges']:>7} "
                     f"{r['replacement']:>8.3f} {r['completeness']:>8.3f} {r['seconds']:>6.2f}")
    n = len(rows)
    lines.append(f"{'mean':<34} {'':>6} {'':>6} {'':>7} "
                 f"{sum(r['replacement'] for r in rows) / n:>8.3f} "
                 f"{sum(r['completeness'] for r in rows) / n:>8.3f}")
    return "\n".join(lines)


def main() -> None:
    """Entry point: user errors print one line (set CLT_RAY_DEBUG=1 for the traceback)."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except CltRayError as exc:
        if os.environ.get("CLT_RAY_DEBUG"):
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
