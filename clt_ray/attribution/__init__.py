"""Attribution graphs with circuit-tracer (docs/design.md §5): a replacement model from a local or hub LM
plus an exported CLT, graphs with a node cap, pruning, replacement and completeness scores, the
graph and feature JSON its frontend reads, and feature interventions.

    rm = load_replacement_model("runs/x/clt")                # LM named in the CLT's config.yaml
    result = attribute_prompt(rm, "The capital of Varnia is")
    result.replacement, result.completeness, result.n_nodes
    intervene(rm, prompt, [(layer, position, feature, 0.0)])
    attribute_prompts("runs/x/clt", read_prompts("prompts.jsonl"), "graphs/")  # resumable
    relabel_graphs("graphs/", read_labels("runs/x/autointerp"))

Many prompts: `runner` (one process) and `clt_ray.actors.attribution` (a Ray actor pool) run the
same `Attributor` and write through the same `store.GraphStore`: graphs as each finishes, index
files always whole, a rerun computing only what is missing; graphs carry feature labels
(`labels`) and the fields Neuronpedia's upload requires.

Backends: nnsight (circuit-tracer's own mapping) for the architectures it registers — Llama,
Gemma 2/3, Qwen 3, GPT-OSS — from hub names or local folders; TransformerLens for the others
(GPT-2, Mistral, Qwen 2, NeoX), built from the local folder by `lm.tl.load_hooked_transformer`
because TL's `from_pretrained` takes only official names. Both give the same graph where both
apply (tested on the toy Llama). Everything that can be checked before loading weights is: the
CLT folder, the model's availability, layers and width, the prompt length.
"""


from clt_ray.attribution.folder import (
    BACKENDS,
    AttributionError,
    Backend,
    CLTFolder,
    check_fits,
    feature_scan,
    read_clt_folder,
)
from clt_ray.attribution.graphs import (
    GraphResult,
    attribute_prompt,
    contrast_target,
    example_windows,
    graph_json,
    logit_targets,
    write_feature_dashboards,
)
from clt_ray.attribution.interventions import (
    Intervention,
    InterventionResult,
    intervene,
    parse_intervention,
)
from clt_ray.attribution.labels import (
    Labels,
    clean_label,
    find_labels,
    label_graph,
    read_labels,
    relabel_graphs,
)
from clt_ray.attribution.prompts import PromptSpec, read_prompts, unique_specs
from clt_ray.attribution.replacement import (
    check_model,
    context_limit,
    load_replacement_model,
    pick_backend,
    token_strings,
    tokenize,
)
from clt_ray.attribution.runner import Attributor, attribute_prompts
from clt_ray.attribution.scoring import GraphScorer, graph_eval_prompts, graph_scorer_for
from clt_ray.attribution.store import ROW_SCHEMA, GraphOutcome, GraphStore, Upload

__all__ = [
    "BACKENDS", "ROW_SCHEMA", "AttributionError", "Attributor", "Backend", "CLTFolder",
    "GraphOutcome", "GraphResult", "GraphScorer", "GraphStore", "Intervention",
    "InterventionResult", "Labels", "PromptSpec", "Upload", "attribute_prompt",
    "attribute_prompts", "check_fits", "check_model", "clean_label", "context_limit",
    "contrast_target", "example_windows", "feature_scan", "find_labels", "graph_eval_prompts",
    "graph_json", "graph_scorer_for", "intervene", "label_graph", "load_replacement_model",
    "logit_targets", "parse_intervention", "pick_backend", "read_clt_folder", "read_labels",
    "read_prompts", "relabel_graphs", "token_strings", "tokenize", "unique_specs",
    "write_feature_dashboards",
]
