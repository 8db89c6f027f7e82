"""What each stage does, executor-free: generation, generator training, training, evaluation, export."""
