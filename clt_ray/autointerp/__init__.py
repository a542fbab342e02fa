"""Auto-interpretability (DESIGN.md §6): top-k examples, prompts, response parsing, scorers, and
the LLM-call layer they share (`clt_ray.autointerp.llm`). No Ray here; the Ray Data wiring lives in
`clt_ray.actors.autointerp`. Kept import-light: submodules are imported where they are used."""
