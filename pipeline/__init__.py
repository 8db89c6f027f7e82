"""Ray orchestration of the IntraQ pipeline: sharded generation, distributed distillation, search, CLI."""
