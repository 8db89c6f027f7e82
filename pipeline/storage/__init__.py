"""Run storage: the Storage facade, the lease lock, failure classification, the shard format."""
