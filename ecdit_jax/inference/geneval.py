"""GenEval-Shapes evaluation of parameters: sample the standard prompts, score every image.

One function serves the evaluate CLI (a saved run) and the training loop (``eval_every_steps``:
the EMA parameters, scored and logged to TensorBoard as ``eval/geneval_shapes/*``).
"""

from __future__ import annotations

import numpy as np

from ecdit_jax.eval import geneval_shapes as scorer
from ecdit_jax.inference.images import to_uint8


def evaluation_captions(num_per_category: int) -> list[str]:
  """The captions every score is taken over (``evaluation_prompts(num_per_category, seed=0)``)."""
  return [p.caption for p in scorer.evaluation_prompts(num_per_category, seed=0)]


def geneval_shapes_score(sampler, params, tokenizer, null_tokens, text_max_len: int, *,
                         num_per_category: int, seed: int, batch_size: int,
                         progress=None) -> dict:
  """``sampler`` from ``make_sampler``; returns the scorer's {"overall", "per_category", ...}.
  ``progress(done, total)`` is called after every batch of images.

  The prompt set is ``evaluation_prompts(num_per_category, seed=0)`` whatever ``seed`` (the
  noise seed), so scores of different runs and steps are over the same prompts.
  """
  prompts = scorer.evaluation_prompts(num_per_category, seed=0)
  captions = [p.caption for p in prompts]
  tokens = tokenizer.encode_batch(captions, text_max_len)
  batches = []
  for start in range(0, len(prompts), batch_size):
    batches.append(to_uint8(sampler(params, tokens[start:start + batch_size], null_tokens, seed,
                                    first_index=start)))
    if progress is not None:
      progress(start + len(batches[-1]), len(prompts))
  images = np.concatenate(batches)
  return scorer.score_batch(images, captions, [p.category for p in prompts])


def as_scalars(result: dict, prefix: str = "eval/geneval_shapes") -> dict[str, float]:
  """The overall score and each category's, for a metric writer (absent categories left out)."""
  scalars = {f"{prefix}/overall": float(result["overall"])}
  scalars.update({f"{prefix}/{name}": float(value)
                  for name, value in result["per_category"].items() if value is not None})
  return scalars
