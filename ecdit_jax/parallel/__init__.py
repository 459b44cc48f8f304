"""Parallelism: logical axis names, the mesh and its rules, and the multi-process start."""
