"""Ray executors: the Ray session and cluster, generation actors, Train workers, Tune search, metrics."""
