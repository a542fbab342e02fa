"""Every file and folder name that clt-ray writes or reads in a run folder and in the command
outputs, in one place (layer 0: no imports), so the trainer, the commands and the viewer agree.

    run_dir/                         clt-ray train --run-dir
      config.yaml                    RUN_CONFIG: the run's Config
      metrics.jsonl                  METRICS: one JSON object per log/eval line
      tensorboard/                   TENSORBOARD (train.tensorboard)
      summary.json                   VIEWER_SUMMARY: optional run summary the viewer shows
      checkpoints/step_000000123/    CHECKPOINTS, checkpoint_name(step)
        manifest.json                CHECKPOINT_MANIFEST (written last: a folder with it is whole)
        norm.safetensors, state.safetensors, W_enc_*.safetensors, ...
        shard_000/sizes.json         shard_name(i), SHARD_SIZES: one shard's slice (Ray runs)
      graphs/                        GRAPHS: clt-ray attribute's output (any --out has this shape)
        graph-metadata.json          GRAPH_METADATA: the frontend's index of graphs
        graphs.parquet               GRAPH_SUMMARY: one row per graph
        <slug>.json                  one graph
        features/<clt name>/<i>.json FEATURE_DASHBOARDS: feature JSON, i = cantor_pair(layer, f)
      autointerp/                    AUTOINTERP: clt-ray autointerp's output (any --out)
        features.parquet             TOPK_FEATURES: top-k statistics per feature
        explanations.parquet         EXPLANATIONS
        scores.parquet               SCORES
        llm-cache/                   LLM_CACHE: durable LLM replies
    exported CLT folder              clt-ray export: circuit-tracer's format, config.yaml
    activation cache                 clt-ray cache: part files + manifest.json (written last)
"""

RUN_CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
VIEWER_SUMMARY = "summary.json"

CHECKPOINTS = "checkpoints"
CHECKPOINT_MANIFEST = "manifest.json"
CHECKPOINT_NORM = "norm.safetensors"
CHECKPOINT_STATE = "state.safetensors"
SHARD_SIZES = "sizes.json"

GRAPHS = "graphs"
GRAPH_METADATA = "graph-metadata.json"
GRAPH_SUMMARY = "graphs.parquet"
FEATURE_DASHBOARDS = "features"

AUTOINTERP = "autointerp"
TOPK_FEATURES = "features.parquet"
EXPLANATIONS = "explanations.parquet"
SCORES = "scores.parquet"
LLM_CACHE = "llm-cache"

CLT_CONFIG = "config.yaml"
CACHE_MANIFEST = "manifest.json"

RUN_FOLDER_ENTRIES = frozenset({RUN_CONFIG, METRICS, CHECKPOINTS, VIEWER_SUMMARY, TENSORBOARD,
                                GRAPHS, AUTOINTERP})
"""What a run folder may hold (a folder with anything else is not one of ours)."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}"


def shard_name(index: int) -> str:
    return f"shard_{index:03d}"


def cantor_pair(layer: int, feature: int) -> int:
    """The one index circuit-tracer's frontend gives a (layer, feature) pair: its feature JSON
    file name and the `feature` of a graph node."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature
