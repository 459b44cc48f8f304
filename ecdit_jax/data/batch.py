"""The training batch: its keys and the rank of each array, in one place.

The data pipeline yields host batches of IMAGE (B, H, W, C) float32 (pixels in [-1, 1], or
latents) and TOKENS (B, L) int32, with NUM_SKIPPED, the records skipped while filling it. A
frozen pretrained text encoder replaces TOKENS with CONTEXT (B, L, width) and CONTEXT_LENGTHS
(B,) before the step; the step takes either form.
"""

IMAGE = "image"
TOKENS = "tokens"
CONTEXT = "context"
CONTEXT_LENGTHS = "context_lengths"
NUM_SKIPPED = "num_skipped"

TOKEN_RANKS = {IMAGE: 4, TOKENS: 2}
CONTEXT_RANKS = {IMAGE: 4, CONTEXT: 3, CONTEXT_LENGTHS: 1}


def ranks(encoded_text: bool) -> dict[str, int]:
  """The step's batch keys and ranks: text as tokens, or as a frozen encoder's context."""
  return dict(CONTEXT_RANKS if encoded_text else TOKEN_RANKS)
