"""Run reports: run data, figures, rendering, and methods in the words of the comparison tables."""
