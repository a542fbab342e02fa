"""Per-feature statistics (layer 5): mergeable top-k states (`topk`), the statistics over windows
and token text (`collect`), and circuit-tracer's feature JSON (`dashboards`). Auto-interp and the
attribution dashboards share them."""
