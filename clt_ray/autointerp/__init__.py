"""Auto-interpretability (docs/design.md §6): prompts, response parsing and scorers (`prompts`,
`tasks`), the LLM-call layer (`llm`), top-k windows from an activation cache (`cache_source`) and
the run itself (`pipeline`, with its executor passed in). No Ray here; the Ray Data placement lives
in `clt_ray.actors.autointerp`. Kept import-light: submodules are imported where they are used."""
