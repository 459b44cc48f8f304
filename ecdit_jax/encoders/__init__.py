"""Pretrained networks used by evaluation, and loaders for their published weights."""
