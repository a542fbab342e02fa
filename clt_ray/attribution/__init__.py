"""Attribution graphs with circuit-tracer (docs/design.md §5): a replacement model from a local or hub LM
plus an exported CLT, graphs with a node cap, pruning, replacement and completeness scores, the
graph and feature JSON its frontend reads, and feature interventions.

    rm = load_replacement_model("runs/x/clt")                # LM named in the CLT's config.yaml
    result = attribute_prompt(rm, "The capital of Varnia is")
    result.replacement, result.completeness, result.n_nodes
    write_graph(result, out_dir, "varnia", scan)             # out_dir/varnia.json + metadata
    intervene(rm, prompt, [(layer, position, feature, 0.0)])

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
    read_clt_folder,
)
from clt_ray.attribution.graphs import (
    GraphResult,
    attribute_prompt,
    attribute_prompts,
    contrast_target,
    example_windows,
    feature_scan,
    remove_stale,
    slugify,
    write_feature_dashboards,
    write_graph,
)
from clt_ray.attribution.interventions import (
    Intervention,
    InterventionResult,
    intervene,
    parse_intervention,
)
from clt_ray.attribution.replacement import (
    context_limit,
    load_replacement_model,
    pick_backend,
    token_strings,
    tokenize,
)
from clt_ray.attribution.scoring import GraphScorer, graph_eval_prompts, graph_scorer_for

__all__ = [
    "BACKENDS", "AttributionError", "Backend", "CLTFolder", "GraphResult", "GraphScorer",
    "Intervention", "InterventionResult", "attribute_prompt", "attribute_prompts", "check_fits",
    "context_limit", "contrast_target", "example_windows", "feature_scan", "graph_eval_prompts",
    "graph_scorer_for", "intervene", "load_replacement_model", "parse_intervention",
    "pick_backend", "read_clt_folder", "remove_stale", "slugify",
    "token_strings", "tokenize", "write_feature_dashboards", "write_graph",
]
