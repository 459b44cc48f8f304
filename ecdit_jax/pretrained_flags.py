"""The command-line flags that point a CLI at a run's frozen pretrained networks.

Shared by ``sample``, ``evaluate`` and ``analyze_routing``: a run records where its text encoder
and VAE were when it trained; these flags name where they are now, if they have moved.
"""

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("pretrained_text_encoder", None, "Frozen text encoder weights directory "
                    "(default: the run's config.pretrained.text_encoder).")
flags.DEFINE_string("pretrained_vae", None, "VAE directory decoding a latent model's samples "
                    "(default: the run's config.pretrained.vae).")


def overrides() -> dict[str, str]:
  """The flags as ``load_run(..., pretrained_overrides=...)`` takes them (empty = the run's)."""
  return {"text_encoder": FLAGS.pretrained_text_encoder or "", "vae": FLAGS.pretrained_vae or ""}
