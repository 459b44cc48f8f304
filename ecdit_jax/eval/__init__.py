"""Scoring generated images: the GenEval-Shapes scorer, FID, CLIP score, routing statistics."""
