"""A whole run: opening its location, checking inputs, choosing the executor, running the stages."""
