"""Parallelism: device mesh and sharding rules, pipeline stages, multi-host start-up."""
