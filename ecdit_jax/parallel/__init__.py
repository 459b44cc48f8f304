"""Parallelism: logical axis names now; mesh, rules and sharding helpers build on them."""
