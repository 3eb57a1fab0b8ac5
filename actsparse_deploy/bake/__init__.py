"""Stage 2, bake: masks into the model as fixed ops (plan, apply, explain), the dataflow walk that pruning follows, ``.pt2`` programs."""
