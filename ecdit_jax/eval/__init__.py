"""Evaluation of generated images (GenEval-Shapes scorer)."""
