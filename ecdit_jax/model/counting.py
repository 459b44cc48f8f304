"""Parameter counts: total, and activated per image token, from the model's abstract state.

Nothing is allocated: the model is built under ``nnx.eval_shape``. "Activated" counts each
parameter as often as an average image token uses it: an expert's weights are used by a token
only when that expert takes it, which happens f / E of the time under expert choice (f = the
capacity factor: each expert takes N f / E of N tokens) and k / E under token-choice top-k.

``python -m ecdit_jax.model.counting`` prints every preset's parameter counts and its FLOPs per
image (counted by :mod:`ecdit_jax.model.flops`) as the markdown table in docs/PRESETS.md.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from ecdit_jax.model.config import ModelConfig
from ecdit_jax.model.dit import TextToImageDiT
from ecdit_jax.model.flops import forward_flops_per_image, train_flops_per_image
from ecdit_jax.model.params import abstract_model
from ecdit_jax.model.presets import model_overrides, preset_names


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  total: int  # every parameter, text encoder included
  text_encoder: int
  backbone: int  # the DiT alone
  experts: int  # expert weights inside the backbone
  activated_per_token: float  # backbone parameters an average image token uses

  def summary(self) -> str:
    def b(n):
      return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
    return (f"total {b(self.total)} (backbone {b(self.backbone)}, experts {b(self.experts)}, "
            f"text encoder {b(self.text_encoder)}), activated per token "
            f"{b(self.activated_per_token)}")


def _size(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def mean_experts_per_token(config: ModelConfig) -> float:
  """Average number of experts that process a token in an MoE layer at training capacity."""
  if config.router == "expert_choice":
    return config.capacity_factor
  return float(config.token_choice_top_k)


def count_params(config: ModelConfig, model: TextToImageDiT | None = None) -> ParamCounts:
  """Counts ``model`` (built abstractly from ``config`` when not given)."""
  model = abstract_model(config) if model is None else model
  # A frozen pretrained text encoder lives outside the model: it has no trainable parameters.
  text = 0 if model.text_encoder is None else _size(nnx.state(model.text_encoder, nnx.Param))
  backbone = _size(nnx.state(model.dit, nnx.Param))
  experts = sum(_size(nnx.state(block.ffn.experts, nnx.Param))
                for block in model.dit.block_modules() if block.is_moe)
  share = mean_experts_per_token(config) / config.num_experts if experts else 0.0
  return ParamCounts(total=text + backbone, text_encoder=text, backbone=backbone,
                     experts=experts, activated_per_token=backbone - experts + experts * share)


# Table 1 of the paper (total parameters, billions), for comparison in docs/PRESETS.md.
PAPER_TOTALS = {"XL-dense": 1.47, "XL-32E": 6.08, "XXL-dense": 2.35, "XXL-32E": 13.47,
                "3XL-dense": 4.50, "3XL-32E": 32.15, "M-dense": 8.03, "M-64E": 97.21}


def preset_table(names=None) -> str:
  """A markdown table of every preset's size (latent input: 4 channels, patch 2, 256 tokens).

  The FLOP columns are one image through the whole model (text encoder included) at the
  training capacity factor: the forward pass, and forward + backward (3 x forward).
  """
  header = ("| preset | d | layers | heads | experts | total (B) | backbone (B) | experts (B) | "
            "activated/token (B) | paper total (B) | fwd GFLOPs/image | train GFLOPs/image |")
  rows = [header, "|---" * (header.count("|") - 1) + "|"]
  for name in names or preset_names():
    config = ModelConfig(in_channels=4, **model_overrides(name))
    c = count_params(config)
    experts = config.num_experts if config.moe_layout != "none" else "-"
    paper = PAPER_TOTALS.get(name)
    forward = forward_flops_per_image(config, train=True)["total"]
    train = train_flops_per_image(config)["total"]
    rows.append(f"| {name} | {config.hidden_size} | {config.num_layers} | {config.num_heads} | "
                f"{experts} | {c.total / 1e9:.3f} | {c.backbone / 1e9:.3f} | "
                f"{c.experts / 1e9:.3f} | {c.activated_per_token / 1e9:.3f} | "
                f"{'' if paper is None else f'{paper:.2f}'} | {forward / 1e9:.1f} | "
                f"{train / 1e9:.1f} |")
  return "\n".join(rows)


if __name__ == "__main__":
  print(preset_table())
